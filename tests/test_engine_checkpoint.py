"""Tests of ovseg.engine.checkpoint: what is stored, atomicity, verification, fallback, errors."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ovseg.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    atomic_write_bytes,
    rng_state,
    set_rng_state,
    trainable_state_dict,
)

REPO = Path(__file__).resolve().parents[1]


class Probe(nn.Module):
    """A frozen 'encoder' with a buffer, and a head with batch norm."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(4, classes), nn.BatchNorm1d(classes))


def make(tmp_path: Path, classes: int = 3, **kwargs):
    model = Probe(classes)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    return model, optimizer, scheduler, Checkpointer(model, tmp_path, optimizer=optimizer,
                                                     scheduler=scheduler, **kwargs)


def step(model: Probe, optimizer, scheduler) -> None:
    model.encoder.eval()  # frozen encoders stay in eval mode (as ClipEncoder does)
    loss = model.head(model.encoder(torch.randn(8, 4))).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_trainable_parts_only_and_everything_else_in_a_weights_only_file(tmp_path):
    model, optimizer, scheduler, checkpointer = make(tmp_path)
    step(model, optimizer, scheduler)
    manifest = checkpointer.save(1)
    stored = load_file(str(tmp_path / "model_0000001.safetensors"))
    assert set(stored) == {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias",
                           "head.1.running_mean", "head.1.running_var",
                           "head.1.num_batches_tracked"}
    assert set(trainable_state_dict(model, include_frozen=True)) == set(model.state_dict())
    state = torch.load(tmp_path / "model_0000001.state.pth", weights_only=True)
    assert state["iteration"] == 1 and state["world_size"] == 1
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    files = json.loads(manifest.read_text())["files"]
    assert set(files) == {"model_0000001.safetensors", "model_0000001.state.pth"}
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_resumed_step_equals_the_uninterrupted_one(tmp_path):
    model, optimizer, scheduler, checkpointer = make(tmp_path)
    step(model, optimizer, scheduler)
    checkpointer.save(1)
    step(model, optimizer, scheduler)  # draws its batch from the RNG state saved above

    fresh, fresh_optimizer, fresh_scheduler, fresh_checkpointer = make(tmp_path)
    # the frozen encoder comes from its own weights spec, not from the checkpoint
    fresh.encoder.load_state_dict(model.encoder.state_dict())
    torch.manual_seed(123)
    assert fresh_checkpointer.resume_or_load(resume=True) == 1
    assert fresh_scheduler.last_epoch == 1
    step(fresh, fresh_optimizer, fresh_scheduler)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_rng_state_round_trip():
    state = rng_state()
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == draws


def test_another_architecture_is_an_error_naming_the_keys(tmp_path):
    _, _, _, checkpointer = make(tmp_path, classes=3)
    checkpointer.save(5)
    other = Checkpointer(Probe(classes=5), tmp_path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: head\.0\.bias \(file "
                       r"\(3,\), model \(5,\)\), head\.0\.weight"):
        other.load("model_0000005", model_only=True)

    renamed = nn.Module()
    renamed.classifier = nn.Linear(4, 3)
    with pytest.raises(CheckpointError) as error:
        Checkpointer(renamed, tmp_path).load("model_0000005", model_only=True)
    assert "missing keys: classifier.bias, classifier.weight" in str(error.value)
    assert "unexpected keys: head.0.bias" in str(error.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: truncate(p / "model_0000002.safetensors"), r"has \d+ bytes, its manifest "
         r"says \d+ \(truncated\?\)"),
        (lambda p: truncate(p / "model_0000002.state.pth"), r"truncated\?"),
        (lambda p: (p / "model_0000002.state.pth").unlink(), "is missing"),
        (lambda p: (p / "model_0000002.json").unlink(), "incomplete: no manifest"),
        (lambda p: (p / "model_0000002.json").write_text("{"), "cannot read its manifest"),
    ],
)
def test_damaged_checkpoints_are_detected(tmp_path, damage, message):
    _, _, _, checkpointer = make(tmp_path)
    checkpointer.save(2)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        checkpointer.load("model_0000002")


