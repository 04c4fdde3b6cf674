"""Resumable evaluation (issue 23): an interrupted ``--eval-only`` run continues with
``--resume`` from each process's saved confusion matrix and finished images, and ends with the
matrix of an uninterrupted run, bit for bit.

In-process tests interrupt ``evaluate_model`` by a ``predict`` that raises after k images; the
command-line test SIGKILLs one of two evaluation processes (slowed by a wrapper of
``tools/train_net.py`` that its spawned processes import too) and resumes the run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ovseg
from ovseg.engine.evaluate import STATE_DIR, evaluate_model
from ovseg.errors import ConfigError
from ovseg.evaluation.sem_seg import EvaluationError, SemSegEvaluator
from tests.helpers import REPO_ROOT
from tests.robustness.test_run_processes import _children
from tests.test_engine_train import make_toy_dataset

IMAGES = 7
BENCHMARK = "toy_eval"


def write_config(path: Path, data_root: Path, every: int) -> Path:
    path.write_text(
        f"_base_: {REPO_ROOT / 'configs' / 'tiny' / 'dense_clip_tiny.yaml'}\n"
        "datasets:\n"
        f"  root: {data_root}\n"
        "  custom:\n"
        f"    - {{name: {BENCHMARK}, image_dir: images, label_dir: labels,"
        " class_file: classes.txt, image_ext: .png}\n"
        f"  test: [{BENCHMARK}]\n"
        f"evaluation:\n  checkpoint_every: {every}\n"
    )
    return path


class Interrupted(Exception):
    """Stands for a crash in the middle of an evaluation."""


class Recorder:
    """Counts ``predict`` calls (raising after ``fail_after``) and keeps the final matrix."""

    def __init__(self, monkeypatch, model, fail_after: int | None = None):
        self.calls = 0
        self.matrices: list[np.ndarray] = []
        predict = model.predict

        def counted_predict(*args, **kwargs):
            if fail_after is not None and self.calls >= fail_after:
                raise Interrupted
            self.calls += 1
            return predict(*args, **kwargs)

        evaluate = SemSegEvaluator.evaluate

        def recording_evaluate(evaluator):
            self.matrices.append(evaluator.confusion_matrix)
            return evaluate(evaluator)

        monkeypatch.setattr(model, "predict", counted_predict)
        monkeypatch.setattr(SemSegEvaluator, "evaluate", recording_evaluate)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_resume")
    data = make_toy_dataset(base / "data", count=IMAGES)
    cfg = ovseg.get_config(write_config(base / "toy.yaml", data, every=2))
    return cfg, ovseg.build_model(cfg).eval()


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run: results and the confusion matrix."""
    cfg, model = setup
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch, model)
        results = evaluate_model(model, cfg, tmp_path_factory.mktemp("reference"))
    assert recorder.calls == IMAGES
    return results[BENCHMARK], recorder.matrices[0]


def _interrupt(model, cfg, output: Path, monkeypatch, after: int) -> None:
    with monkeypatch.context() as patch:
        Recorder(patch, model, fail_after=after)
        with pytest.raises(Interrupted):
            evaluate_model(model, cfg, output)


def _saved(output: Path) -> dict:
    with np.load(output / BENCHMARK / STATE_DIR / "rank0_of1.npz") as state:
        return {key: state[key] for key in state.files}


def test_resume_after_an_interruption_gives_the_same_matrix(setup, reference, tmp_path,
                                                            monkeypatch):
    cfg, model = setup
    output = tmp_path / "run"
    _interrupt(model, cfg, output, monkeypatch, after=5)
    # saved every 2 images: images 0-3 are in the state, image 4 is not
    saved = _saved(output)
    assert list(saved["finished"]) == [0, 1, 2, 3] and int(saved["num_images"]) == 4
    recorder = Recorder(monkeypatch, model)
    results = evaluate_model(model, cfg, output, resume=True)[BENCHMARK]
    assert recorder.calls == IMAGES - 4  # the finished images are not predicted again
    expected_results, expected_matrix = reference
    np.testing.assert_array_equal(recorder.matrices[0], expected_matrix)
    assert recorder.matrices[0].dtype == expected_matrix.dtype == np.int64
    assert results == expected_results  # mIoU, mAcc, per-class counts: exactly
    written = json.loads((output / BENCHMARK / "results.json").read_text())
    assert written["protocol"]["images_resumed"] == 4
    assert not (output / BENCHMARK / STATE_DIR).exists()  # removed with the results


