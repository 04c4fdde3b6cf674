"""Tests of ovseg.io: atomic writes, sha256 helpers, safe state-dict loading."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ovseg import io as ovseg_io
from ovseg.errors import WeightsError
from ovseg.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    describe_mismatch,
    load_state_dict_file,
    sha256_bytes,
    sha256_file,
)


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_folders_and_returns_the_path(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert atomic_write_text(str(tmp_path / "t.txt"), "é\n") == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    assert _names(tmp_path) == ["a", "t.txt"]


def test_atomic_write_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("a long old content that must not survive in part\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert _names(tmp_path) == ["file.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_temporary_file_and_the_old_file(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "file.png"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(target) as temporary:
        temporary.write_bytes(b"half of the new")
        raise error
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["file.png"]


# the data is in the temporary file when flushing it to disk or renaming it fails
@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failing_sync_or_rename_keeps_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def fail(*args: object) -> None:
        raise OSError(f"{step} failed: no space left on device")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(OSError, match=f"{step} failed"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["file.bin"]


def test_a_block_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no file was written"), atomic_path(tmp_path / "x.png"):
        pass
    assert _names(tmp_path) == []


def test_temporary_file_is_hidden_beside_the_target_with_its_extension(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.png") as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".x.") and temporary.suffix == ".png"
        temporary.write_bytes(b"png")
    assert _names(tmp_path) == ["x.png"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_follow_the_umask_unless_a_mode_is_given(tmp_path: Path, umask: None) -> None:
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    atomic_write_text(tmp_path / "config.yaml", "x", mode=0o644)
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
    os.umask(0o022)
    atomic_write_text(tmp_path / "shared.txt", "x")
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])  # empty, small, more than one block
def test_sha256_helpers_agree_with_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == expected
    assert sha256_file(path) == expected
    assert sha256_file(str(path)) == expected


# --------------------------------------------------------------------------- state dicts


def _state() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2)}


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.pth", "w.bin"])
def test_state_dict_files_load_back(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(_state(), str(path))
    else:
        torch.save({"state_dict": _state()}, path)  # a wrapper key is unwrapped
    loaded = load_state_dict_file(path)
    assert set(loaded) == {"weight", "bias"}
    assert torch.equal(loaded["weight"], _state()["weight"])


class _Payload:
    """A pickled class: weights_only loading refuses it."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"not a torch file", "cannot read weights file"),
        ({"weight": _Payload()}, "cannot read weights file"),
        ({"weight": [1, 2]}, "does not hold a state dict of tensors"),
    ],
)
def test_unloadable_files_are_one_weights_error_naming_the_file(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message) as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value)


def test_describe_mismatch_names_missing_unexpected_and_reshaped_keys() -> None:
    model = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    state = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    assert describe_mismatch(model, model, state) == [
        "missing keys: c",
        "unexpected keys: d",
        "shape mismatches: b (file (4,), model (3,))",
    ]
    assert describe_mismatch(model, model, dict(model)) == []
    many = {f"k{i}": torch.zeros(1) for i in range(7)}
    assert describe_mismatch(many, many, {}, listed=5) == [
        "missing keys: k0, k1, k2, k3, k4 and 2 more"
    ]


def test_encoders_weights_reexports_the_io_loaders() -> None:
    from ovseg.encoders import weights

    assert weights.load_state_dict_file is ovseg_io.load_state_dict_file
    assert weights.describe_mismatch is ovseg_io.describe_mismatch


def test_io_imports_neither_torch_nor_other_ovseg_layers() -> None:
    # the bottom layer stays cheap to import: config saving and hashing need no torch
    code = (
        "import sys, ovseg.io; "
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('ovseg.')); "
        "print(','.join(loaded))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "ovseg.errors,ovseg.io"
