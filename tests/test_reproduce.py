"""``tools/reproduce.py`` (paper tables, skipped benchmarks, the delta table) and
``bench/run_all.py`` (figures parsed into one table, failed scripts as rows)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

import ovseg
from tests.fixtures.builders import build_voc
from tests.helpers import REPO_ROOT


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


reproduce = load_script("ovseg_reproduce_cli", REPO_ROOT / "tools" / "reproduce.py")
run_all = load_script("ovseg_bench_run_all", REPO_ROOT / "bench" / "run_all.py")

PAPERS = {data["method"]: data for data in reproduce.load_papers().values()}
TABLES = [table for data in PAPERS.values() for table in reproduce.paper_tables(data)]


def spec_text(name: str) -> str | None:
    for base in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared"):
        path = base / "specs" / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


# ----------------------------------------------------------------------------- paper tables


def test_the_issue_methods_have_tables():
    sizes = {(t.method, t.clip) for t in TABLES}
    for method in ("sclip", "naclip", "proxyclip", "clip_dinoiser", "cloc", "clip2scene"):
        assert (method, "ViT-B-16") in sizes
    assert {("trident", "ViT-H-14"), ("mask_adapted", "ViT-L-14")} <= sizes
    assert reproduce.load_papers()["ovseg"]["method"] == "mask_adapted"  # the paper's name


@pytest.mark.parametrize("table", TABLES, ids=lambda t: f"{t.method}-{t.clip}-{t.protocol}")
def test_every_table_has_a_config_per_benchmark_of_its_size(table):
    for benchmark in table.results:
        assert reproduce.config_exists(table.config_for(benchmark)), table.config_for(benchmark)
    first = next(iter(table.results))  # loading all ~90 configs is test_all_configs' job
    cfg = ovseg.get_config(table.config_for(first), table.overrides)
    assert list(cfg.datasets.test) == [first]
    assert cfg.model.clip.arch == table.clip


@pytest.mark.parametrize("method", sorted(PAPERS))
def test_every_published_number_is_written_in_its_spec(method):
    names = PAPERS[method]["spec"]
    texts = [spec_text(name) for name in ([names] if isinstance(names, str) else names)]
    if None in texts:
        pytest.skip("../shared/specs not found")
    text = "\n".join(texts)
    for table in reproduce.paper_tables(PAPERS[method]):
        for benchmark, value in [*table.results.items(), ("average", table.average)]:
            if value is not None:
                assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?![\d])", text), (
                    f"{method} {table.clip} {benchmark}: {value} is not in the spec")


def test_model_zoo_shows_every_published_number():
    text = (REPO_ROOT / "MODEL_ZOO.md").read_text(encoding="utf-8")
    for table in TABLES:
        for value in [*table.results.values(), table.average]:
            if value is not None:
                assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?![\d])", text), (
                    f"MODEL_ZOO.md lacks {table.method} {table.clip}: {value}")


def test_table_renders_delta_unverified_mark_and_average():
    table = reproduce.select_table(reproduce.load_papers(), "clip_dinoiser", None, None)
    rows = [reproduce.Row(b, table.results[b], unverified=b in table.unverified, status="ok",
                          ours=table.results[b] + 1.0, policy="zero (5 in mean)", wall_s=75.0)
            for b in table.results]
    rows[1].status, rows[1].ours, rows[1].detail = "failed", None, "exit 2"
    text = reproduce.render_table(table, rows, None)
    assert "| benchmark | paper mIoU | ours | delta | absent classes | wall time |" in text
    assert "| voc_21 | 62.1 * | 63.10 | +1.00 | zero (5 in mean) | 1m15s |" in text
    assert "| pcontext_60 | 32.4 * | failed (exit 2) | — |" in text
    assert "| voc_20 | 80.9 | 81.90 | +1.00 |" in text
    assert "average" not in text  # one failed run: no mean of ours, no published mean
    rows[1].status, rows[1].ours = "ok", 33.4
    assert "| average (8) | — | 41.30 | — |" in reproduce.render_table(table, rows, None)


# ----------------------------------------------------------------------------- the command


def test_reproduce_runs_what_has_data_and_skips_the_rest(tmp_path, capsys):
    build_voc(tmp_path / "datasets")
    output = tmp_path / "out"
    status = reproduce.main([
        "--method", "trident", "--clip", "ViT-B-16", "--benchmarks", "voc_21", "ade20k_150",
        "--config-file", "tiny/trident_tiny.yaml", "--output-dir", str(output),
        "datasets.root", str(tmp_path / "datasets"),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    assert re.search(r"skip ade20k_150: no data \(.*ADEChallengeData2016", captured.err)
    table = captured.out
    assert table == (output / "reproduce.md").read_text()
    assert "CLIP ViT-B-16, SAM refinement off" in table
    assert "| benchmark | paper mIoU | ours | delta | absent classes | wall time |" in table
    voc = re.search(r"\| voc_21 \| 67\.1 \| (\d+\.\d\d) \| ([-+]\d+\.\d\d) \| zero \(\d+ in mean\)"
                    r" \| [\d.]+ s \|", table)
    assert voc is not None, table
    assert float(voc[2]) == pytest.approx(float(voc[1]) - 67.1, abs=0.011)
    assert "| ade20k_150 | 21.9 | no data | — | — | — |" in table
    assert (output / "voc_21" / "voc_21" / "results.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--method", "tridnet"], "--method: no paper table for 'tridnet'; did you mean 'trident'?"),
    (["--method", "trident", "--clip", "ViT-L-14"], "one of ViT-B-16, ViT-H-14"),
    (["--method", "maskclip", "--protocol", "mine"], "one of sclip, own"),
    (["--method", "trident", "--benchmarks", "voc21"], "did you mean 'voc_21'?"),
    (["--method", "clip_dinoiser", "--refine"], "has no SAM refinement"),
    (["--method", "sclip", "model.dense_clip.mode"], "KEY VALUE pairs"),
    (["--method", "sclip", "--benchmarks", "voc_21", "model.dense_clip.moed", "x"], "moed"),
])
def test_command_line_mistakes_are_one_error_line(argv, message, capsys):
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- bench/run_all.py

KNOWN_OUTPUT = """\
device: cpu
model: trident/voc_21.yaml, CLIP ViT-B-16 + DINO ViT-B/16 + SAM vit_b, random weights
[no refine] per-image time (s): 3.210
[no refine] time ratio: 1.052 (goal <= 1.10)
memory ratio: 1.720 (goal <= 1.5)
speedup vs mmseg 150 classes: 4.2x (goal >= 3x)
rest share (resize, text, ensemble, label map): 0.080 (goal >= 0: shares sum to 1)
valid queries: 37 of 100
"""


def test_run_all_parses_figures_and_goals():
    rows = [(f.name, f.value, f.goal, f.result)
            for f in run_all.parse_figures("trident", KNOWN_OUTPUT)]
    assert rows == [
        ("[no refine] per-image time (s)", "3.210", "", ""),
        ("[no refine] time ratio", "1.052", "<= 1.10", "pass"),
        ("memory ratio", "1.720", "<= 1.5", "FAIL"),
        ("speedup vs mmseg 150 classes", "4.2x", ">= 3x", "pass"),
        ("rest share (resize, text, ensemble, label map)", "0.080", ">= 0", "pass"),
    ]


def test_run_all_writes_one_table_and_a_failed_script_is_a_row(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "fast.py").write_text('print("ratio: 0.9 (goal <= 1.0)")\nprint("time (s): 2.5")\n')
    (bench / "broken.py").write_text('raise RuntimeError("no GPU here")\n')
    (bench / "_helper.py").write_text('raise SystemExit("a helper is not run")\n')
    output = tmp_path / "RESULTS.md"
    status = run_all.main(["--bench-dir", str(bench), "--output", str(output)])
    assert status == 1  # a script failed
    text = output.read_text()
    assert "| script | figure | value | goal | result |" in text
    assert "| fast | ratio | 0.9 | <= 1.0 | pass |" in text
    assert "| fast | time (s) | 2.5 |  |  |" in text
    assert "| broken | (script) |  |  | failed: exit 1: RuntimeError: no GPU here |" in text
    assert "_helper" not in text
    assert "Goals met: 1 of 1; scripts failed: 1 of 2." in text
    assert run_all.main(["--bench-dir", str(bench), "--only", "fast",
                         "--output", str(output)]) == 0
    assert "broken" not in output.read_text()
    capsys.readouterr()
