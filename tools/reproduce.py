"""Reproduce a paper's table: evaluate every benchmark of it that has data, next to the paper.

    python tools/reproduce.py --method trident --clip ViT-B-16 --refine
    python tools/reproduce.py --method sclip --benchmarks voc_21 ade20k_150 --num-gpus 4
    python tools/reproduce.py --method mask_adapted --clip ViT-L-14 \\
        model.mask_adapted.checkpoint /path/ovseg_swinbase_vitL14_ft_mpt.pth

For each benchmark of the method's table (``ovseg/data/papers/<method>.yaml``: the paper's
numbers from the specs, the config of each benchmark) whose data exist under the datasets root
(``$OVSEG_DATASETS``, ``./datasets``, or a ``datasets.root`` override), runs
``tools/train_net.py --eval-only`` in its own process, then prints and writes a markdown table:
benchmark, paper number, ours, delta, absent-class policy, wall time. A benchmark without data
is skipped with one line saying what is missing. Trailing ``KEY VALUE`` pairs go to every run
(weights, ``model.precision fp16``...); ``--config-file`` replaces the table's configs (a tiny
config for a quick check of the whole pipeline: its numbers are not the paper's).

Outputs under ``--output-dir`` (default ``./output/reproduce/<method>_<clip>[_<protocol>]
[_refine]``): ``<benchmark>/`` is each run's output_dir (``<benchmark>/<benchmark>/results.json``)
and ``reproduce.md`` the table.

Exit status: 0 every run that had data finished; 1 a run failed (its row says so); 2 a mistake
in the command line (unknown method, size, benchmark, a bad config override), one ``error:``
line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

NO_NUMBER = "—"


class UsageError(Exception):
    """A mistake in the command line; reported as one ``error:`` line, exit status 2."""


# ----------------------------------------------------------------------------- paper tables


@dataclass
class PaperTable:
    """One table of a paper: a CLIP size (and protocol), its configs and published numbers."""

    method: str
    title: str
    metric: str
    clip: str
    protocol: str
    config: str  # a name under configs/ with "{benchmark}" in it
    source: str
    has_refine: bool  # the paper has a SAM refinement step (the heading says on or off)
    results: dict[str, float | None]  # benchmark -> published number (None: not published)
    unverified: set[str] = field(default_factory=set)
    average: float | None = None
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def config_for(self, benchmark: str) -> str:
        return self.config.format(benchmark=benchmark)


def papers_dir() -> Path:
    """``ovseg/data/papers``: one YAML file of published numbers per method."""
    import ovseg.data

    return Path(ovseg.data.__file__).resolve().parent / "papers"


def _read_paper_file(path: Path) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(data, dict) or not data.get("tables"):
        raise UsageError(f"paper file {path} has no 'tables'")
    return data


def load_papers(directory: Path | None = None) -> dict[str, dict]:
    """Every paper file by method name (aliases included, pointing to the same data)."""
    papers: dict[str, dict] = {}
    for path in sorted((directory or papers_dir()).glob("*.yaml")):
        data = _read_paper_file(path)
        data["file"] = str(path)
        for name in (data["method"], *data.get("aliases", [])):
            papers[str(name)] = data
    return papers


def paper_tables(data: dict) -> list[PaperTable]:
    """The tables of one paper file, in file order."""
    tables = []
    for entry in data["tables"]:
        results = {str(k): (None if v is None else float(v)) for k, v in entry["results"].items()}
        unverified = entry.get("unverified") or []
        unverified = set(results) if unverified == "all" else {str(b) for b in unverified}
        average = entry.get("average")
        tables.append(PaperTable(
            method=str(data["method"]), title=str(data.get("title", data["method"])),
            metric=str(data.get("metric", "mIoU")), clip=str(entry["clip"]),
            protocol=str(entry.get("protocol", "")), config=str(entry["config"]),
            source=str(entry.get("source", "")), has_refine=bool(data.get("refine", False)),
            results=results, unverified=unverified,
            average=None if average is None else float(average),
            overrides=[str(item) for item in entry.get("overrides", [])],
            notes=[" ".join(str(n).split()) for n in data.get("notes", [])],
        ))
    return tables


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def select_table(papers: dict[str, dict], method: str, clip: str | None,
                 protocol: str | None) -> PaperTable:
    """The table of ``method`` for ``clip`` (default: the first size) and ``protocol``."""
    if method not in papers:
        known = sorted(papers)
        raise UsageError(f"--method: no paper table for '{method}'; {_suggest(method, known)}"
                         f"one of {', '.join(known)}")
    tables = paper_tables(papers[method])
    clip = clip or tables[0].clip
    sized = [t for t in tables if t.clip == clip]
    if not sized:
        clips = list(dict.fromkeys(t.clip for t in tables))
        raise UsageError(f"--clip: {method} has no table for '{clip}'; {_suggest(clip, clips)}"
                         f"one of {', '.join(clips)}")
    if protocol is None:
        return sized[0]
    for table in sized:
        if table.protocol == protocol:
            return table
    protocols = [t.protocol for t in sized if t.protocol]
    raise UsageError(f"--protocol: {method} {clip} has no protocol '{protocol}'; "
                     f"one of {', '.join(protocols) or '(none: leave --protocol out)'}")


# ----------------------------------------------------------------------------- runs


@dataclass
class Row:
    """One benchmark of the reproduced table."""

    benchmark: str
    paper: float | None
    unverified: bool = False
    status: str = "pending"  # ok | no data | failed
    ours: float | None = None
    policy: str = ""
    wall_s: float | None = None
    detail: str = ""


def run_overrides(table: PaperTable, args: argparse.Namespace, cfg_has_refine: bool) -> list[str]:
    """The KEY VALUE overrides of every run: the table's, --refine, then the user's."""
    opts = list(table.overrides)
    if args.refine or cfg_has_refine:
        opts += ["model.refine.enabled", "true" if args.refine else "false"]
    return opts + list(args.opts)


def load_run_config(config: str, opts: Sequence[str]):
    import ovseg
    from ovseg.errors import OvsegError

    try:
        return ovseg.get_config(config, list(opts))
    except OvsegError as exc:
        raise UsageError(f"{config}: {exc}") from exc


def missing_data(cfg, benchmark: str) -> str | None:
    """Why ``benchmark`` cannot run with ``cfg`` (its files are missing), or None."""
    from ovseg.data.catalog import BENCHMARKS, datasets_root, find_samples, get_benchmark
    from ovseg.errors import OvsegError

    root = cfg.datasets.root or None
    try:
        if benchmark in BENCHMARKS:
            info = get_benchmark(benchmark)
            if info.kind == "point_cloud":
                from ovseg.methods.clip2scene.training import list_scene_ids

                list_scene_ids(datasets_root(root) / info.image_dir)
            else:
                find_samples(info, root)
            return None
        if cfg.model.name == "cloc":
            from ovseg.methods.cloc.data import resolve_region_set

            region_set = resolve_region_set(benchmark, cfg.model.cloc, root)
            if not region_set.annotations.is_file():
                return f"annotations {region_set.annotations} not found"
            if not region_set.image_dir.is_dir():
                return f"image folder {region_set.image_dir} not found"
            return None
        get_benchmark(benchmark)  # an unknown name: the catalog's message
    except OvsegError as exc:
        return " ".join(str(exc).split())
    return None


def _output_stream():
    """Where the runs print (their progress and errors): this process's stderr."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
        return None


