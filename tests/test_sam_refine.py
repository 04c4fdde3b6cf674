"""SAM refinement (specs/trident.md step 8) as its own post-processor: prompts, one batched
decoder call per class, the full-resolution merge in both compat modes against a direct
computation, refined scores, and refinement after dense_clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg.errors import ConfigError
from ovseg.methods.base import Prediction
from ovseg.methods.sam_refine import (
    RefineConfig,
    SamRefiner,
    half_resolution,
    nearest_index,
)

TINY_TRIDENT = "tiny/trident_tiny.yaml"


@pytest.fixture(scope="module")
def trident():
    return ovseg.build_model(ovseg.get_config(TINY_TRIDENT))


@pytest.fixture(scope="module")
def square_features(trident):
    with torch.inference_mode():  # tiny SAM: input 256, frame 256 x 256 for a square image
        return trident.sam_features(np.zeros((40, 40, 3), np.uint8))


class StubDecoder:
    """Stands in for SAM's decoder: per call, the low-resolution logits and IoU of each prompt,
    chosen by the test (one answer per prompt, in call order)."""

    def __init__(self, sam, answers):
        self.sam = sam
        self.img_size = sam.img_size
        self.answers = list(answers)
        self.calls = []

    def predict_masks(self, features, points, point_labels, boxes, mask_inputs,
                      multimask_output=False):
        count = boxes.shape[0]
        self.calls.append(dict(points=points, labels=point_labels, boxes=boxes,
                               mask=mask_inputs, multimask=multimask_output))
        taken, self.answers = self.answers[:count], self.answers[count:]
        logits = torch.cat([answer[0] for answer in taken])
        return logits, torch.tensor([[answer[1]] for answer in taken])


def settings(**kw):
    return RefineConfig(**{"enabled": True, "coarse_thresh": 0.15, "min_component": 225,
                           "iou_thresh": 0.8, **kw})


def left_half(side=64, value=10.0):
    logits = torch.full((1, 1, side, side), -value)
    logits[..., : side // 2] = value
    return logits


EMPTY = torch.full((1, 1, 64, 64), -10.0)


def coarse_prediction(size=(80, 80)):
    """A coarse prediction at full resolution (its scores are its probabilities): background
    0.8; class 1 in a square (rows/cols 10:50) at 0.7; class 2 in a 24 x 40 block (rows 52:76,
    cols 20:60) at 0.6, where class 1 has 0.3."""
    probs = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1).repeat(1, *size)
    probs[:, 10:50, 10:50] = torch.tensor([0.2, 0.7, 0.1]).view(3, 1, 1)
    probs[:, 52:76, 20:60] = torch.tensor([0.1, 0.3, 0.6]).view(3, 1, 1)
    labels = probs.argmax(0).numpy()
    return Prediction(labels, ["background", "a", "b"], probs, lambda band: band)


def full_resolution(low_logits, sam_size, input_size, image_size, size):
    """segment_anything's postprocess_masks, then a bilinear resize to the image size."""
    up = F.interpolate(low_logits, size=(sam_size, sam_size), mode="bilinear",
                       align_corners=False)[..., : input_size[0], : input_size[1]]
    up = F.interpolate(up, size=image_size, mode="bilinear", align_corners=False)
    return F.interpolate(up, size=size, mode="bilinear", align_corners=False)[:, 0]


