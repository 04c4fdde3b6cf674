"""Run every benchmark script and write one markdown table of their figures.

    python bench/run_all.py                       # CPU, every script, bench/RESULTS.md
    python bench/run_all.py --quick               # fewer repeats / smaller inputs (minutes)
    python bench/run_all.py --device cuda --output bench/RESULTS_cuda.md
    python bench/run_all.py --only trident evaluator

Each script of this folder (not ``_*.py``, not this one) runs in its own process and prints
one figure a line, ``name: value`` or ``name: value (goal <= X)`` (DESIGN.md "Benchmarks").
Every line whose value is a number becomes a row: script, figure, value, goal and, where there
is a goal, pass or FAIL. A script that crashes or runs past ``--timeout`` is one row saying so,
and the others still run. Exit status: 0 every script ran and every goal was met; 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "RESULTS.md"

# --quick: the same figures from fewer repeats and smaller inputs (names say the sizes)
QUICK_ARGS: dict[str, list[str]] = {
    "clip_dinoiser": ["--repeats", "1", "--images", "4", "--iterations", "2"],
    "dense_inference": ["--repeats", "1"],
    "evaluator": ["--repeats", "3", "--images", "8"],
    "mask_adapted": ["--repeats", "1"],
    "memory": ["--sides", "1024", "4096"],
    "sparse_conv": ["--points", "20000", "--repeats", "1"],
    "trident": ["--repeats", "1"],
}

# "name: value" with an optional "(goal <= X)"; the value may carry an "x" (a speedup)
FIGURE = re.compile(
    r"^(?P<name>[^:]+?):\s+(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?P<unit>x?)"
    r"(?:\s+\(goal\s*(?P<op><=|>=|<|>)\s*(?P<goal>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"(?P<goal_unit>x?)[^)]*\))?\s*$"
)
COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
           "<": lambda a, b: a < b, ">": lambda a, b: a > b}


@dataclass
class Figure:
    """One row of the table: a figure a script printed, or a script that failed."""

    script: str
    name: str
    value: str = ""
    goal: str = ""
    result: str = ""  # pass | FAIL | "" (no goal) | failed (the script)


def parse_figures(script: str, output: str) -> list[Figure]:
    """The figures of a script's output: every ``name: number [(goal OP X)]`` line."""
    figures = []
    for line in output.splitlines():
        match = FIGURE.match(line.strip())
        if match is None:
            continue  # a description line ("device: cpu", "model: ...")
        value = match["value"] + match["unit"]
        if match["op"] is None:
            figures.append(Figure(script, match["name"], value))
            continue
        met = COMPARE[match["op"]](float(match["value"]), float(match["goal"]))
        figures.append(Figure(script, match["name"], value,
                              f"{match['op']} {match['goal']}{match['goal_unit']}",
                              "pass" if met else "FAIL"))
    return figures


def bench_scripts(directory: Path, only: Sequence[str] | None) -> list[Path]:
    """The benchmark scripts of ``directory`` (sorted), or those named by ``only``."""
    scripts = sorted(p for p in directory.glob("*.py")
                     if not p.name.startswith("_") and p.name != Path(__file__).name)
    if not only:
        return scripts
    by_name = {p.stem: p for p in scripts}
    unknown = [name for name in only if name.removesuffix(".py") not in by_name]
    if unknown:
        raise SystemExit(f"error: no benchmark script {', '.join(unknown)} in {directory}; "
                         f"one of {', '.join(by_name)}")
    return [by_name[name.removesuffix(".py")] for name in only]


def run_script(script: Path, device: str, quick: bool, timeout: float) -> tuple[list[Figure],
                                                                                 float]:
    """Run one script; its figures (or one "failed" row) and its wall time in seconds."""
    command = [sys.executable, str(script)]
    if device != "cpu":
        command += ["--device", device]
    if quick:
        command += QUICK_ARGS.get(script.stem, [])
    started = time.perf_counter()
    # its own session: on a timeout the script's children (memory probes) go with it
    process = subprocess.Popen(command, cwd=script.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        seconds = time.perf_counter() - started
        return [*parse_figures(script.stem, stdout),
                Figure(script.stem, "(script)", result=f"failed: timed out after {timeout:g} s")
                ], seconds
    seconds = time.perf_counter() - started
    figures = parse_figures(script.stem, stdout)
    if process.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output on stderr"
        figures.append(Figure(script.stem, "(script)", result=f"failed: exit "
                              f"{process.returncode}: {last.replace('|', '/')}"))
    elif not figures:
        figures.append(Figure(script.stem, "(script)", result="failed: printed no figure"))
    return figures, seconds


def machine_line(device: str) -> str:
    parts = [f"{platform.machine()} {os.cpu_count()} CPUs", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if device.startswith("cuda") and torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return ", ".join(parts)


def render(figures: Sequence[Figure], timings: dict[str, float], device: str, quick: bool,
           command: str) -> str:
    """The markdown report: a header, one table of every figure, the scripts' wall times."""
    goals = [f for f in figures if f.result in ("pass", "FAIL")]
    failed = [f for f in figures if f.result.startswith("failed")]
    passed = sum(f.result == "pass" for f in goals)
    lines = [
        "# Benchmark results", "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}; device {device}"
        f"{' (--quick)' if quick else ''}; {machine_line(device)}.", "",
        f"Goals met: {passed} of {len(goals)}; scripts failed: {len(failed)} of {len(timings)}.",
        "",
        "| script | figure | value | goal | result |",
        "|---|---|---|---|---|",
    ]
    for figure in figures:
        lines.append(f"| {figure.script} | {figure.name} | {figure.value} | {figure.goal} | "
                     f"{figure.result} |")
    lines += ["", "| script | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda, passed to every script")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller inputs (see QUICK_ARGS)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SCRIPT",
                        help="only these scripts (names without .py)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="the markdown file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    parser.add_argument("--bench-dir", default=str(BENCH_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    figures: list[Figure] = []
    timings: dict[str, float] = {}
    for script in bench_scripts(Path(args.bench_dir), args.only):
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        found, seconds = run_script(script, args.device, args.quick, args.timeout)
        figures += found
        timings[script.stem] = seconds
        for figure in found:
            print(f"  {figure.name}: {figure.value} {figure.goal} {figure.result}".rstrip(),
                  file=sys.stderr, flush=True)
    command = "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(figures, timings, args.device, args.quick, command.strip())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"written to {output}", file=sys.stderr)
    bad = any(f.result == "FAIL" or f.result.startswith("failed") for f in figures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
