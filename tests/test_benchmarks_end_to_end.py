"""Each 2D benchmark, built tiny in its real layout, read through the catalog and evaluated.

The prediction is the ground truth with one region relabelled to a class absent from the ground
truth; the expected IoUs are counted here pixel set by pixel set (not via a confusion matrix).
"""

from __future__ import annotations

import numpy as np
import pytest

from ovseg.data.catalog import get_benchmark, load_dataset
from ovseg.evaluation import SemSegEvaluator
from tests.fixtures.builders import build_benchmark

BENCHMARKS = [
    "ade20k_150", "ade20k_847", "pcontext_59", "pcontext_60", "pcontext_459", "voc_20", "voc_21",
    "coco_stuff_171", "coco_object_81", "cityscapes_19",
]


def corrupted_predictions(labels, ignore, num_classes):
    """Ground truth, ignore pixels predicted as class 0, and the most frequent class of the first
    image predicted as a class that no label contains (so it is absent from the ground truth)."""
    present = set(np.unique(np.concatenate([label.ravel() for label in labels]))) - {ignore}
    absent = max(set(range(num_classes)) - present)
    first = labels[0][labels[0] != ignore]
    moved = np.bincount(first).argmax()
    predictions = []
    for index, label in enumerate(labels):
        prediction = np.where(label == ignore, 0, label)
        if index == 0:
            prediction = np.where(label == moved, absent, prediction)
        predictions.append(prediction)
    return predictions, moved, absent


def counted_ious(predictions, labels, ignore, num_classes):
    """IoU per class by counting pixel sets; None where a class is in neither GT nor prediction."""
    valid = [label != ignore for label in labels]
    ious = {}
    for c in range(num_classes):
        inter = sum(int(((p == c) & (g == c) & v).sum()) for p, g, v in
                    zip(predictions, labels, valid, strict=True))
        union = sum(int((((p == c) | (g == c)) & v).sum()) for p, g, v in
                    zip(predictions, labels, valid, strict=True))
        ious[c] = None if union == 0 else 100.0 * inter / union
    return ious


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_reads_and_evaluates_a_known_prediction(tmp_path, name):
    layout = build_benchmark(name, tmp_path)
    info = get_benchmark(name)
    dataset = load_dataset(name, tmp_path)
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert len(labels) == len(layout)
    for label, expected in zip(labels, layout.expected_labels, strict=True):
        assert label.dtype == np.int64 and np.array_equal(label, expected)
    predictions, moved, absent = corrupted_predictions(labels, info.ignore_value, info.num_classes)
    ious = counted_ious(predictions, labels, info.ignore_value, info.num_classes)
    has_gt = {c for c in range(info.num_classes)
              if any(((g == c) & (g != info.ignore_value)).any() for g in labels)}
    for policy in ("zero", "exclude"):
        evaluator = SemSegEvaluator(info.num_classes, info.ignore_value, absent_classes=policy,
                                    distributed=False)
        for prediction, label in zip(predictions, labels, strict=True):
            evaluator.process(prediction, label, source=name)
        results = evaluator.evaluate()
        counted = [ious[c] for c in range(info.num_classes)
                   if ious[c] is not None and (policy == "zero" or c in has_gt)]
        assert results["num_classes_in_mean"] == len(counted)
        assert results["mIoU"] == pytest.approx(np.mean(counted), abs=1e-9)
        assert ious[absent] == 0.0 and absent not in has_gt
    assert ious[moved] < 100.0
    if name == "ade20k_847":
        assert max(has_gt) > 255, "the 847-class copy must hold labels above 255"
    if name not in ("coco_object_81", "pcontext_60"):  # these two have no ignore pixels
        assert any((label == info.ignore_value).any() for label in labels), "no ignore pixels"
