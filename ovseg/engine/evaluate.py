"""The evaluation runner: a model over each test benchmark, sharded across processes.

Every process predicts its shard of the images (each image exactly once over all processes),
the confusion matrices are summed across processes, and rank 0 writes ``results.json`` (with
the protocol that produced the numbers: the encoders the model used, the trained weights it
held, the data and the config) and ``results.md`` under ``<output_dir>/<benchmark>/``, and logs
one line ``<benchmark>: mIoU .., mAcc .. -> <results.json>``.

A long evaluation is resumable: every ``evaluation.checkpoint_every`` images each process
writes its confusion matrix and the indices of the images it has finished to
``<output_dir>/<benchmark>/.eval_state/rank{r}_of{W}.npz`` (atomically). ``resume=True``
(``train_net.py --eval-only --resume``) continues from there, and the final matrix is the one an
uninterrupted run gives, bit for bit (integer counts add up in any order). A state saved by
another configuration (config, encoder or trained weights, images, number of processes) is
never mixed in: it is discarded with a warning and the benchmark evaluated afresh. Without
``resume`` any saved state is discarded; once the results are written it is removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ovseg.config import config_to_yaml
from ovseg.data.catalog import (
    class_names,
    class_vocabulary,
    get_benchmark,
    load_dataset,
    prompt_file,
    register_from_config,
)
from ovseg.engine.comm import (
    all_reduce_sum,
    broadcast_object,
    get_rank,
    get_world_size,
    shard_indices,
)
from ovseg.evaluation.sem_seg import SemSegEvaluator, write_results
from ovseg.io import atomic_write_bytes, sha256_bytes, sha256_file
from ovseg.vis.writers import write_label_png

logger = logging.getLogger(__name__)

_VERSIONED_PACKAGES = ("ovseg", "torch", "open_clip_torch", "timm", "segment-anything", "numpy")

# the model sections that name a frozen encoder's weights
_ENCODER_SECTIONS = ("clip", "dino", "sam")
# the folder of a benchmark's resumable evaluation state, under <output_dir>/<benchmark>/
STATE_DIR = ".eval_state"
UNTRAINED = "none (untrained)"
# what each fingerprint entry of a saved evaluation state stands for, in warnings
_FINGERPRINT_WORDS = {
    "benchmark": "benchmark", "images": "images", "samples_sha256": "images",
    "processes": "number of processes", "config_sha256": "config", "num_classes": "classes",
    "ignore_value": "ignore value", "weights": "encoder weights",
    "trained_weights": "trained weights",
}
TRAINING_FREE = "training-free"


def used_encoders(model: torch.nn.Module) -> list[str]:
    """The encoder sections (``clip``, ``dino``, ``sam``) whose encoder ``model`` holds: a
    method's config may have a section it reads only in some modes (dense_clip's ``dino`` is
    ProxyCLIP's proxy, its ``sam`` the refinement) or only in training (CLIP-DINOiser's
    ``dino``)."""
    from ovseg.encoders.clip import ClipEncoder
    from ovseg.encoders.dino import DinoEncoder
    from ovseg.encoders.sam import SamEncoder

    kinds = {"clip": ClipEncoder, "dino": DinoEncoder, "sam": SamEncoder}
    modules = list(model.modules())
    return [name for name, kind in kinds.items() if any(isinstance(m, kind) for m in modules)]


def weights_protocol(cfg, model: torch.nn.Module | None = None) -> dict[str, dict[str, str]]:
    """Each encoder's arch and weights spec, with the sha256 of the spec's file when it names
    a local file; one entry per encoder section the config has, or with ``model`` per encoder
    section whose encoder the model holds (:func:`used_encoders`)."""
    sections = _ENCODER_SECTIONS if model is None else used_encoders(model)
    protocol = {}
    for encoder in sections:
        section = cfg.model.get(encoder)
        if section is None:
            continue
        spec = str(section.weights)
        entry = {"arch": str(section.arch), "weights": spec}
        # a spec that names an existing file is a weights file (a tag or "random" never does)
        local = Path(spec.strip()).expanduser() if spec.strip() else None
        if local is not None and local.is_file():
            entry["sha256"] = sha256_file(local)
        protocol[encoder] = entry
    return protocol


def trained_weights_protocol(
    model: torch.nn.Module,
    cfg,
    checkpoint: str | os.PathLike[str] | None = None,
    iteration: int | None = None,
) -> dict[str, Any] | str:
    """The trained ovseg weights ``model`` holds, for ``results.json``.

    Args:
        checkpoint: the checkpoint file they were loaded from (``--eval-only --resume``).
        iteration: they are those of this training run at this iteration (its evaluations).

    Returns:
        ``{"source": "checkpoint" | "model.weights", "path", "sha256"}``, ``{"source":
        "training", "iteration"}``, ``"none (untrained)"`` for a trainable method without
        trained weights, or ``"training-free"``.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        return {"source": "checkpoint", "path": os.path.abspath(path),
                "sha256": sha256_file(path)}
    if iteration is not None:
        return {"source": "training", "iteration": int(iteration)}
    weights = str(cfg.model.weights or "").strip()
    if weights:
        path = Path(weights).expanduser()
        return {"source": "model.weights", "path": os.path.abspath(path),
                "sha256": sha256_file(path)}
    return UNTRAINED if callable(getattr(model, "loss", None)) else TRAINING_FREE


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _model_protocol(model, cfg, **trained: Any) -> dict[str, Any]:
    """``{"weights", "trained_weights"}`` (``trained``: ``trained_weights_protocol``'s
    keywords), hashed on rank 0 only and the same on every rank (the resumable state's
    fingerprint holds it)."""
    protocol = None
    if get_rank() == 0:
        protocol = {"weights": weights_protocol(cfg, model),
                    "trained_weights": trained_weights_protocol(model, cfg, **trained)}
    return broadcast_object(protocol)


