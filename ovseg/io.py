"""File input/output shared by every layer: atomic writes, sha256, safe state-dict loading.

Atomic writes go to a temporary file in the destination's folder, which is flushed to disk and
renamed over the destination only when the write succeeded, so readers (and a process that
resumes after a crash) see the old file or the new one, never part of one, and a failed or
interrupted write leaves no temporary file behind; a full disk is one ``WriteError`` line naming
the file. State dicts are read with ``torch.load(weights_only=True)`` or safetensors, never by
unpickling code; a file they cannot read is one ``WeightsError`` line saying why.

The bottom layer of the package: it imports nothing of ovseg but ``ovseg.errors``, and torch
only when a state dict is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovseg.errors import WeightsError, WriteError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayCache",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_mismatch",
    "ensure_writable_dir",
    "load_state_dict_file",
    "raise_if_disk_full",
    "sha256_bytes",
    "sha256_file",
    "unreadable_reason",
]

logger = logging.getLogger(__name__)

# checkpoints often wrap the state dict in one of these keys
_WRAPPER_KEYS = ("state_dict", "model", "module")
_HASH_BLOCK = 1 << 20
# errno values that mean "the device (or the user's quota) is full"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


# --------------------------------------------------------------------------- atomic writes


def raise_if_disk_full(path: str | os.PathLike[str], error: BaseException) -> None:
    """Raise a one-line :class:`WriteError` naming ``path`` when ``error`` says the disk (or the
    quota) is full; return otherwise, so the caller re-raises ``error`` as it is."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        raise WriteError(
            f"no space left on device while writing {path}; free some space (or choose an "
            "output folder on another disk) and run again"
        ) from error


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output_dir") -> Path:
    """Create the folder ``path`` if needed and check that a file can be created in it.

    The check creates and removes a probe file, because permission bits do not tell (root
    writes into a read-only folder; a read-only mount refuses everyone). A folder this call
    created is removed again when the check fails, so nothing is left behind.

    Returns:
        the folder.

    Raises:
        WriteError: one line naming the folder: it is a file, cannot be created, is not
            writable, or its disk is full.
    """
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"{what} {directory} is a file, not a folder; choose another {what}")
    missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(
            f"cannot create {what} {directory}: {error.strerror or error}"
        ) from error
    probe = directory / f".ovseg-write-test-{uuid.uuid4().hex[:12]}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(descriptor, b"0")
        finally:
            os.close(descriptor)
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise_if_disk_full(directory, error)
        raise WriteError(
            f"{what} {directory} is not writable ({error.strerror or error}); choose another "
            f"{what} or fix its permissions"
        ) from error
    probe.unlink()
    return directory


def _fsync_dir(directory: Path) -> None:
    # a rename is durable only once the directory entry is on disk
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Give a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The temporary file lies in the same folder as ``path`` (so the final ``os.replace`` is an
    atomic rename on one file system) and keeps its extension (so writers that choose the
    format by extension, like ``cv2.imwrite``, write the right one). The folder is created if
    needed. The file is flushed to disk before the rename, so a crash cannot leave an empty
    file under the final name, and the folder after it, so the rename itself survives a crash.

    Args:
        path: the destination.
        mode: permission bits for the file (e.g. ``0o644``); default: whatever the writer
            creates, i.e. the user's umask.

    Yields:
        the temporary path; the block must create the file there.

    Raises:
        WriteError: the disk (or quota) is full; one line naming ``path``.
        OSError: the block wrote no file, or creating, syncing or renaming it failed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name per call instead of tempfile.mkstemp: mkstemp's 0600 mode would stick to
    # the final file, while creating it normally honours the user's umask
    temporary = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.tmp{final.suffix}")
    try:
        yield temporary
        if not temporary.is_file():
            raise OSError(f"writing {final} failed: no file was written")
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, final)
    except BaseException as error:
        # BaseException too: Ctrl-C during a write must not leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise_if_disk_full(final, error)
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, mode: int | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path, mode) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, mode: int | None = None, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), mode)


# --------------------------------------------------------------------------- array cache