def test_without_resume_a_saved_state_is_discarded(setup, reference, tmp_path, monkeypatch):
    cfg, model = setup
    output = tmp_path / "run"
    _interrupt(model, cfg, output, monkeypatch, after=3)
    assert (output / BENCHMARK / STATE_DIR / "rank0_of1.npz").is_file()
    recorder = Recorder(monkeypatch, model)
    results = evaluate_model(model, cfg, output)[BENCHMARK]
    assert recorder.calls == IMAGES
    assert results == reference[0]
    assert not (output / BENCHMARK / STATE_DIR).exists()


def test_a_state_of_another_config_is_not_mixed_in(setup, reference, tmp_path, monkeypatch,
                                                   caplog):
    cfg, model = setup
    output = tmp_path / "run"
    _interrupt(model, cfg, output, monkeypatch, after=5)
    other = cfg.copy()
    other.model.inference.stride = 48  # other predictions: the saved counts do not belong
    recorder = Recorder(monkeypatch, model)
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        evaluate_model(model, other, output, resume=True)
    assert recorder.calls == IMAGES
    assert "saved by a run with another config;" in caplog.text and "afresh" in caplog.text


def test_a_state_of_another_number_of_processes_is_not_mixed_in(setup, reference, tmp_path,
                                                                monkeypatch, caplog):
    cfg, model = setup
    output = tmp_path / "run"
    _interrupt(model, cfg, output, monkeypatch, after=5)
    state_dir = output / BENCHMARK / STATE_DIR
    (state_dir / "rank0_of1.npz").rename(state_dir / "rank1_of2.npz")
    recorder = Recorder(monkeypatch, model)
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        results = evaluate_model(model, cfg, output, resume=True)[BENCHMARK]
    assert recorder.calls == IMAGES
    assert results == reference[0]
    assert "another number of processes" in caplog.text


def test_checkpoint_every_zero_saves_nothing(setup, tmp_path, monkeypatch):
    cfg, model = setup
    off = cfg.copy()
    off.evaluation.checkpoint_every = 0
    _interrupt(model, off, tmp_path / "run", monkeypatch, after=5)
    assert not (tmp_path / "run" / BENCHMARK / STATE_DIR).exists()


def test_checkpoint_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="evaluation.checkpoint_every"):
        ovseg.get_config("tiny/dense_clip_tiny.yaml", ["evaluation.checkpoint_every", "-1"])


def test_evaluator_state_round_trip():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, (5, 6)) for _ in range(4)]
    predictions = [rng.integers(0, 4, (5, 6)) for _ in range(4)]
    whole = SemSegEvaluator(4, distributed=False)
    whole.process_batch(predictions, labels)
    first = SemSegEvaluator(4, distributed=False)
    first.process_batch(predictions[:2], labels[:2])
    second = SemSegEvaluator(4, distributed=False)
    second.load_state_dict(dict(np.load(_savez(first.state_dict()))))
    second.process_batch(predictions[2:], labels[2:])
    np.testing.assert_array_equal(second.confusion_matrix, whole.confusion_matrix)
    assert second.evaluate() == whole.evaluate()
    with pytest.raises(EvaluationError, match=r"\(4, 4\)"):
        second.load_state_dict({**first.state_dict(), "matrix": np.zeros((3, 3), np.int64)})


def _savez(arrays: dict) -> object:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------- command line