def direct_merge(coarse, accepted, rejected, compat):
    """The merge written out on whole maps. accepted: class -> (K, H, W) full-res logits;
    rejected: class -> (H, W) bool full-res rejected components."""
    probs = coarse.scores
    refined = torch.zeros_like(probs)
    decided = torch.zeros(probs.shape[1:], dtype=torch.bool)
    for c, logits in accepted.items():
        union = (logits > 0).any(0)
        refined[c] = torch.where(union, torch.sigmoid(logits).amax(0) * probs[c], 0.0)
        decided |= union
    if compat == "fixed":
        for c, region in rejected.items():
            inside = region & decided
            refined[c] = torch.where(inside, torch.maximum(refined[c], probs[c]), refined[c])
    labels = torch.where(decided, refined.argmax(0), torch.from_numpy(coarse.labels))
    return labels, torch.where(decided, refined, probs)


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_merge_at_full_resolution_with_a_rejected_component(trident, square_features, compat):
    coarse = coarse_prediction()
    # answers in class order: background (one component: rejected), class 1 (accepted, left
    # half of SAM's frame), class 2 (rejected)
    stub = StubDecoder(trident.sam, [(EMPTY, 0.5), (left_half(), 0.95), (EMPTY, 0.3)])
    refined = SamRefiner(stub, settings(compat=compat))(coarse, square_features, (80, 80))
    assert len(stub.calls) == 3  # one call per class

    logits = full_resolution(left_half(), 256, (256, 256), (80, 80), (80, 80))
    half_labels, _ = half_resolution(torch.from_numpy(coarse.labels), coarse.scores)
    rows, cols = nearest_index(80, 40), nearest_index(80, 40)
    up = half_labels[rows[:, None], cols[None, :]]
    rejected = {0: up == 0, 2: up == 2}  # every confident pixel of the class: one component
    expected, expected_scores = direct_merge(coarse, {1: logits}, rejected, compat)
    assert np.array_equal(refined.labels, expected.numpy())
    assert torch.allclose(refined.probabilities(), expected_scores, atol=1e-5)
    # the scores are those the labels were taken from
    assert np.array_equal(refined.labels, refined.probabilities().argmax(0).numpy())

    left = slice(0, 40)
    if compat == "reference":
        # a rejected component never keeps its class against another class's accepted mask:
        # class 1's mask takes the left-hand background and the left part of class 2
        assert (refined.labels[:, left][coarse.labels[:, left] == 0] == 1).all()
        assert (refined.labels[52:76, 20:40] == 1).all()
    else:
        # inside rejected components the coarse probability wins where higher: background 0.8
        # and class 2's 0.6 beat class 1's sigmoid(10) x 0.1 and x 0.3
        assert (refined.labels[:, left][coarse.labels[:, left] == 0] == 0).all()
        assert (refined.labels[52:76, 20:40] == 2).all()
    assert (refined.labels[10:50, 10:50] == 1).all()  # class 1 keeps its square
    assert np.array_equal(refined.labels[:, 41:], coarse.labels[:, 41:])  # no mask there


def test_no_accepted_mask_keeps_every_coarse_label(trident, square_features):
    coarse = coarse_prediction()
    stub = StubDecoder(trident.sam, [(left_half(), 0.8)] * 3)  # IoU 0.8 is not above 0.8
    refined = SamRefiner(stub, settings())(coarse, square_features, (80, 80))
    assert np.array_equal(refined.labels, coarse.labels)
    assert torch.equal(refined.probabilities(), coarse.scores)


def test_all_components_of_a_class_go_through_one_batched_call(trident, square_features):
    coarse = three_squares()
    stub = StubDecoder(trident.sam, [(EMPTY, 0.0)] * 4)
    SamRefiner(stub, settings())(coarse, square_features, (80, 80))
    assert [call["boxes"].shape[0] for call in stub.calls] == [1, 3]
    call = stub.calls[1]
    # boxes and points of the three components at half resolution, scaled 40 -> 256 (x 6.4)
    assert torch.allclose(call["boxes"], torch.tensor([[0.0, 0.0, 14.0, 14.0],
                                                       [25.0, 0.0, 39.0, 14.0],
                                                       [0.0, 25.0, 14.0, 39.0]]) * 6.4)
    assert call["points"].shape == (3, 1, 2) and call["labels"].tolist() == [[1]] * 3
    assert call["mask"].shape == (3, 1, 64, 64) and call["multimask"] is False
    assert float(call["mask"].max()) == pytest.approx(0.005 * 0.9)
    stub = StubDecoder(trident.sam, [(EMPTY, 0.0)] * 4)
    SamRefiner(stub, settings(decoder_batch=2))(coarse, square_features, (80, 80))
    assert [call["boxes"].shape[0] for call in stub.calls] == [1, 2, 1]