def _config_digest(cfg) -> str:
    """sha256 of the config keys that decide the predictions and the labels (the model, the
    text prompts, where the data is), not of output or evaluation settings."""
    relevant = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "text": OmegaConf.to_container(cfg.text, resolve=True),
        "datasets.root": str(cfg.datasets.root),
        "datasets.custom": OmegaConf.to_container(cfg.datasets.custom, resolve=True),
    }
    return sha256_bytes(json.dumps(relevant, sort_keys=True, default=str).encode())


class EvaluationState:
    """One process's resumable progress on one benchmark: its confusion-matrix state and the
    indices of the images it has finished, in ``<benchmark_dir>/.eval_state/rank{r}_of{W}.npz``
    with a fingerprint of what produced them (see the module docstring).

    Args:
        benchmark_dir: ``<output_dir>/<benchmark>``.
        fingerprint: JSON-able description of the run; a saved state is used only when its
            fingerprint is equal.
        every: save after this many newly finished images; 0 = never save.
    """

    def __init__(self, benchmark_dir: Path, fingerprint: Mapping[str, Any], every: int) -> None:
        self.rank, self.world_size = get_rank(), get_world_size()
        self.directory = Path(benchmark_dir) / STATE_DIR
        self.path = self.directory / f"rank{self.rank}_of{self.world_size}.npz"
        self.fingerprint = dict(fingerprint)
        self.every = int(every)
        self.finished: list[int] = []
        self._unsaved = 0

    def start(self, evaluator: SemSegEvaluator, shard: Iterable[int], resume: bool) -> set[int]:
        """Restore the saved state into ``evaluator`` when ``resume`` and it fits, else discard
        it; returns the indices of ``shard`` already finished."""
        if self.rank == 0:
            self._discard_other_world_sizes()
        if not resume:
            self.path.unlink(missing_ok=True)
            return set()
        if not self.path.is_file():
            return set()
        shard = set(shard)
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                fingerprint = json.loads(str(saved["fingerprint"]))
                finished = [int(index) for index in saved["finished"]]
                state = {key: saved[key] for key in ("matrix", "num_images", "saw_uint8_labels")}
        except Exception as exc:  # damaged: recompute rather than fail a long run
            self._start_afresh(f"is unreadable ({exc})")
            return set()
        if fingerprint != self.fingerprint:
            changed = sorted({_FINGERPRINT_WORDS.get(key, key)
                              for key in set(fingerprint) | set(self.fingerprint)
                              if fingerprint.get(key) != self.fingerprint.get(key)})
            self._start_afresh(f"was saved by a run with another {' and '.join(changed)}")
            return set()
        if not set(finished) <= shard or len(set(finished)) != int(state["num_images"]):
            self._start_afresh("does not match this process's images")
            return set()
        evaluator.load_state_dict(state)
        self.finished = finished
        logger.info("%s: resuming with %d of this process's %d images done (%s)",
                    self.fingerprint.get("benchmark"), len(finished), len(shard), self.path)
        return set(finished)

    def _start_afresh(self, why: str) -> None:
        logger.warning("evaluation state %s %s; evaluating these images afresh", self.path, why)
        self.path.unlink(missing_ok=True)

    def _discard_other_world_sizes(self) -> None:
        # files of a run with another number of processes hold other shards: never mixed in
        stale = [path for path in self.directory.glob("rank*_of*.npz")
                 if not path.name.endswith(f"_of{self.world_size}.npz")]
        if stale:
            logger.warning("discarding the evaluation state %s of a run with another number of "
                           "processes (this run has %d)", self.directory, self.world_size)
        for path in stale:
            path.unlink(missing_ok=True)

    def add(self, index: int, evaluator: SemSegEvaluator) -> None:
        """Mark image ``index`` finished (it is in ``evaluator``); save every ``every``."""
        self.finished.append(int(index))
        self._unsaved += 1
        if self.every and self._unsaved >= self.every:
            self.save(evaluator)

    def save(self, evaluator: SemSegEvaluator) -> None:
        """Write the state now (atomically), if images were finished since the last save."""
        if not (self.every and self._unsaved):
            return
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, fingerprint=np.array(json.dumps(self.fingerprint, sort_keys=True)),
            finished=np.asarray(self.finished, dtype=np.int64), **evaluator.state_dict(),
        )
        atomic_write_bytes(self.path, buffer.getvalue())
        self._unsaved = 0

    def remove(self) -> None:
        """Remove every process's state of this benchmark (rank 0, once the results are
        written: the other processes are past their last save)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:  # something else was put there: leave it
            pass


def evaluate_benchmark(
    model,
    name: str,
    cfg,
    output_dir: str | Path,
    *,
    resume: bool = False,
    model_protocol: Mapping[str, Any] | None = None,
) -> dict | None:
    """Evaluate ``model`` on one benchmark; rank 0 returns (and writes) the results.

    Collective: every process calls it and evaluates its shard of the images.

    Args:
        resume: continue from the state saved under ``<output_dir>/<name>/.eval_state`` (when
            it was saved by this configuration); else any saved state is discarded.
        model_protocol: ``{"weights", "trained_weights"}`` for ``results.json`` (the same on
            every rank); None = the model's encoders and ``cfg.model.weights``.
    """
    info = get_benchmark(name)
    dataset = load_dataset(name, cfg.datasets.root or None)
    if model_protocol is None:
        model_protocol = _model_protocol(model, cfg)
    # the prompts may be a reference's own class-name file; the table keeps our class names
    vocabulary = class_vocabulary(name, cfg.text.prompt_names)
    evaluator = SemSegEvaluator(
        info.num_classes, info.ignore_value, class_names=class_names(name),
        absent_classes=cfg.evaluation.absent_classes,
    )
    benchmark_dir = Path(output_dir) / name
    prediction_dir = benchmark_dir / "predictions"
    indices = shard_indices(len(dataset), get_rank(), get_world_size())
    samples = "\n".join(f"{image}\t{label}" for image, label in
                        (dataset.sample_paths(index) for index in range(len(dataset))))
    state = EvaluationState(benchmark_dir, {
        "benchmark": name, "images": len(dataset), "processes": get_world_size(),
        "samples_sha256": sha256_bytes(samples.encode()), "config_sha256": _config_digest(cfg),
        "num_classes": info.num_classes, "ignore_value": info.ignore_value, **model_protocol,
    }, cfg.evaluation.checkpoint_every)
    finished = state.start(evaluator, indices, resume)
    todo = [index for index in indices if index not in finished]
    started = time.perf_counter()
    progress = tqdm(todo, desc=f"eval {name}", unit="img", disable=get_rank() != 0,
                    total=len(indices), initial=len(indices) - len(todo))
    with torch.inference_mode():
        for index in progress:
            sample = dataset[index]
            prediction = model.predict(sample["image"], vocabulary)
            evaluator.process(prediction.labels, sample["label"], source=sample["label_path"])
            if cfg.evaluation.save_predictions:
                stem = Path(sample["image_path"]).stem
                write_label_png(prediction_dir / f"{stem}.png", prediction.labels,
                                info.num_classes)
            state.add(index, evaluator)
    # a process that waits for the others keeps its whole shard should one of them die
    state.save(evaluator)
    resumed = int(all_reduce_sum(torch.tensor([len(finished)], dtype=torch.int64)).item())
    results = evaluator.evaluate()
    if results is None:
        return None
    protocol = {
        "benchmark": name,
        "split": info.split,
        "class_file": str(info.class_file),
        "class_file_sha256": sha256_file(info.class_file),
        "prompt_names": str(cfg.text.prompt_names),
        "prompt_file": str(prompt_file(name, cfg.text.prompt_names)),
        "prompt_file_sha256": sha256_file(prompt_file(name, cfg.text.prompt_names)),
        "images": len(dataset),
        "images_resumed": resumed,
        "processes": get_world_size(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "templates": str(cfg.text.templates),
        "weights": model_protocol["weights"],
        "trained_weights": model_protocol["trained_weights"],
        "versions": package_versions(),
        "config": config_to_yaml(cfg),
    }
    write_results(results, benchmark_dir, extra={"protocol": protocol})
    state.remove()
    return results


def evaluate_model(
    model,
    cfg,
    output_dir: str | Path,
    *,
    resume: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    iteration: int | None = None,
) -> dict[str, dict] | None:
    """Evaluate on every benchmark of ``cfg.datasets.test``; rank 0 gets {name: results}.

    Collective. Rank 0 logs ``<benchmark>: mIoU .., mAcc .. -> <results.json>`` per benchmark.

    Args:
        resume: continue interrupted benchmarks from their saved state (see the module
            docstring); else start every benchmark afresh.
        checkpoint: the checkpoint file the model's trained weights were loaded from.
        iteration: the model is that of the training run at this iteration.
            ``results.json`` records them (:func:`trained_weights_protocol`); without either,
            ``cfg.model.weights`` or that there are no trained weights.
    """
    register_from_config(cfg)
    all_results = {}
    # a method with its own kind of benchmark (CLOC's region sets) evaluates it itself
    method_evaluator = getattr(model, "evaluate_benchmark", None)
    model_protocol = None if callable(method_evaluator) else _model_protocol(
        model, cfg, checkpoint=checkpoint, iteration=iteration)
    for name in cfg.datasets.test:
        if callable(method_evaluator):
            results = method_evaluator(name, cfg, output_dir)
        else:
            results = evaluate_benchmark(model, name, cfg, output_dir, resume=resume,
                                         model_protocol=model_protocol)
        all_results[name] = results
        if get_rank() == 0 and results is not None:
            _log_results(name, results, Path(output_dir) / name / "results.json")
    return all_results if get_rank() == 0 else None


def _log_results(name: str, results: Mapping[str, Any], path: Path) -> None:
    metrics = ", ".join(f"{key} {results[key]:.2f}" for key in ("mIoU", "mAcc")
                        if isinstance(results.get(key), int | float))
    logger.info("%s: %s -> %s", name, metrics or "results", path)
