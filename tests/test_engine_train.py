"""End-to-end tests of training: ``tools/train_net.py`` run as a real process on a tiny dataset.

The dataset is a folder of 64x64 PNG images made of 16x16 cells of three noisy colours, with
label PNGs (two rows of ignore pixels) and a class file, registered as a custom dataset: a
linear probe on the tiny random CLIP learns it in a few hundred CPU iterations.

One uninterrupted reference run (300 iterations, checkpoints every 100) is shared: the
killed-and-resumed runs and the run resumed past a truncated checkpoint must end with its
weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
TINY_CONFIG = REPO / "configs" / "tiny" / "linear_probe_tiny.yaml"
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
IMAGE_SIZE, CELL = 64, 16
MAX_ITER, PERIOD = 300, 100


def make_toy_dataset(root: Path, count: int = 16, seed: int = 0) -> Path:
    """Write ``count`` images, labels and a class file under ``root``; returns ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    rng = np.random.default_rng(seed)
    cells = IMAGE_SIZE // CELL
    for index in range(count):
        label = np.kron(rng.integers(0, 3, (cells, cells)), np.ones((CELL, CELL), dtype=int))
        image = COLOURS[label] + rng.normal(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        label = label.astype(np.uint8)
        label[:2] = 255  # ignore pixels must stay out of the loss
        cv2.imwrite(str(root / "images" / f"{index:03d}.png"), image[:, :, ::-1])
        cv2.imwrite(str(root / "labels" / f"{index:03d}.png"), label)
    return root


def write_config(path: Path, data_root: Path, test: bool = False) -> Path:
    path.write_text(
        f"_base_: {TINY_CONFIG}\n"
        "datasets:\n"
        f"  root: {data_root}\n"
        "  custom:\n"
        "    - {name: toy, image_dir: images, label_dir: labels, class_file: classes.txt,"
        " image_ext: .png}\n"
        "  train: [toy]\n"
        f"  test: [{'toy' if test else ''}]\n"
        f"solver:\n  max_iter: {MAX_ITER}\n  checkpoint_period: {PERIOD}\n  log_period: 1\n"
    )
    return path


def _command(config: Path, output_dir: Path, args) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(config), *args, "output_dir",
            str(output_dir)]