KILL_IMAGES = 12
# seconds per image in the slowed run: the kill lands while both processes have images left
DELAY = 0.5

_SLOW_TRAIN_NET = """\
import sys
import time

sys.path.insert(0, {tools!r})

from ovseg.evaluation.sem_seg import SemSegEvaluator

_process = SemSegEvaluator.process


def _slow_process(self, *args, **kwargs):
    time.sleep({delay!r})
    return _process(self, *args, **kwargs)


# module level: the spawned evaluation processes import this file again as __mp_main__
SemSegEvaluator.process = _slow_process

import train_net  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_net.main())
"""


def _workers(pid: int) -> list[int]:
    """Spawned multiprocessing children of ``pid`` (Linux /proc)."""
    found = []
    for child in _children(pid):
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(child)
    return found


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """A config of KILL_IMAGES images (saved after every image), the slowed train_net wrapper
    and the results of an uninterrupted in-process evaluation."""
    base = tmp_path_factory.mktemp("eval_kill")
    config = write_config(base / "toy.yaml", make_toy_dataset(base / "data", count=KILL_IMAGES),
                          every=1)
    wrapper = base / "slow_train_net.py"
    wrapper.write_text(_SLOW_TRAIN_NET.format(tools=str(REPO_ROOT / "tools"), delay=DELAY))
    cfg = ovseg.get_config(config)
    expected = evaluate_model(ovseg.build_model(cfg).eval(), cfg, base / "reference")
    return config, wrapper, expected[BENCHMARK]


def _kill_and_resume(kill_setup, output: Path, processes: int) -> None:
    """Start the slowed evaluation, SIGKILL it (one of the evaluation processes when there
    are several, else the command itself) once every process saved its state, check the
    failure, resume with --resume and check the results against the uninterrupted run."""
    config, wrapper, expected = kill_setup
    command = ["--config-file", str(config), "--eval-only", "--num-gpus", str(processes),
               "output_dir", str(output)]
    launcher = subprocess.Popen([sys.executable, str(wrapper), *command], cwd=REPO_ROOT,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    state_dir = output / BENCHMARK / STATE_DIR
    pattern = f"rank*_of{processes}.npz"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(state_dir.glob(pattern))) < processes:
            time.sleep(0.05)
        assert len(list(state_dir.glob(pattern))) == processes, "no evaluation state written"
        if processes > 1:
            workers = _workers(launcher.pid)
            assert len(workers) == processes, workers
            os.kill(workers[-1], signal.SIGKILL)
        else:
            os.kill(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    if processes > 1:
        # the launcher reports the death in one line, as its last
        assert launcher.returncode == 2, stderr[-3000:]
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert last.startswith("error: an evaluation process died"), stderr[-3000:]
        assert "Traceback" not in stderr
    else:
        assert launcher.returncode == -signal.SIGKILL
    assert not (output / BENCHMARK / "results.json").exists()
    done = 0
    for path in state_dir.glob(pattern):
        with np.load(path) as state:
            done += len(state["finished"])
    assert 0 < done < KILL_IMAGES

    # --resume: the unslowed command line continues from the saved state
    resumed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), *command, "--resume"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((output / BENCHMARK / "results.json").read_text())
    assert results["protocol"]["images_resumed"] == done
    assert results["protocol"]["processes"] == processes
    assert results["num_images"] == KILL_IMAGES
    assert not state_dir.exists()
    # the numbers of an uninterrupted evaluation (one process gives those of two)
    for key in ("mIoU", "mAcc", "pAcc", "fwIoU", "pixels", "per_class"):
        assert results[key] == expected[key], key


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_killed_evaluation_resumes_from_the_command_line(kill_setup, tmp_path):
    _kill_and_resume(kill_setup, tmp_path / "run", processes=1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killing_one_of_two_evaluation_processes_then_resuming(kill_setup, tmp_path):
    _kill_and_resume(kill_setup, tmp_path / "run", processes=2)