def run_benchmark(config: str, opts: Sequence[str], benchmark: str, output_dir: Path,
                  num_gpus: int) -> tuple[int, float]:
    """``train_net.py --eval-only`` of one benchmark in its own process: (exit status, s)."""
    command = [
        sys.executable, str(TRAIN_NET), "--config-file", config, "--eval-only",
        "--num-gpus", str(num_gpus), *opts,
        "datasets.test", f"[{benchmark}]", "output_dir", str(output_dir),
    ]
    stream = _output_stream()
    started = time.perf_counter()
    # the caller's working directory: relative paths of the command line mean the same there
    done = subprocess.run(command, stdout=stream, stderr=stream, check=False)
    return done.returncode, time.perf_counter() - started


def read_results(path: Path, metric: str) -> tuple[float | None, str]:
    """(the metric, the absent-class policy text) of a results.json."""
    results = json.loads(path.read_text(encoding="utf-8"))
    value = results.get(metric)
    policy = results.get("absent_classes")
    if policy is not None:
        counted = results.get("num_classes_in_mean")
        policy = f"{policy} ({counted} in mean)" if counted is not None else str(policy)
    elif "classes_evaluated" in results:  # region recognition: classes with boxes
        policy = f"classes with boxes ({results['classes_evaluated']})"
    return (None if value is None else float(value)), policy or NO_NUMBER


