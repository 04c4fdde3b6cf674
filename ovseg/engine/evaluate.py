"""The evaluation runner: a model over each test benchmark, sharded across processes.

Every process predicts its shard of the images (each image exactly once over all processes),
the confusion matrices are summed across processes, and rank 0 writes ``results.json`` (with
the protocol that produced the numbers) and ``results.md`` under ``<output_dir>/<benchmark>/``.
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import torch
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
from ovseg.engine.comm import get_rank, get_world_size, shard_indices
from ovseg.evaluation.sem_seg import SemSegEvaluator, write_results
from ovseg.io import sha256_file
from ovseg.vis.writers import write_label_png

_VERSIONED_PACKAGES = ("ovseg", "torch", "open_clip_torch", "timm", "segment-anything", "numpy")


# the model sections that name a frozen encoder's weights; a config holds those its method reads
_ENCODER_SECTIONS = ("clip", "dino", "sam")


def weights_protocol(cfg) -> dict[str, dict[str, str]]:
    """Each encoder's arch and weights spec, with the sha256 of the spec's file when it names
    a local file; one entry per encoder section the config has."""
    protocol = {}
    for encoder in _ENCODER_SECTIONS:
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


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def evaluate_benchmark(model, name: str, cfg, output_dir: str | Path) -> dict | None:
    """Evaluate ``model`` on one benchmark; rank 0 returns (and writes) the results."""
    info = get_benchmark(name)
    dataset = load_dataset(name, cfg.datasets.root or None)
    # the prompts may be a reference's own class-name file; the table keeps our class names
    vocabulary = class_vocabulary(name, cfg.text.prompt_names)
    evaluator = SemSegEvaluator(
        info.num_classes, info.ignore_value, class_names=class_names(name),
        absent_classes=cfg.evaluation.absent_classes,
    )
    benchmark_dir = Path(output_dir) / name
    prediction_dir = benchmark_dir / "predictions"
    indices = shard_indices(len(dataset), get_rank(), get_world_size())
    started = time.perf_counter()
    progress = tqdm(indices, desc=f"eval {name}", unit="img", disable=get_rank() != 0)
    with torch.inference_mode():
        for index in progress:
            sample = dataset[index]
            prediction = model.predict(sample["image"], vocabulary)
            evaluator.process(prediction.labels, sample["label"], source=sample["label_path"])
            if cfg.evaluation.save_predictions:
                stem = Path(sample["image_path"]).stem
                write_label_png(prediction_dir / f"{stem}.png", prediction.labels,
                                info.num_classes)
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
        "processes": get_world_size(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "templates": str(cfg.text.templates),
        "weights": weights_protocol(cfg),
        "versions": package_versions(),
        "config": config_to_yaml(cfg),
    }
    write_results(results, benchmark_dir, extra={"protocol": protocol})
    return results


def evaluate_model(model, cfg, output_dir: str | Path) -> dict[str, dict] | None:
    """Evaluate on every benchmark of ``cfg.datasets.test``; rank 0 gets {name: results}."""
    register_from_config(cfg)
    all_results = {}
    # a method with its own kind of benchmark (CLOC's region sets) evaluates it itself
    method_evaluator = getattr(model, "evaluate_benchmark", None)
    for name in cfg.datasets.test:
        if callable(method_evaluator):
            all_results[name] = method_evaluator(name, cfg, output_dir)
        else:
            all_results[name] = evaluate_benchmark(model, name, cfg, output_dir)
    return all_results if get_rank() == 0 else None
