"""Cross-check of our ``zero`` policy against mmseg's IoUMetric (skipped without mmseg)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg.evaluation import SemSegEvaluator

pytest.importorskip("mmengine")
pytest.importorskip("mmcv")


def _iou_metric_class() -> type:
    # mmseg/__init__ asserts an mmcv version range (mmcv-lite 2.2.0 is refused by mmseg 1.2.2):
    # that is an AssertionError, which importorskip does not catch
    try:
        module = pytest.importorskip("mmseg.evaluation.metrics.iou_metric")
    except AssertionError as error:
        pytest.skip(f"mmseg cannot be imported with the installed mmcv: {error}")
    return module.IoUMetric


def _maps(
    num_classes: int, ignore_value: int, num_images: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction int64, label) pairs; classes C-3 and C-2 are predicted but never labelled
    (IoU 0 under ``zero``), class C-1 is neither labelled nor predicted (left out of the mean).
    """
    rng = np.random.default_rng(seed)
    label_dtype = np.uint8 if ignore_value <= 255 else np.uint16
    pairs = []
    for index in range(num_images):
        shape = (20 + 3 * index, 31)
        label = rng.integers(0, num_classes - 3, size=shape).astype(label_dtype)
        label[rng.random(shape) < 0.15] = ignore_value
        noise = rng.integers(0, num_classes - 1, size=shape)
        prediction = np.where(rng.random(shape) < 0.5, label.astype(np.int64), noise)
        # predictions on ignore pixels must be in range too, and must not count
        prediction = np.where(label == ignore_value, noise, prediction)
        pairs.append((prediction.astype(np.int64), label))
    return pairs


@pytest.mark.parametrize(
    ("num_classes", "ignore_value"), [(21, 255), (847, 65535)], ids=["21-classes", "847-classes"]
)
def test_zero_policy_matches_mmseg_iou_metric(num_classes: int, ignore_value: int):
    iou_metric_class = _iou_metric_class()
    names = [f"class {index}" for index in range(num_classes)]
    pairs = _maps(num_classes, ignore_value, num_images=4, seed=num_classes)

    evaluator = SemSegEvaluator(num_classes, ignore_value, names, absent_classes="zero")
    for index, (prediction, label) in enumerate(pairs):
        evaluator.process(prediction, label, f"{index}.png")
    ours = evaluator.evaluate()

    metric = iou_metric_class(ignore_index=ignore_value, iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": names}
    for prediction, label in pairs:
        # what mmseg's model and PackSegInputs hand over: (1, H, W) int64 tensors
        sample = {
            "pred_sem_seg": {"data": torch.from_numpy(prediction)[None]},
            "gt_sem_seg": {"data": torch.from_numpy(label.astype(np.int64))[None]},
        }
        metric.process({}, [sample])
    summary = metric.compute_metrics(metric.results)
    areas = [sum(column) for column in zip(*metric.results, strict=True)]
    per_class = iou_metric_class.total_area_to_metrics(*areas, metrics=["mIoU"])

    # per-class values from mmseg's unrounded arrays (NaN where mmseg leaves a class out)
    for index, name in enumerate(names):
        theirs_iou = float(per_class["IoU"][index])
        theirs_acc = float(per_class["Acc"][index])
        ours_iou = ours["per_class"][name]["IoU"]
        ours_acc = ours["per_class"][name]["Acc"]
        assert (ours_iou is None) == np.isnan(theirs_iou), name
        assert (ours_acc is None) == np.isnan(theirs_acc), name
        if ours_iou is not None:
            assert ours_iou / 100 == pytest.approx(theirs_iou, abs=1e-6), name
        if ours_acc is not None:
            assert ours_acc / 100 == pytest.approx(theirs_acc, abs=1e-6), name
    assert ours["per_class"][names[-3]]["IoU"] == 0.0
    assert ours["per_class"][names[-1]]["IoU"] is None

    assert ours["mIoU"] / 100 == pytest.approx(np.nanmean(per_class["IoU"]), abs=1e-6)
    assert ours["mAcc"] / 100 == pytest.approx(np.nanmean(per_class["Acc"]), abs=1e-6)
    assert ours["pAcc"] / 100 == pytest.approx(float(per_class["aAcc"]), abs=1e-6)
    assert ours["num_classes_in_mean"] == int(np.sum(~np.isnan(per_class["IoU"])))
    # mmseg's summary is rounded to 2 decimals (float32 areas: allow one unit of rounding)
    for our_key, their_key in (("mIoU", "mIoU"), ("mAcc", "mAcc"), ("pAcc", "aAcc")):
        assert abs(round(ours[our_key], 2) - float(summary[their_key])) <= 0.01 + 1e-9, our_key