def _env(extra: dict | None) -> dict:
    # one thread: the tiny model gains nothing from more, and a busy machine's spinning
    # OpenMP threads slow it tenfold
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def train_net(config: Path, output_dir: Path, *args: str, env: dict | None = None,
              expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run tools/train_net.py from the repository root, as a user would."""
    result = subprocess.run(_command(config, output_dir, args), cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=_env(env))
    if expect is not None:
        assert result.returncode == expect, result.stderr[-3000:]
    return result


def train_net_concurrently(*runs: tuple[Path, Path, list[str]]) -> list[str]:
    """Several train_net runs at once (each must succeed); their stderr texts."""
    processes = [subprocess.Popen(_command(config, output, args), cwd=REPO, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=_env(None))
                 for config, output, args in runs]
    stderrs = [process.communicate(timeout=300)[1] for process in processes]
    for process, stderr in zip(processes, stderrs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return stderrs


def final_weights(output_dir: Path, iteration: int = MAX_ITER) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / f"model_{iteration:07d}.safetensors"))


def metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("engine_toy")
    data = make_toy_dataset(base / "data")
    return {"base": base, "data": data, "config": write_config(base / "toy.yaml", data),
            "config_eval": write_config(base / "toy_eval.yaml", data, test=True)}


@pytest.fixture(scope="module")
def reference_run(toy) -> Path:
    """An uninterrupted run of MAX_ITER iterations, evaluated at the end."""
    output = toy["base"] / "reference"
    train_net(toy["config_eval"], output)
    return output


def test_tiny_model_trains_loss_falls_and_writes_outputs(reference_run):
    records = [r for r in metrics(reference_run) if "total_loss" in r]
    assert [r["iteration"] for r in records] == list(range(1, MAX_ITER + 1))
    losses = np.array([r["loss_ce"] for r in records])
    assert losses[0] > 0.9  # about log(3): the classifier starts near zero
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.5 * first, (first, last)
    assert all(r["lr"] > 0 and r["time"] > 0 and "eta_seconds" in r for r in records)

    for iteration in (100, 200, 300):
        for suffix in (".safetensors", ".state.pth", ".json"):
            assert (reference_run / f"model_{iteration:07d}{suffix}").is_file()
    assert (reference_run / "last_checkpoint").read_text().strip() == "model_0000300"
    # trainable parts only: the frozen CLIP is rebuilt from its own weights spec
    assert set(final_weights(reference_run)) == {"classifier.weight", "classifier.bias"}
    state = torch.load(reference_run / "model_0000300.state.pth", weights_only=True)
    assert state["iteration"] == MAX_ITER
    assert state["sampler"]["position"] == MAX_ITER * 8
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)

    saved = (reference_run / "config.yaml").read_text()
    assert "linear_probe" in saved and "max_iter: 300" in saved
    results = json.loads((reference_run / "toy" / "results.json").read_text())
    assert results["mIoU"] > 80


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_killed_run_resumes_to_bitwise_equal_weights(toy, reference_run, tmp_path, workers):
    output = tmp_path / "killed"
    workers_opt = ["dataloader.num_workers", str(workers)]
    # killed 10 iterations past its last checkpoint: the resumed run redoes them
    killed = train_net(toy["config"], output, *workers_opt,
                       env={"OVSEG_TEST_KILL_AFTER_ITER": "110"}, expect=None)
    assert killed.returncode == -signal.SIGKILL
    assert (output / "last_checkpoint").read_text().strip() == "model_0000100"
    assert not (output / "model_0000200.json").exists()

    resumed = train_net(toy["config"], output, "--resume", *workers_opt)
    assert "training from iteration 100 to 300" in resumed.stderr
    assert_bitwise_equal(final_weights(output), final_weights(reference_run))
    # the lines of iterations 101-110 written before the kill are not repeated
    iterations = [r["iteration"] for r in metrics(output) if "total_loss" in r]
    assert iterations == list(range(1, MAX_ITER + 1))
    resumed_state = torch.load(output / "model_0000300.state.pth", weights_only=True)
    reference_state = torch.load(reference_run / "model_0000300.state.pth", weights_only=True)
    for key, value in reference_state["optimizer"]["state"][0].items():
        assert torch.equal(resumed_state["optimizer"]["state"][0][key], value), key


def test_truncated_checkpoint_is_detected_and_resume_uses_previous(toy, reference_run, tmp_path):
    from ovseg.engine.checkpoint import Checkpointer, CheckpointError

    output = tmp_path / "truncated"
    shutil.copytree(reference_run, output)
    newest = output / "model_0000300.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    checkpointer = Checkpointer(torch.nn.Linear(1, 1), output)
    with pytest.raises(CheckpointError, match=r"model_0000300\.safetensors has \d+ bytes, its "
                       r"manifest says \d+ \(truncated\?\)"):
        checkpointer.verify("model_0000300")

    resumed = train_net(toy["config"], output, "--resume")
    one_line = " ".join(resumed.stderr.split())
    assert "model_0000300" in one_line and "corrupt" in one_line
    assert "resuming from the previous good checkpoint" in one_line
    assert "model_0000200.safetensors" in one_line
    assert "training from iteration 200 to 300" in resumed.stderr
    assert_bitwise_equal(final_weights(output), final_weights(reference_run))


def test_two_processes_match_one_process_with_twice_the_batch(toy, tmp_path):
    # SGD keeps the update linear in the gradient (Adam's g / sqrt(v) would magnify the
    # rounding differences of near-zero gradients)
    opts = ["solver.max_iter", "8", "solver.optimizer", "sgd", "solver.base_lr", "0.5",
            "solver.warmup_iters", "0", "solver.ims_per_batch", "8"]
    one, two = train_net_concurrently(
        (toy["config"], tmp_path / "one", ["--num-gpus", "1", *opts]),
        (toy["config"], tmp_path / "two", ["--num-gpus", "2", *opts]),
    )
    assert "1 processes x 1 accumulation x 8" in one
    assert "2 processes x 1 accumulation x 4" in two
    weights_one, weights_two = (final_weights(tmp_path / d, 8) for d in ("one", "two"))
    for key in weights_one:
        assert not torch.equal(weights_one[key], torch.zeros_like(weights_one[key]))
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-4, atol=1e-6)
    losses_one = [r["loss_ce"] for r in metrics(tmp_path / "one")]
    losses_two = [r["loss_ce"] for r in metrics(tmp_path / "two")]
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4)
    assert losses_one[-1] < losses_one[0]


def test_training_free_method_is_one_error_line(toy, tmp_path):
    config = tmp_path / "free.yaml"
    config.write_text(f"_base_: {REPO / 'configs' / 'tiny' / 'dense_clip_tiny.yaml'}\n")
    result = train_net(config, tmp_path / "out", expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: method dense_clip is training-free; use --eval-only"
    )


def test_config_mistake_is_one_error_line_before_any_process_starts(toy, tmp_path):
    result = train_net(toy["config"], tmp_path / "out", "--num-gpus", "2", "solver.max_itr",
                       "5", expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "solver.max_iter" in lines[0]  # the suggestion


def test_eval_only_resume_evaluates_the_trained_weights(toy, reference_run, tmp_path):
    output = tmp_path / "eval"
    shutil.copytree(reference_run, output)
    shutil.rmtree(output / "toy")
    train_net(toy["config_eval"], output, "--eval-only", "--resume")
    ours = json.loads((output / "toy" / "results.json").read_text())
    reference = json.loads((reference_run / "toy" / "results.json").read_text())
    assert ours["mIoU"] == reference["mIoU"]
