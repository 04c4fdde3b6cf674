"""Checkpoints: atomic, verified saves of a training run, and exact resumption.

A checkpoint of iteration ``i`` in the output directory is three files:

- ``model_{i:07d}.safetensors``: the model's trainable parameters (and the buffers of the
  modules that own them); frozen encoders only with ``include_frozen``;
- ``model_{i:07d}.state.pth``: everything else a resumed run needs - iteration, optimizer,
  LR scheduler, AMP grad scaler, sampler position, the RNG states (python, numpy, torch CPU,
  CUDA) of every process - readable with ``torch.load(weights_only=True)``;
- ``model_{i:07d}.json``: the manifest, with the size and sha256 of the two files.

Both data files are written to temporary files in the same directory and renamed over their
final names only when both are complete; then the manifest, then the ``last_checkpoint``
pointer (a text file with the checkpoint's name, also renamed into place). A process killed at
any point leaves the last complete checkpoint and the pointer to it intact; a save that fails
(a full disk: one ``WriteError`` line naming the file) removes what it wrote of the new
checkpoint, so no data file is left without its manifest. A checkpoint whose files do not
match its manifest (truncated, overwritten) is reported as corrupt; resuming then falls back to
the newest checkpoint that verifies, with a warning naming both.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ovseg.engine import comm
from ovseg.errors import OvsegError
from ovseg.io import (
    atomic_path,
    atomic_write_bytes,
    describe_mismatch,
    load_state_dict_file,
    sha256_bytes,
    sha256_file,
    unreadable_reason,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ovseg-checkpoint/1"
POINTER_FILE = "last_checkpoint"
MODEL_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pth"
MANIFEST_SUFFIX = ".json"
_NAME = re.compile(r"^model_(\d{7,})$")


class CheckpointError(OvsegError, RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another architecture."""


def checkpoint_name(iteration: int) -> str:
    """``model_0001000`` for iteration 1000 (completed optimizer steps)."""
    return f"model_{iteration:07d}"


# --------------------------------------------------------------------------- model state