def test_same_size_corruption_is_caught_by_the_sha256(tmp_path):
    _, _, _, checkpointer = make(tmp_path)
    checkpointer.save(2)
    path = tmp_path / "model_0000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* differs"):
        checkpointer.verify("model_0000002")


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog):
    model, optimizer, scheduler, checkpointer = make(tmp_path)
    for iteration in (1, 2, 3):
        step(model, optimizer, scheduler)
        checkpointer.save(iteration)
    truncate(tmp_path / "model_0000003.safetensors")
    (tmp_path / "model_0000002.json").write_text("not json")
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        assert checkpointer.find_resumable() == "model_0000001"
    assert "model_0000003" in caplog.text and "model_0000002" in caplog.text
    assert "resuming from the previous good checkpoint" in caplog.text
    assert "model_0000001.safetensors" in caplog.text
    _, _, _, fresh = make(tmp_path)
    assert fresh.resume_or_load(resume=True) == 1

    truncate(tmp_path / "model_0000001.state.pth")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpointer.find_resumable()


def test_no_checkpoint_means_start_from_zero(tmp_path):
    _, _, _, checkpointer = make(tmp_path)
    assert checkpointer.find_resumable() is None
    assert checkpointer.resume_or_load(resume=True) == 0


def test_an_interrupted_save_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer, scheduler, checkpointer = make(tmp_path)
    checkpointer.save(1)
    real_write = Path.write_bytes

    def dies_on_the_state_file(path, data):
        if path.name.startswith(".model_0000002.state."):
            # what a kill leaves: part of the temporary file, then nothing more
            real_write(path, data[:10])
            raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", dies_on_the_state_file)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2)
    monkeypatch.undo()
    # the weights are renamed into place only with the state file: nothing of model_0000002
    assert sorted(p.name for p in tmp_path.iterdir() if "0000002" in p.name) == []
    assert checkpointer.last_checkpoint() == "model_0000001"
    assert checkpointer.all_checkpoints() == ["model_0000001"]
    assert checkpointer.find_resumable() == "model_0000001"


def test_atomic_write_replaces_or_keeps(tmp_path, monkeypatch):
    target = tmp_path / "file"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]  # the temporary file is gone


def test_a_process_killed_while_saving_keeps_a_valid_last_checkpoint(tmp_path):
    # a real SIGKILL at an arbitrary moment of a loop of saves of a 4 MB model
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from ovseg.engine.checkpoint import Checkpointer
        model = torch.nn.Linear(1000, 1000)
        checkpointer = Checkpointer(model, {str(tmp_path)!r})
        for iteration in range(1, 10000):
            with torch.no_grad():
                model.weight.add_(1.0)
            checkpointer.save(iteration)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    pointer = tmp_path / "last_checkpoint"
    deadline = time.monotonic() + 60
    while not pointer.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    model = torch.nn.Linear(1000, 1000)
    checkpointer = Checkpointer(model, tmp_path)
    name = checkpointer.find_resumable()
    assert name is not None and name == checkpointer.last_checkpoint()
    checkpointer.load(name, model_only=True)
    assert torch.all(model.weight > int(name[len("model_"):]) - 1.5)


def test_max_to_keep_removes_the_oldest(tmp_path):
    _, _, _, checkpointer = make(tmp_path, max_to_keep=2)
    for iteration in (1, 2, 3, 4):
        checkpointer.save(iteration)
    assert checkpointer.all_checkpoints() == ["model_0000003", "model_0000004"]
    assert not (tmp_path / "model_0000001.safetensors").exists()


def test_load_weights_from_a_plain_state_dict_file(tmp_path):
    model = Probe()
    path = tmp_path / "head.pt"
    torch.save({"state_dict": trainable_state_dict(model)}, path)
    other = Probe()
    Checkpointer(other, tmp_path / "run").load_weights(path)
    assert torch.equal(other.head[0].weight, model.head[0].weight)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpointer(other, tmp_path).load_weights(tmp_path / "missing.pt")
