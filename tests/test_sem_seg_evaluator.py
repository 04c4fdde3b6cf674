"""Tests of the semantic-segmentation evaluator against IoUs computed by hand."""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ovseg.errors import OvsegError
from ovseg.evaluation import EvaluationError, SemSegEvaluator, results_to_markdown, write_results

# A 4x4 image with 3 classes; 255 = ignore. The three ignore pixels are predicted 0, 1 and 2:
# none of them may count.
GT_4X4 = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 255, 255],
        [2, 2, 2, 255],
    ],
    dtype=np.uint8,
)
PRED_4X4 = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 0],
        [2, 2, 0, 1],
        [2, 1, 2, 2],
    ],
    dtype=np.int64,
)
# By hand, rows = ground truth, cols = prediction, over the 13 non-ignore pixels:
#   gt 0: predicted 0 three times, 1 once          -> [3, 1, 0]
#   gt 1: predicted 0 once, 1 three times          -> [1, 3, 0]
#   gt 2: predicted 1 once, 2 four times           -> [0, 1, 4]
MATRIX_4X4 = np.array([[3, 1, 0], [1, 3, 0], [0, 1, 4]], dtype=np.int64)
# IoU = TP / (GT + pred - TP): class 0: 3 / (4 + 4 - 3) = 3/5; class 1: 3 / (4 + 5 - 3) = 3/6;
# class 2: 4 / (5 + 4 - 4) = 4/5.  Acc = TP / GT: 3/4, 3/4, 4/5.
IOU_4X4 = [60.0, 50.0, 80.0]
ACC_4X4 = [75.0, 75.0, 80.0]
MIOU_4X4 = 100 * (3 / 5 + 3 / 6 + 4 / 5) / 3  # 63.333...
MACC_4X4 = 100 * (3 / 4 + 3 / 4 + 4 / 5) / 3  # 76.666...
PACC_4X4 = 100 * 10 / 13  # TP 3 + 3 + 4 of 13 pixels
FWIOU_4X4 = 100 * (4 * 3 / 5 + 4 * 3 / 6 + 5 * 4 / 5) / 13  # GT-frequency weights 4, 4, 5


def test_hand_computed_4x4():
    evaluator = SemSegEvaluator(3, ignore_value=255, class_names=["sky", "tree", "road"])
    evaluator.process(PRED_4X4, GT_4X4, "a.png")
    np.testing.assert_array_equal(evaluator.confusion_matrix, MATRIX_4X4)
    assert evaluator.confusion_matrix.dtype == np.int64
    results = evaluator.evaluate()
    assert results["mIoU"] == pytest.approx(MIOU_4X4)
    assert results["mAcc"] == pytest.approx(MACC_4X4)
    assert results["pAcc"] == pytest.approx(PACC_4X4)
    assert results["fwIoU"] == pytest.approx(FWIOU_4X4)
    assert results["pixels"] == 13
    assert results["num_images"] == 1
    assert results["num_classes"] == 3
    assert results["num_classes_in_mean"] == 3
    assert results["absent_classes"] == "zero"
    for name, iou, acc, gt_pixels, pred_pixels in zip(
        ["sky", "tree", "road"], IOU_4X4, ACC_4X4, [4, 4, 5], [4, 5, 4], strict=True
    ):
        row = results["per_class"][name]
        assert row["IoU"] == pytest.approx(iou)
        assert row["Acc"] == pytest.approx(acc)
        assert (row["gt_pixels"], row["pred_pixels"]) == (gt_pixels, pred_pixels)


def test_predictions_on_ignore_pixels_do_not_count():
    prediction = PRED_4X4.copy()
    # whatever is predicted on the three ignore pixels, the matrix stays the same
    prediction[GT_4X4 == 255] = 2
    evaluator = SemSegEvaluator(3)
    evaluator.process(prediction, GT_4X4)
    np.testing.assert_array_equal(evaluator.confusion_matrix, MATRIX_4X4)


def _absent_class_example() -> tuple[np.ndarray, np.ndarray]:
    """5 classes: class 3 predicted once but never labelled; class 4 neither."""
    prediction = PRED_4X4.copy()
    prediction[1, 3] = 3  # was 0 on a gt-1 pixel
    return prediction, GT_4X4