# ----------------------------------------------------------------------------- the table


def format_number(value: float | None) -> str:
    return NO_NUMBER if value is None or not math.isfinite(value) else f"{value:.2f}"


def format_paper(value: float | None) -> str:
    """A published number as the paper prints it (67.1, 25.08), not padded to 2 decimals."""
    return NO_NUMBER if value is None else str(value)


def format_delta(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return NO_NUMBER
    return f"{ours - paper:+.2f}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return NO_NUMBER
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def table_heading(table: PaperTable, refine: bool | None) -> str:
    parts = [table.title, f"CLIP {table.clip}"]
    if table.protocol:
        parts.append(f"protocol {table.protocol}")
    if refine is not None:
        parts.append("SAM refinement on" if refine else "SAM refinement off")
    return ", ".join(parts)


def render_table(table: PaperTable, rows: Sequence[Row], refine: bool | None,
                 footer: Sequence[str] = ()) -> str:
    """The markdown table of a reproduction (one row per benchmark, then the average)."""
    metric = table.metric
    lines = [
        f"## {table_heading(table, refine)}", "",
        f"| benchmark | paper {metric} | ours | delta | absent classes | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = format_paper(row.paper) + (" *" if row.unverified and row.paper is not None
                                            else "")
        if row.status == "ok":
            ours = format_number(row.ours)
        elif row.status == "no data":
            ours = "no data"
        else:
            ours = f"failed ({row.detail})" if row.detail else "failed"
        lines.append(f"| {row.benchmark} | {paper} | {ours} | {format_delta(row.ours, row.paper)}"
                     f" | {row.policy or NO_NUMBER} | {format_seconds(row.wall_s)} |")
    if len(rows) > 1:
        ran = [row.ours for row in rows if row.status == "ok" and row.ours is not None]
        ours_mean = sum(ran) / len(ran) if ran and len(ran) == len(rows) else None
        covers_table = {row.benchmark for row in rows} == set(table.results)
        paper_mean = table.average if covers_table else None
        if paper_mean is not None or ours_mean is not None:
            lines.append(f"| average ({len(rows)}) | {format_paper(paper_mean)} | "
                         f"{format_number(ours_mean)} | {format_delta(ours_mean, paper_mean)} "
                         "| | |")
    lines.append("")
    lines.append(f"Paper numbers: {table.source}" + (" (* unverified in the spec)"
                                                      if any(r.unverified for r in rows) else "")
                 + ".")
    lines.extend(f"- {note}" for note in table.notes)
    lines.extend(footer)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reproduce.py",
        description="Evaluate a method on its paper's benchmarks and compare with the paper.",
        epilog="Config overrides go last, as KEY VALUE pairs: model.sam.weights /path/sam.pth",
    )
    parser.add_argument("--method", required=True,
                        help="a paper table: sclip, naclip, proxyclip, maskclip, trident, "
                        "clip_dinoiser, mask_adapted (ovseg), cloc, clip2scene")
    parser.add_argument("--clip", default=None, metavar="ARCH",
                        help="CLIP size, as open_clip names it (ViT-B-16, ViT-L-14, ViT-H-14); "
                        "default: the table's first")
    parser.add_argument("--protocol", default=None,
                        help="where a size has several tables (maskclip: sclip | own)")
    parser.add_argument("--refine", action="store_true",
                        help="SAM refinement on (model.refine.enabled); off otherwise")
    parser.add_argument("--benchmarks", nargs="+", default=None, metavar="NAME",
                        help="only these benchmarks (default: the whole table)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per run (GPUs, or CPU processes), as train_net.py")
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="one config for every benchmark instead of the table's (e.g. a "
                        "tiny config to check the pipeline)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="default ./output/reproduce/<method>_<clip>[_<protocol>][_refine]")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="where the table goes (default OUTPUT_DIR/reproduce.md)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides for every run, at the end of the command line")
    return parser