def trainable_state_dict(model: nn.Module, include_frozen: bool = False) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` a checkpoint stores.

    By default: every parameter with ``requires_grad``, and the persistent buffers of modules
    that own such a parameter (e.g. batch-norm statistics of a trained head). Frozen encoders
    are rebuilt from their own weights spec, so storing them would only copy them.
    """
    full = model.state_dict()
    if include_frozen:
        return dict(full)
    keep: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [(name, p) for name, p in module.named_parameters(recurse=False)]
        if not any(p.requires_grad for _, p in own):
            continue
        keep.update(prefix + name for name, p in own if p.requires_grad)
        keep.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return {key: value for key, value in full.items() if key in keep}


def load_model_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    include_frozen: bool = False,
) -> None:
    """Load a checkpoint's model state into ``model``; any mismatch is one CheckpointError.

    Every key of ``trainable_state_dict(model, include_frozen)`` must be in ``state`` with the
    same shape; ``state`` may hold more keys of ``model`` (a checkpoint with frozen parts), but
    no key ``model`` lacks.

    Raises:
        CheckpointError: naming the missing, unexpected and wrongly shaped keys.
    """
    full = model.state_dict()
    problems = describe_mismatch(trainable_state_dict(model, include_frozen), full, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model {type(model).__name__} (another "
            f"architecture or number of classes?); " + "; ".join(problems)
        )
    model.load_state_dict(dict(state), strict=False)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and every CUDA device.

    Stored as tuples, ints and tensors only, so ``torch.load(weights_only=True)`` reads them.
    """
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["key"].numpy().astype(np.uint32), int(numpy_state["pos"]),
        int(numpy_state["has_gauss"]), float(numpy_state["gauss"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint holds CUDA RNG states of %d devices, this machine has "
                           "%d; CUDA RNG not restored", len(cuda_states),
                           torch.cuda.device_count())


def _as_tuple(value: Any) -> Any:
    # python's random.setstate wants tuples all the way down; a reader may give lists
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


# --------------------------------------------------------------------------- files


def _serialize_model(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return save(tensors, metadata=metadata)


def _serialize_torch(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores a training run in ``save_dir`` (see the module docstring).

    Args:
        model: the method (unwrapped, not the DDP wrapper).
        save_dir: the run's output directory.
        include_frozen: also store parameters without ``requires_grad``.
        max_to_keep: keep the newest N checkpoints; 0 keeps all.
        checkpointables: objects with ``state_dict``/``load_state_dict`` stored in the state
            file under their keyword (optimizer, scheduler, scaler, sampler).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str | os.PathLike[str],
        *,
        include_frozen: bool = False,
        max_to_keep: int = 0,
        **checkpointables: Any,
    ) -> None:
        self.model = model
        self.save_dir = Path(save_dir)
        self.include_frozen = include_frozen
        self.max_to_keep = max_to_keep
        self.checkpointables = {k: v for k, v in checkpointables.items() if v is not None}

    # ---- paths -------------------------------------------------------------------------------
    def paths(self, name: str) -> dict[str, Path]:
        """``{"model", "state", "manifest"}`` paths of checkpoint ``name``."""
        return {
            "model": self.save_dir / f"{name}{MODEL_SUFFIX}",
            "state": self.save_dir / f"{name}{STATE_SUFFIX}",
            "manifest": self.save_dir / f"{name}{MANIFEST_SUFFIX}",
        }

    def last_checkpoint(self) -> str | None:
        """The name ``last_checkpoint`` points to (not verified), or None."""
        pointer = self.save_dir / POINTER_FILE
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return name or None

    def has_checkpoint(self) -> bool:
        return self.last_checkpoint() is not None

    def all_checkpoints(self) -> list[str]:
        """Names of the checkpoints with a manifest here, oldest first."""
        names = []
        for manifest in self.save_dir.glob(f"model_*{MANIFEST_SUFFIX}"):
            name = manifest.name[: -len(MANIFEST_SUFFIX)]
            if _NAME.match(name):
                names.append(name)
        return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))

    # ---- save --------------------------------------------------------------------------------
    def save(self, iteration: int, **extra: Any) -> Path | None:
        """Save checkpoint ``model_{iteration:07d}`` and point ``last_checkpoint`` at it.

        Collective: every process calls it (each hands over its RNG state); rank 0 writes.
        ``extra``: more values for the state file (tensors, numbers, strings, containers).

        Returns:
            the manifest path on rank 0, None on the other ranks.

        Raises:
            WriteError: the disk is full (one line naming the file); the new checkpoint's
                files are removed, the previous checkpoint stays the last one.
        """
        rng_states = comm.all_gather_objects(rng_state())
        if not comm.is_main_process():
            return None
        name = checkpoint_name(iteration)
        paths = self.paths(name)
        model_bytes = _serialize_model(
            trainable_state_dict(self.model, self.include_frozen),
            {"format": CHECKPOINT_FORMAT, "iteration": str(iteration)},
        )
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": int(iteration),
            "world_size": comm.get_world_size(),
            "rng": rng_states,
            **{key: obj.state_dict() for key, obj in self.checkpointables.items()},
            **extra,
        }
        state_bytes = _serialize_torch(state)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "iteration": int(iteration),
            "files": {
                paths[key].name: {"bytes": len(data), "sha256": sha256_bytes(data)}
                for key, data in (("model", model_bytes), ("state", state_bytes))
            },
        }
        try:
            # both data files are complete before either is renamed into place; the manifest
            # goes after them (a checkpoint without one is incomplete), the pointer last. Each
            # file is written inside its own block, so a full disk names the right file.
            with atomic_path(paths["model"]) as model_temporary:
                model_temporary.write_bytes(model_bytes)
                with atomic_path(paths["state"]) as state_temporary:
                    state_temporary.write_bytes(state_bytes)
            atomic_write_bytes(paths["manifest"],
                               (json.dumps(manifest, indent=1) + "\n").encode())
            atomic_write_bytes(self.save_dir / POINTER_FILE, f"{name}\n".encode())
        except BaseException:
            # the pointer still names the previous checkpoint: remove every file of this one
            # (manifest first, so a half-removed checkpoint never passes as complete)
            for key in ("manifest", "model", "state"):
                with contextlib.suppress(OSError):
                    paths[key].unlink(missing_ok=True)
            raise
        logger.info("saved checkpoint %s", paths["model"])
        self._remove_old(keep=name)
        return paths["manifest"]

    def _remove_old(self, keep: str) -> None:
        if self.max_to_keep <= 0:
            return
        names = [n for n in self.all_checkpoints() if n != keep]
        for name in names[: max(0, len(names) - (self.max_to_keep - 1))]:
            paths = self.paths(name)
            # manifest first, so a half-removed checkpoint never passes as complete
            for key in ("manifest", "model", "state"):
                paths[key].unlink(missing_ok=True)

    # ---- verify and load ---------------------------------------------------------------------
    def verify(self, name: str) -> None:
        """Check checkpoint ``name`` against its manifest (sizes and sha256 of both files).

        Raises:
            CheckpointError: the manifest is missing or unreadable, a file is missing, has
                another size (truncated?) or another sha256.
        """
        paths = self.paths(name)
        where = self.save_dir / name
        try:
            manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
            files = manifest["files"]
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {where} is incomplete: no manifest {paths['manifest'].name} (a "
                "run killed while saving it?)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {where} is corrupt: cannot read its manifest {paths['manifest']}: "
                f"{exc}"
            ) from exc
        for file_name, expected in files.items():
            path = self.save_dir / file_name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {where} is incomplete: {path} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(
                    f"checkpoint {where} is corrupt: {path} has {size} bytes, its manifest says "
                    f"{expected['bytes']} (truncated?)"
                )
            if sha256_file(path) != expected["sha256"]:
                raise CheckpointError(
                    f"checkpoint {where} is corrupt: the sha256 of {path} differs from its "
                    "manifest (the file was changed or damaged)"
                )

    def find_resumable(self) -> str | None:
        """The newest checkpoint that verifies, starting from ``last_checkpoint``.

        A corrupt newer checkpoint is skipped with a warning that names it and the one used.
        Collective: rank 0 decides, every process gets its answer.

        Returns:
            a checkpoint name, or None when there is no checkpoint at all.

        Raises:
            CheckpointError: there are checkpoints but none verifies.
        """
        if comm.is_main_process():
            decision: tuple[str | None, str | None] = self._find_resumable()
        else:
            decision = (None, None)
        name, error = comm.broadcast_object(decision)
        if error is not None:
            raise CheckpointError(error)
        return name

    def _find_resumable(self) -> tuple[str | None, str | None]:
        pointed = self.last_checkpoint()
        candidates = list(reversed(self.all_checkpoints()))
        if pointed is not None and pointed in candidates:
            candidates.remove(pointed)
        if pointed is not None:
            candidates.insert(0, pointed)
        if not candidates:
            return None, None
        problems = []
        for name in candidates:
            try:
                self.verify(name)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            for problem in problems:
                logger.warning("%s; resuming from the previous good checkpoint %s instead",
                               problem, self.paths(name)["model"])
            return name, None
        return None, (
            f"no usable checkpoint in {self.save_dir}: " + "; ".join(problems)
            + "; delete the output directory or start without --resume"
        )

    def load(self, name: str, *, model_only: bool = False) -> dict[str, Any]:
        """Verify and load checkpoint ``name`` of this directory.

        Restores the model, and unless ``model_only`` the checkpointables and this process's
        RNG state.

        Returns:
            the state file's remaining entries (``iteration``, and the ``extra`` of ``save``).

        Raises:
            CheckpointError: corrupt, incomplete, or made for another architecture.
        """
        self.verify(name)
        paths = self.paths(name)
        model_state = _read_safetensors(paths["model"])
        load_model_state(self.model, model_state, str(paths["model"]), self.include_frozen)
        if model_only:
            return {}
        try:
            state = torch.load(paths["state"], map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {paths['state']}: {unreadable_reason(paths['state'], exc)}"
            ) from exc
        for key, obj in self.checkpointables.items():
            if key not in state:
                raise CheckpointError(f"{paths['state']} has no '{key}' state to restore")
            try:
                obj.load_state_dict(state.pop(key))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(
                    f"cannot restore the {key} state from {paths['state']}: {exc}"
                ) from exc
        rng_states = state.pop("rng", [])
        rank = comm.get_rank()
        if rank < len(rng_states) and state.get("world_size") == comm.get_world_size():
            set_rng_state(rng_states[rank])
        else:
            logger.warning("checkpoint %s was saved by %s processes, this run has %d: RNG "
                           "states not restored", name, state.get("world_size"),
                           comm.get_world_size())
        logger.info("loaded checkpoint %s (iteration %d)", paths["model"], state["iteration"])
        return state

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load model weights only: a checkpoint's ``.safetensors`` file (verified against its
        manifest when one is beside it) or any state-dict file (``.safetensors``, ``.pt``, ...).
        """
        path = Path(path).expanduser()
        if path.name.endswith(MODEL_SUFFIX):
            name = path.name[: -len(MODEL_SUFFIX)]
            beside = Checkpointer(self.model, path.parent, include_frozen=self.include_frozen)
            if _NAME.match(name) and beside.paths(name)["manifest"].is_file():
                beside.load(name, model_only=True)
                return
        try:
            state = load_state_dict_file(path)
        except OvsegError as exc:
            raise CheckpointError(str(exc)) from exc
        load_model_state(self.model, state, str(path), self.include_frozen)
        logger.info("loaded weights %s", path)

    def resume_or_load(self, weights: str = "", *, resume: bool) -> int:
        """Resume from the newest good checkpoint here (``resume``), else load ``weights``.

        Returns:
            the iteration to start from: the checkpoint's, or 0.
        """
        if resume:
            name = self.find_resumable()
            if name is not None:
                return int(self.load(name)["iteration"])
            logger.info("no checkpoint in %s to resume from; starting at iteration 0",
                        self.save_dir)
        if weights:
            self.load_weights(weights)
        return 0


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {unreadable_reason(path, exc)}") from exc


def load_trained_weights(
    model: nn.Module, path: str | os.PathLike[str], include_frozen: bool = False
) -> None:
    """Load trained ovseg weights (``cfg.model.weights``) into a built model: the one loading
    path of the Python API, the demo and ``tools/train_net.py`` (:meth:`Checkpointer.load_weights`:
    a checkpoint's ``.safetensors`` verified against its manifest, or any state-dict file).

    Raises:
        CheckpointError: one line naming the file: missing, unreadable or not fitting the model.
    """
    Checkpointer(model, Path(path).expanduser().parent,
                 include_frozen=include_frozen).load_weights(path)
