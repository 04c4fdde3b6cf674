"""A full disk while training or evaluating: one line saying "no space left on device" and the
file, and no checkpoint file left without its manifest (issue 23, reliability).

The disk fills up for real only on a test machine nobody wants; here the write of one file
fails with ENOSPC after half its bytes, as a full disk makes it fail.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from ovseg.config import save_config
from ovseg.engine import hooks
from ovseg.errors import WriteError
from ovseg.evaluation.sem_seg import SemSegEvaluator, write_results
from tests.helpers import load_script
from tests.robustness.scripts import files_under, one_error_line
from tests.test_engine_checkpoint import make, step
from tests.test_engine_train import make_toy_dataset, write_config

NO_SPACE = "no space left on device while writing"


def _fill_disk_on(monkeypatch, pattern: str) -> None:
    """Writes through ``Path.write_bytes``/``write_text`` to a file whose name matches
    ``pattern`` write half their bytes, then fail as a full disk does."""
    real_write = Path.write_bytes

    def write_bytes(path: Path, data: bytes) -> int:
        if re.fullmatch(pattern, path.name):
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    def write_text(path: Path, text: str, encoding: str | None = None, **kwargs) -> int:
        return write_bytes(path, text.encode(encoding or "utf-8"))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)


def _no_temporary_files(root: Path) -> bool:
    return not [name for name in files_under(root) if ".tmp" in name]


# the temporary names of atomic writes: .<stem>.<random>.tmp<suffix>
@pytest.mark.parametrize(
    ("pattern", "file_name"),
    [
        (r"\.model_0000002\.\w+\.tmp\.safetensors", "model_0000002.safetensors"),
        (r"\.model_0000002\.state\.\w+\.tmp\.pth", "model_0000002.state.pth"),
        (r"\.model_0000002\.\w+\.tmp\.json", "model_0000002.json"),
        (r"\.last_checkpoint\.\w+\.tmp", "last_checkpoint"),
    ],
    ids=["weights-file", "state-file", "manifest", "pointer"],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_last(
    tmp_path, monkeypatch, pattern, file_name
):
    model, optimizer, scheduler, checkpointer = make(tmp_path)
    checkpointer.save(1)
    before = files_under(tmp_path)
    step(model, optimizer, scheduler)
    _fill_disk_on(monkeypatch, pattern)
    with pytest.raises(WriteError) as info:
        checkpointer.save(2)
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(f"{NO_SPACE} {tmp_path / file_name};") and "\n" not in message
    # nothing of the new checkpoint, no temporary file: the previous checkpoint stays last
    assert files_under(tmp_path) == before
    assert checkpointer.find_resumable() == "model_0000001"


def test_metrics_json_on_a_full_disk(tmp_path, monkeypatch):
    class FullFile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hooks, "open", FullFile, raising=False)
    with pytest.raises(WriteError, match=rf"^{NO_SPACE} .*metrics\.json;"):
        hooks.append_metrics(tmp_path / "metrics.json", {"iteration": 1})


def test_results_json_on_a_full_disk(tmp_path, monkeypatch):
    evaluator = SemSegEvaluator(2, class_names=["a", "b"], distributed=False)
    evaluator.process(np.array([[0, 1]]), np.array([[0, 1]]))
    results = evaluator.evaluate()
    _fill_disk_on(monkeypatch, r"\.results\.\w+\.tmp\.json")
    with pytest.raises(WriteError, match=rf"^{NO_SPACE} .*results\.json;"):
        write_results(results, tmp_path / "ade20k_150")
    assert "results.json" not in files_under(tmp_path / "ade20k_150")
    assert _no_temporary_files(tmp_path)


def test_config_yaml_on_a_full_disk(tmp_path, monkeypatch):
    import ovseg

    cfg = ovseg.get_config("tiny/dense_clip_tiny.yaml")
    _fill_disk_on(monkeypatch, r"\.config\.\w+\.tmp\.yaml")
    with pytest.raises(WriteError, match=rf"^{NO_SPACE} .*config\.yaml;"):
        save_config(cfg, tmp_path / "config.yaml")
    assert files_under(tmp_path) == []


def test_log_txt_on_a_full_disk_is_one_warning(tmp_path, capsys):
    train_net = load_script("tools/train_net.py")
    handler = train_net._LogFile(tmp_path / "log.txt", encoding="utf-8")

    class FullStream:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    handler.stream.close()
    handler.stream = FullStream()
    logger = logging.getLogger("ovseg.test_disk_full")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for index in range(3):
            logger.warning("line %d", index)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "log.txt" in lines[0]


def test_train_net_stops_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys, restore_ovseg_logging
):
    config = write_config(tmp_path / "toy.yaml", make_toy_dataset(tmp_path / "data", count=2))
    output = tmp_path / "run"
    _fill_disk_on(monkeypatch, r"\.model_0000002\.state\.\w+\.tmp\.pth")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = load_script("tools/train_net.py").main([
        "--config-file", str(config), "solver.max_iter", "3", "solver.checkpoint_period", "1",
        "solver.ims_per_batch", "2", "solver.log_period", "1", "output_dir", str(output),
    ])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {NO_SPACE} {output / 'model_0000002.state.pth'}; free some space " \
        "(or choose an output folder on another disk) and run again"
    names = files_under(output)
    assert [name for name in names if name.startswith("model_")] == [
        "model_0000001.json", "model_0000001.safetensors", "model_0000001.state.pth"]
    assert (output / "last_checkpoint").read_text().strip() == "model_0000001"
    assert _no_temporary_files(output)