def check_benchmark(table: PaperTable, name: str, config_file: str | None) -> None:
    """A benchmark outside the table must be one ovseg knows and (without --config-file) have
    a config of the table's pattern."""
    if name in table.results:
        return
    from ovseg.data.catalog import list_benchmarks
    from ovseg.methods.cloc.data import BUILTIN_REGION_SETS

    known = [*list_benchmarks(), *BUILTIN_REGION_SETS]
    config = config_file or table.config_for(name)
    if name not in known or (config_file is None and not config_exists(config)):
        raise UsageError(f"--benchmarks: '{name}' is not in the {table.method} {table.clip} "
                         f"table{'' if name in known else ' nor a benchmark of ovseg'}; "
                         f"{_suggest(name, list(table.results))}"
                         f"the table has {', '.join(table.results)}")


def config_exists(name: str) -> bool:
    return Path(name).is_file() or (REPO_ROOT / "configs" / name).is_file()


def default_output_dir(table: PaperTable, refine: bool) -> Path:
    name = f"{table.method}_{table.clip}"
    if table.protocol:
        name += f"_{table.protocol}"
    if refine:
        name += "_refine"
    return Path("output") / "reproduce" / name


def reproduce(args: argparse.Namespace) -> int:
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if len(args.opts) % 2:
        raise UsageError(f"config overrides come as KEY VALUE pairs; got {args.opts}")
    table = select_table(load_papers(), args.method, args.clip, args.protocol)
    benchmarks = list(dict.fromkeys(args.benchmarks or table.results))
    for name in benchmarks:
        check_benchmark(table, name, args.config_file)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(table,
                                                                                  args.refine)
    markdown = Path(args.markdown) if args.markdown else output_dir / "reproduce.md"

    # every config is read (and checked) before anything runs
    plans = []
    refine_shown = bool(args.refine) if table.has_refine or args.refine else None
    for name in benchmarks:
        config = args.config_file or table.config_for(name)
        base = load_run_config(config, list(table.overrides))
        has_refine = "refine" in base.model
        if args.refine and not has_refine:
            raise UsageError(f"--refine: {base.model.name} ({config}) has no SAM refinement "
                             "(model.refine)")
        opts = run_overrides(table, args, has_refine)
        cfg = load_run_config(config, opts)
        plans.append((name, config, opts, cfg))

    rows = []
    for name, config, opts, cfg in plans:
        row = Row(name, table.results.get(name), unverified=name in table.unverified)
        rows.append(row)
        why = missing_data(cfg, name)
        if why is not None:
            row.status = "no data"
            print(f"skip {name}: no data ({why})", file=sys.stderr, flush=True)
            continue
        print(f"run {name}: {config}", file=sys.stderr, flush=True)
        run_dir = output_dir / name
        results_path = run_dir / name / "results.json"
        started = time.time()
        status, row.wall_s = run_benchmark(config, opts, name, run_dir, args.num_gpus)
        if status == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        fresh = results_path.is_file() and results_path.stat().st_mtime >= started - 1
        if status != 0 or not fresh:
            row.status, row.detail = "failed", f"exit {status}" if status else "no results.json"
            print(f"failed {name}: train_net.py exited with {status}; its log: "
                  f"{run_dir / 'log.txt'}", file=sys.stderr, flush=True)
            continue
        row.status = "ok"
        row.ours, row.policy = read_results(results_path, table.metric)

    from ovseg.data.catalog import datasets_root

    roots = {str(datasets_root(cfg.datasets.root or None)) for *_, cfg in plans}
    configs = (f"{args.config_file} for every benchmark (not the paper's configs)"
               if args.config_file else f"configs/{table.config}")
    footer = ["", f"Configs: {configs}; datasets root: {', '.join(sorted(roots))}; "
              f"processes per run: {args.num_gpus}."]
    if args.opts:
        footer.append(f"Overrides: {' '.join(args.opts)}.")
    text = render_table(table, rows, refine_shown, footer)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    from ovseg.io import atomic_write_text

    atomic_write_text(markdown, text)
    print(text, end="")
    print(f"table written to {markdown}", file=sys.stderr)
    return EXIT_RUN_FAILED if any(row.status == "failed" for row in rows) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return reproduce(args)
    except UsageError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