def test_absent_classes_zero_policy():
    prediction, label = _absent_class_example()
    evaluator = SemSegEvaluator(5, absent_classes="zero")
    evaluator.process(prediction, label)
    results = evaluator.evaluate()
    # rows by hand: gt0 [3,1,0,0,0], gt1 [0,3,0,1,0], gt2 [0,1,4,0,0]; pred counts [3,5,4,1,0]
    # IoU: 3/(4+3-3) = 3/4, 3/(4+5-3) = 1/2, 4/(5+4-4) = 4/5, class 3: 0/(0+1-0) = 0,
    # class 4: no GT, no prediction -> out of the mean
    assert results["mIoU"] == pytest.approx(100 * (3 / 4 + 1 / 2 + 4 / 5 + 0) / 4)  # 51.25
    assert results["num_classes_in_mean"] == 4
    assert results["per_class"]["3"]["IoU"] == 0.0
    assert results["per_class"]["3"]["Acc"] is None
    assert results["per_class"]["3"]["pred_pixels"] == 1
    assert results["per_class"]["4"]["IoU"] is None
    assert results["per_class"]["4"]["Acc"] is None
    # mAcc, pAcc and fwIoU only look at classes with GT pixels, under both policies
    assert results["mAcc"] == pytest.approx(100 * (3 / 4 + 3 / 4 + 4 / 5) / 3)
    assert results["pAcc"] == pytest.approx(100 * 10 / 13)
    assert results["fwIoU"] == pytest.approx(100 * (4 * 3 / 4 + 4 * 1 / 2 + 5 * 4 / 5) / 13)
    assert results["classes_without_gt"] == ["3", "4"]


def test_absent_classes_exclude_policy():
    prediction, label = _absent_class_example()
    evaluator = SemSegEvaluator(5, absent_classes="exclude")
    evaluator.process(prediction, label)
    results = evaluator.evaluate()
    # only the classes with GT pixels: (3/4 + 1/2 + 4/5) / 3 = 68.33
    assert results["mIoU"] == pytest.approx(100 * (3 / 4 + 1 / 2 + 4 / 5) / 3)
    assert results["num_classes_in_mean"] == 3
    assert results["absent_classes"] == "exclude"
    assert results["per_class"]["3"]["IoU"] is None
    assert results["per_class"]["4"]["IoU"] is None
    assert results["mAcc"] == pytest.approx(100 * (3 / 4 + 3 / 4 + 4 / 5) / 3)


def test_zero_policy_is_detectron2_v06_formula():
    # d2 v0.6: sum of IoU over classes with GT / number of classes with GT or prediction
    prediction, label = _absent_class_example()
    evaluator = SemSegEvaluator(5)
    evaluator.process(prediction, label)
    assert evaluator.evaluate()["mIoU"] == pytest.approx(100 * (3 / 4 + 1 / 2 + 4 / 5) / 4)


def test_invalid_policy_is_value_error():
    with pytest.raises(ValueError, match="absent_classes"):
        SemSegEvaluator(3, absent_classes="nan")