class ArrayCache:
    """Arrays on disk, one ``.npz`` per key: ``<dir>/<k[:2]>/<k>.npz`` for the sha256 ``k`` of
    ``digest`` and the key, written atomically. Whatever the entries depend on besides the key
    (model weights, settings) goes into ``digest``: a change gives other names, so stale
    entries are never read (they stay on disk until the folder is removed)."""

    def __init__(self, directory: str | os.PathLike[str], digest: str, what: str = "cache"):
        self.directory = Path(directory).expanduser()
        self.digest = digest
        self.what = what

    def path(self, key: str) -> Path:
        name = hashlib.sha256(f"{self.digest}\n{key}".encode()).hexdigest()
        return self.directory / name[:2] / f"{name}.npz"

    def load(self, key: str, decode: Callable[[Any], Any]) -> Any | None:
        """``decode`` of the stored arrays (an ``np.load`` mapping) of ``key``; None when the
        entry is missing, or damaged (then a warning: the caller recomputes and overwrites)."""
        import numpy as np

        path = self.path(key)
        try:
            with np.load(path) as stored:
                return decode(stored)
        except FileNotFoundError:
            return None
        except Exception as exc:
            logger.warning("%s file %s is unreadable (%s); recomputing it", self.what, path, exc)
            return None

    def save(self, key: str, **arrays: Any) -> None:
        """Store numpy ``arrays`` under ``key`` (atomically)."""
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.path(key), buffer.getvalue())


# --------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    """The sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of the file at ``path``, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- state dicts


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A dict wrapping the weights under ``state_dict``/``model``/``module`` is unwrapped.

    Raises:
        WeightsError: one line: the file is missing, unreadable (empty, truncated, corrupt, a
            pickle with code in it) or holds no dict of tensors.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; download the checkpoint on a machine with "
            "network access and pass its local path"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = _torch_load(path)
    except Exception as exc:  # corrupt or truncated file, or a pickle with code in it
        raise WeightsError(
            f"cannot read weights file {path}: {unreadable_reason(path, exc)}"
        ) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def unreadable_reason(path: str | os.PathLike[str], error: BaseException) -> str:
    """Why safetensors or ``torch.load(weights_only=True)`` could not read ``path``, in one
    short line without torch's paragraphs of advice (the file is not trusted code)."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (
            f"it holds pickled code or objects other than tensors ({blocked.group(1).rstrip('.')}"
            "), and weights are only read with torch.load(weights_only=True); if you trust "
            "the file, load it yourself and save its state dict as .safetensors"
        )
    if "Weights only load failed" in text:
        return ("it is a pickle that torch.load(weights_only=True) cannot read, not a state "
                "dict saved with torch.save")
    # torch and safetensors explain at length; their first sentence says what happened
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0].strip().rstrip(".")[:200]
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    detail = f" ({first})" if first and not first.isdigit() else ""
    return f"it is truncated, damaged or not a {kind} weights file{detail}"


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; OpenAI's CLIP files are TorchScript archives instead."""
    import torch

    try:
        with warnings.catch_warnings():
            # the weights-only unpickler warns about the pickle protocol of plain pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        if "TorchScript" not in str(exc):
            raise
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def describe_mismatch(
    required: Mapping[str, torch.Tensor],
    known: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    listed: int = 5,
) -> list[str]:
    """What keeps ``state`` from loading, as parts of an error message (empty when it fits).

    required: keys ``state`` must hold; known: every key the model has, with its tensor.
    """
    missing = sorted(set(required) - set(state))
    unexpected = sorted(set(state) - set(known))
    wrong_shape = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(known[key].shape)})"
        for key in set(state) & set(known)
        if tuple(state[key].shape) != tuple(known[key].shape)
    )

    def names(keys: list[str]) -> str:
        more = f" and {len(keys) - listed} more" if len(keys) > listed else ""
        return ", ".join(keys[:listed]) + more

    parts = []
    if missing:
        parts.append(f"missing keys: {names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {names(unexpected)}")
    if wrong_shape:
        parts.append(f"shape mismatches: {names(wrong_shape)}")
    return parts
