"""detectron2 integration: our benchmarks in its catalogs, our evaluator as its evaluator.

    from ovseg.integrations.detectron2 import OvsegSemSegEvaluator, register_all

    register_all()                      # every benchmark, e.g. "ade20k_150", by our names
    evaluator = OvsegSemSegEvaluator("ade20k_150", output_dir="out/")
    inference_on_dataset(model, build_detection_test_loader(cfg, "ade20k_150"), evaluator)

Registered datasets hold detectron2's semantic-segmentation dicts (``file_name``,
``sem_seg_file_name``, ``image_id``); their metadata has ``stuff_classes``, ``ignore_label`` and
``evaluator_type="sem_seg"``. Label files are stored as each benchmark's prepare script wrote
them: some need a mapping at read time (``label_mapping`` in the metadata, e.g. ADE-150's raw
PNGs), which detectron2's own ``SemSegEvaluator`` does not apply; ``OvsegSemSegEvaluator`` reads
labels through ovseg's reader, so its numbers equal ``tools/train_net.py --eval-only``'s.

This module imports without detectron2; its functions raise ImportError with an install hint
when detectron2 is missing (it has no release for current torch: install it from source).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from ovseg.data.catalog import (
    class_names,
    find_samples,
    get_benchmark,
    list_benchmarks,
)

INSTALL_HINT = (
    "detectron2 is not installed; it has no release for current torch, so build it from "
    "source: clone the facebookresearch/detectron2 repository and run "
    "`pip install --no-build-isolation -e detectron2` (see the README, section Training)"
)


def detectron2_available() -> bool:
    """True when detectron2 can be imported."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def _require_detectron2() -> None:
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)


def dataset_dicts(name: str, root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """detectron2 dicts of a benchmark's samples: ``file_name``, ``sem_seg_file_name``,
    ``image_id`` (the sample's file stem). Reads no image."""
    info = get_benchmark(name)
    return [
        {"file_name": str(image), "sem_seg_file_name": str(label), "image_id": image.stem}
        for image, label in find_samples(info, root)
    ]


def register_all(
    root: str | os.PathLike[str] | None = None, names: list[str] | None = None
) -> list[str]:
    """Register benchmarks in detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

    Args:
        root: the datasets root (default ``$OVSEG_DATASETS`` or ``./datasets``); samples are
            listed when detectron2 asks for them, so missing files are reported then.
        names: the benchmarks to register; default every 2D benchmark of the catalog and every
            registered custom dataset. Names already in ``DatasetCatalog`` are left alone.

    Returns:
        the names registered by this call.

    Raises:
        ImportError: detectron2 is not installed (with how to install it).
    """
    _require_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    registered = []
    for name in names if names is not None else list_benchmarks():
        info = get_benchmark(name)
        if info.kind != "sem_seg" or name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: dataset_dicts(name, root))
        MetadataCatalog.get(name).set(
            stuff_classes=class_names(name),
            ignore_label=info.ignore_value,
            evaluator_type="sem_seg",
            label_mapping=info.label_mapping,
        )
        registered.append(name)
    return registered


@cache
def _evaluator_class() -> type:
    _require_detectron2()
    from detectron2.evaluation import DatasetEvaluator

    from ovseg.data.readers import read_label
    from ovseg.evaluation.sem_seg import SemSegEvaluator, write_results

    class OvsegSemSegEvaluator(DatasetEvaluator):
        """ovseg's semantic-segmentation evaluator behind detectron2's evaluator protocol.

        ``process(inputs, outputs)``: each output's ``sem_seg`` is (C, H, W) class scores at
        the label's size; the label is read (and mapped) by ovseg's reader from the input's
        ``sem_seg_file_name``, else looked up by ``file_name``. ``evaluate()`` sums the
        confusion matrices of all processes and returns, on the main process, detectron2's
        ``{"sem_seg": {"mIoU", "fwIoU", "mACC", "pACC", "IoU-<class>", ...}}``.

        Args:
            dataset_name: a benchmark or custom dataset name of ovseg's catalog.
            absent_classes: ``zero`` or ``exclude`` (see ``ovseg.evaluation.sem_seg``).
            distributed: sum over processes when torch.distributed is initialised.
            output_dir: also write ``results.json`` / ``results.md`` to
                ``<output_dir>/<dataset_name>/``.
            root: the datasets root, to find labels by image file name.
        """

        def __init__(
            self,
            dataset_name: str,
            absent_classes: str = "zero",
            distributed: bool = True,
            output_dir: str | os.PathLike[str] | None = None,
            root: str | os.PathLike[str] | None = None,
        ) -> None:
            self.dataset_name = dataset_name
            self.info = get_benchmark(dataset_name)
            self.output_dir = output_dir
            self.root = root
            self._labels: dict[str, str] | None = None
            self._evaluator = SemSegEvaluator(
                self.info.num_classes, self.info.ignore_value, class_names(dataset_name),
                absent_classes=absent_classes, distributed=distributed,
            )

        def reset(self) -> None:
            self._evaluator.reset()

        def _label_path(self, inputs: dict[str, Any]) -> str:
            if inputs.get("sem_seg_file_name"):
                return str(inputs["sem_seg_file_name"])
            if self._labels is None:
                self._labels = {
                    str(image): str(label) for image, label in find_samples(self.info, self.root)
                }
            return self._labels[str(inputs["file_name"])]

        def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
            for sample, output in zip(inputs, outputs, strict=True):
                path = self._label_path(sample)
                label = read_label(path, self.info.label_mapping, self.info.ignore_value,
                                   self.info.num_classes)
                prediction = output["sem_seg"].argmax(dim=0)
                self._evaluator.process(prediction, label, source=path)

        def evaluate(self) -> dict[str, dict[str, float]] | None:
            results = self._evaluator.evaluate()
            if results is None:
                return None
            if self.output_dir is not None:
                write_results(results, os.path.join(self.output_dir, self.dataset_name))
            metrics = {"mIoU": results["mIoU"], "fwIoU": results["fwIoU"],
                       "mACC": results["mAcc"], "pACC": results["pAcc"]}
            for name, row in results["per_class"].items():
                if row["IoU"] is not None:
                    metrics[f"IoU-{name}"] = row["IoU"]
                if row["Acc"] is not None:
                    metrics[f"ACC-{name}"] = row["Acc"]
            return {"sem_seg": metrics}

    return OvsegSemSegEvaluator


def __getattr__(name: str) -> Any:
    # the evaluator subclasses detectron2's class, so it exists only once detectron2 imports
    if name == "OvsegSemSegEvaluator":
        return _evaluator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# OvsegSemSegEvaluator is left out: `import *` must work without detectron2
__all__ = ["INSTALL_HINT", "dataset_dicts", "detectron2_available", "register_all"]