def test_components_under_the_minimum_are_skipped(trident, square_features):
    probs = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1).repeat(1, 80, 80)
    probs[:, 0:30, 0:30] = torch.tensor([0.1, 0.8, 0.1]).view(3, 1, 1)  # 15 x 15 = 225 at half
    probs[:, 40:68, 40:68] = torch.tensor([0.1, 0.1, 0.8]).view(3, 1, 1)  # 14 x 14 = 196
    coarse = Prediction(probs.argmax(0).numpy(), ["bg", "a", "b"], probs, lambda band: band)
    stub = StubDecoder(trident.sam, [(EMPTY, 0.0)] * 3)
    SamRefiner(stub, settings())(coarse, square_features, (80, 80))
    assert len(stub.calls) == 2  # background and class 1


def test_reference_compat_passes_the_mask_prompt_unbatched(trident, square_features):
    stub = StubDecoder(trident.sam, [(EMPTY, 0.0)] * 3)
    SamRefiner(stub, settings(compat="reference"))(coarse_prediction(), square_features, (80, 80))
    assert stub.calls[0]["mask"].shape == (1, 64, 64)


def three_squares():
    """Class 1 in three 30 x 30 squares of an 80 x 80 image (three components at half size)."""
    probs = torch.tensor([0.8, 0.1]).view(2, 1, 1).repeat(1, 80, 80)
    for y0, x0 in ((0, 0), (0, 50), (50, 0)):
        probs[:, y0:y0 + 30, x0:x0 + 30] = torch.tensor([0.1, 0.9]).view(2, 1, 1)
    return Prediction(probs.argmax(0).numpy(), ["bg", "a"], probs, lambda band: band)


def test_batching_keeps_the_masks_of_one_call_per_component(trident):
    image = np.random.default_rng(5).integers(0, 256, size=(80, 80, 3), dtype=np.uint8)
    with torch.inference_mode():
        features = trident.sam_features(image)
    coarse = three_squares()
    calls = []
    original = trident.sam.predict_masks

    def spy(*args, **kwargs):
        calls.append(args[3].shape[0])  # boxes
        return original(*args, **kwargs)

    trident.sam.predict_masks = spy
    try:
        batched = SamRefiner(trident.sam, settings(iou_thresh=-1.0))(coarse, features, (80, 80))
        single = SamRefiner(trident.sam, settings(iou_thresh=-1.0, decoder_batch=1))(
            coarse, features, (80, 80))
    finally:
        del trident.sam.predict_masks
    assert calls == [1, 3, 1, 1, 1, 1]  # one call per class, then one per component
    for a, b in zip(batched.refinement.classes, single.refinement.classes, strict=True):
        assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert np.array_equal(batched.labels, single.labels)
    assert torch.allclose(batched.probabilities(), single.probabilities(), atol=1e-5)


def test_refined_scores_give_the_labels(trident):
    image = np.random.default_rng(6).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    result = trident.predict(image, "cat, dog, sky")
    assert result.refinement is not None and result.refinement.classes
    assert np.array_equal(result.labels, result.probabilities().argmax(0).numpy())


def test_dense_clip_with_refinement_changes_labels_only_through_accepted_masks():
    image = np.random.default_rng(7).integers(0, 256, size=(70, 110, 3), dtype=np.uint8)
    refine = ["model.sam.arch", "tiny", "model.sam.weights", "random",
              "model.refine.enabled", "true", "model.refine.coarse_thresh", "0.0",
              "model.refine.min_component", "16", "model.refine.iou_thresh", "0.0"]
    plain = ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml"))
    refined_model = ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml", refine))
    assert plain.sam is None and refined_model.sam is not None
    before = plain.predict(image, "cat, dog, sky")
    after = refined_model.predict(image, "cat, dog, sky")
    decided = np.zeros(before.labels.shape, dtype=bool)
    for rows, coarse in before.bands():
        decided[rows] = after.refinement.merge(rows, coarse)[1].numpy()
    changed = after.labels != before.labels
    assert changed.any()  # the refinement did something on this image
    assert not (changed & ~decided).any()  # and only where an accepted mask decided
    # the same state answers another vocabulary without the SAM encoder running again
    state = refined_model.encode(image)
    assert state.sam_features is not None


def test_bad_refine_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.refine.compat"):
        ovseg.build_model(ovseg.get_config(TINY_TRIDENT, ["model.refine.compat", "mmseg"]))
    with pytest.raises(ConfigError, match="model.refine.decoder_batch"):
        ovseg.build_model(ovseg.get_config(TINY_TRIDENT, ["model.refine.decoder_batch", "0"]))