def test_847_classes_uint16_labels_above_255():
    num_classes = 847
    label = np.array([[300, 300, 846], [5, 65535, 846]], dtype=np.uint16)
    prediction = np.array([[300, 5, 846], [5, 300, 846]], dtype=np.int64)
    names = [f"class{index}" for index in range(num_classes)]
    evaluator = SemSegEvaluator(num_classes, ignore_value=65535, class_names=names)
    evaluator.process(prediction, label, "ADE_val_00000001.tif")
    results = evaluator.evaluate()
    # pairs (gt, pred): (300,300) (300,5) (846,846) (5,5) (846,846); the ignore pixel is dropped
    # class 300: TP 1, GT 2, pred 1 -> 1 / (2 + 1 - 1) = 1/2
    # class 846: TP 2, GT 2, pred 2 -> 1
    # class 5:   TP 1, GT 1, pred 2 -> 1 / (1 + 2 - 1) = 1/2
    assert results["per_class"]["class300"] == {
        "IoU": 50.0,
        "Acc": 50.0,
        "gt_pixels": 2,
        "pred_pixels": 1,
    }
    assert results["per_class"]["class846"]["IoU"] == 100.0
    assert results["per_class"]["class5"]["IoU"] == 50.0
    # 300 - 256 = 44: a uint8 cast would have put these pixels there
    assert results["per_class"]["class44"]["gt_pixels"] == 0
    assert results["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert results["num_classes_in_mean"] == 3
    assert results["pixels"] == 5


def test_uint16_labels_are_not_truncated():
    num_classes = 600
    label = np.full((8, 8), 261, dtype=np.uint16)  # 261 % 256 == 5
    prediction = np.full((8, 8), 261, dtype=np.uint16)
    for source in (
        (prediction, label),
        (torch.from_numpy(prediction.astype(np.int32)), torch.from_numpy(label)),
    ):
        evaluator = SemSegEvaluator(num_classes, ignore_value=65535)
        evaluator.process(*source)
        matrix = evaluator.confusion_matrix
        assert matrix[261, 261] == 64
        assert matrix[5].sum() == 0 and matrix[:, 5].sum() == 0


@pytest.mark.parametrize("ignore_value", [-1, 1 << 40], ids=["negative", "huge"])
def test_ignore_values_outside_the_lookup_table(ignore_value):
    label = GT_4X4.astype(np.int64)
    label[label == 255] = ignore_value
    evaluator = SemSegEvaluator(3, ignore_value=ignore_value)
    evaluator.process(PRED_4X4, label)
    evaluator.process(torch.from_numpy(PRED_4X4), torch.from_numpy(label))
    np.testing.assert_array_equal(evaluator.confusion_matrix, 2 * MATRIX_4X4)
    label[0, 0] = 5
    with pytest.raises(EvaluationError, match=r"value 5 \(1 pixel out of range\)"):
        evaluator.process(PRED_4X4, label, "odd.png")


def test_uint8_labels_with_many_classes_warn():
    evaluator = SemSegEvaluator(847, ignore_value=65535)
    evaluator.process(np.full((2, 2), 7, dtype=np.int64), np.full((2, 2), 7, dtype=np.uint8))
    assert any("uint8" in message for message in evaluator.evaluate()["warnings"])


def test_out_of_range_label_names_source_and_value():
    evaluator = SemSegEvaluator(3)
    label = GT_4X4.copy()
    label[0, 0] = 7
    with pytest.raises(EvaluationError, match=r"frame_0042\.png.*value 7") as caught:
        evaluator.process(PRED_4X4, label, "frame_0042.png")
    assert isinstance(caught.value, OvsegError)
    # nothing of the rejected image was counted
    assert evaluator.confusion_matrix.sum() == 0
    assert evaluator.num_images == 0
    with pytest.raises(EvaluationError, match=r"value -1"):
        evaluator.process(PRED_4X4, label.astype(np.int64) - 8, "negative.png")


def test_out_of_range_prediction_is_an_error():
    evaluator = SemSegEvaluator(3)
    prediction = PRED_4X4.copy()
    prediction[3, 3] = 3
    with pytest.raises(EvaluationError, match=r"prediction of b\.png.*3"):
        evaluator.process(prediction, GT_4X4, "b.png")


def test_bad_maps_are_errors():
    evaluator = SemSegEvaluator(3)
    with pytest.raises(EvaluationError, match=r"c\.png.*size"):
        evaluator.process(PRED_4X4[:3], GT_4X4, "c.png")
    with pytest.raises(EvaluationError, match="dtype"):
        evaluator.process(PRED_4X4.astype(np.float32), GT_4X4)
    with pytest.raises(EvaluationError, match="shape"):
        evaluator.process(PRED_4X4[None], GT_4X4[None])
    with pytest.raises(EvaluationError, match="no pixel"):
        evaluator.evaluate()


def test_bad_constructor_arguments():
    with pytest.raises(EvaluationError, match="ignore_value 255"):
        SemSegEvaluator(847, ignore_value=255)
    with pytest.raises(EvaluationError, match="2 class names for 3 classes"):
        SemSegEvaluator(3, class_names=["a", "b"])
    with pytest.raises(EvaluationError, match="'a' appears more than once"):
        SemSegEvaluator(3, class_names=["a", "b", "a"])


def test_torch_inputs_match_numpy():
    reference = SemSegEvaluator(3)
    reference.process(PRED_4X4, GT_4X4)
    for prediction, label in (
        (torch.from_numpy(PRED_4X4), torch.from_numpy(GT_4X4)),
        (torch.from_numpy(PRED_4X4).to(torch.int16), torch.from_numpy(GT_4X4).long()),
        (PRED_4X4.astype(np.uint8), torch.from_numpy(GT_4X4)),
    ):
        evaluator = SemSegEvaluator(3)
        evaluator.process(prediction, label)
        np.testing.assert_array_equal(evaluator.confusion_matrix, reference.confusion_matrix)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_numpy():
    pairs = [_random_pair(index, num_classes=300) for index in range(3)]
    reference = SemSegEvaluator(300, ignore_value=65535)
    evaluator = SemSegEvaluator(300, ignore_value=65535)
    for prediction, label in pairs:
        reference.process(prediction, label)
        # the label stays on the CPU: a mixed pair is counted on the prediction's device
        evaluator.process(torch.from_numpy(prediction).cuda(), label)
    np.testing.assert_array_equal(evaluator.confusion_matrix, reference.confusion_matrix)
    assert evaluator.evaluate() == reference.evaluate()


def _random_pair(index: int, num_classes: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible (prediction int64, label uint16) pair of varying size, ~10 % ignore."""
    rng = np.random.default_rng(index)
    shape = (11 + index, 17 + 2 * index)
    label = rng.integers(0, num_classes, size=shape).astype(np.uint16)
    label[rng.random(shape) < 0.1] = 65535
    # mostly right, so IoUs are not all tiny
    prediction = np.where(rng.random(shape) < 0.6, label, rng.integers(0, num_classes, shape))
    prediction = np.where(label == 65535, rng.integers(0, num_classes, shape), prediction)
    return prediction.astype(np.int64), label


def test_process_batch_equals_repeated_process():
    pairs = [_random_pair(index) for index in range(4)]
    one_by_one = SemSegEvaluator(300, ignore_value=65535)
    for prediction, label in pairs:
        one_by_one.process(prediction, label)
    batched = SemSegEvaluator(300, ignore_value=65535)
    predictions, labels = zip(*pairs, strict=True)
    batched.process_batch(predictions, labels, [f"{index}.tif" for index in range(4)])
    np.testing.assert_array_equal(batched.confusion_matrix, one_by_one.confusion_matrix)
    assert batched.evaluate() == one_by_one.evaluate()
    # a stacked (B, H, W) tensor works too
    stacked = SemSegEvaluator(3)
    stacked.process_batch(torch.from_numpy(np.stack([PRED_4X4] * 2)), np.stack([GT_4X4] * 2))
    np.testing.assert_array_equal(stacked.confusion_matrix, 2 * MATRIX_4X4)
    with pytest.raises(EvaluationError, match=r"2\.tif"):
        bad = list(labels)
        bad[2] = bad[2].astype(np.int64) + 70000
        batched.process_batch(predictions, bad, [f"{index}.tif" for index in range(4)])


def test_reset_forgets():
    evaluator = SemSegEvaluator(3)
    evaluator.process(PRED_4X4, GT_4X4)
    evaluator.reset()
    assert evaluator.confusion_matrix.sum() == 0 and evaluator.num_images == 0


def test_guards():
    # everything predicted as class 0, labels all class 1: mIoU 0 and one dominant class
    evaluator = SemSegEvaluator(4, class_names=["wall", "floor", "sky", "cat"])
    evaluator.process(np.zeros((4, 4), np.int64), np.ones((4, 4), np.uint8))
    results = evaluator.evaluate()
    assert results["mIoU"] == 0.0
    warnings = results["warnings"]
    assert any("mIoU is 0.00 %" in message for message in warnings)
    assert any("100.0 % of the evaluated pixels are predicted as 'wall'" in m for m in warnings)
    assert any(m.startswith("note: 3 of 4 classes have no ground-truth pixel") for m in warnings)
    # the hand example raises none of these
    evaluator = SemSegEvaluator(3)
    evaluator.process(PRED_4X4, GT_4X4)
    assert evaluator.evaluate()["warnings"] == []


def test_write_results(tmp_path):
    evaluator = SemSegEvaluator(3, class_names=["sky", "tree|bush", "road"])
    evaluator.process(PRED_4X4, GT_4X4)
    results = evaluator.evaluate()
    protocol = {
        "benchmark": "tiny_3",
        "class_file_sha256": "abc123",
        "images": 1,
        "config": "model:\n  name: tiny\n",
        "weights": {"clip": "openai"},
    }
    extra = {"protocol": protocol}
    json_path, markdown_path = write_results(results, tmp_path / "eval", extra=extra)
    assert json_path == tmp_path / "eval" / "results.json"
    stored = json.loads(json_path.read_text(encoding="utf-8"))
    assert stored["protocol"] == protocol
    assert stored["mIoU"] == pytest.approx(MIOU_4X4)
    assert stored["per_class"]["tree|bush"]["IoU"] == pytest.approx(50.0)
    assert stored["absent_classes"] == "zero" and stored["num_classes_in_mean"] == 3
    markdown = markdown_path.read_text(encoding="utf-8")
    assert markdown == results_to_markdown(results, extra)
    assert "| 63.33 | 76.67 | 76.92 | 64.62 | 3 / 3 | zero | 1 | 13 |" in markdown
    assert "| tree\\|bush | 50.00 | 75.00 | 4 | 5 |" in markdown
    assert "- protocol.benchmark: tiny_3\n- protocol.class_file_sha256: abc123\n" in markdown
    # a multi-line config dump and nested containers stay in the JSON
    assert "name: tiny" not in markdown and "openai" not in markdown
    with pytest.raises(ValueError, match="mIoU"):
        write_results(results, tmp_path / "clash", extra={"mIoU": 99.0})
    # only the two files, no temporary left behind
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == [
        "results.json",
        "results.md",
    ]


def test_markdown_marks_excluded_classes():
    prediction, label = _absent_class_example()
    evaluator = SemSegEvaluator(5, absent_classes="exclude")
    evaluator.process(prediction, label)
    markdown = results_to_markdown(evaluator.evaluate())
    assert "| 3 | – | – | 0 | 1 |" in markdown
    assert "| 4 | – | – | 0 | 0 |" in markdown


# shards of _random_pair indices per rank: uneven (3 vs 2) and one rank without images
_SHARDINGS = {"uneven": [[0, 1, 2], [3, 4]], "empty_rank": [[0, 1, 2, 3, 4], []]}


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, shards in _SHARDINGS.items():
            evaluator = SemSegEvaluator(300, ignore_value=65535)
            for index in shards[rank]:
                evaluator.process(*_random_pair(index), source=f"{index}.tif")
            matrix = evaluator.reduced_confusion_matrix()
            results = evaluator.evaluate()
            assert (matrix is None) == (rank != 0) and (results is None) == (rank != 0)
            if rank == 0:
                np.save(f"{out_dir}/{name}_matrix.npy", matrix)
                with open(f"{out_dir}/{name}_results.json", "w", encoding="utf-8") as handle:
                    json.dump(results, handle)
            # distributed=False keeps each rank's own numbers even inside a process group
            local = SemSegEvaluator(300, ignore_value=65535, distributed=False)
            for index in shards[rank]:
                local.process(*_random_pair(index))
            if shards[rank]:
                assert local.evaluate()["num_images"] == len(shards[rank])
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    single = SemSegEvaluator(300, ignore_value=65535)
    for index in range(5):
        single.process(*_random_pair(index))
    expected_matrix = single.confusion_matrix
    expected_results = json.loads(json.dumps(single.evaluate()))

    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for name in _SHARDINGS:
        matrix = np.load(tmp_path / f"{name}_matrix.npy")
        assert matrix.dtype == np.int64
        np.testing.assert_array_equal(matrix, expected_matrix)
        results = json.loads((tmp_path / f"{name}_results.json").read_text(encoding="utf-8"))
        assert results == expected_results
        assert results["num_images"] == 5
        assert not math.isnan(results["mIoU"])
