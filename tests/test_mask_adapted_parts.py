"""Mask-adapted CLIP's parts, pinned with numbers (mask_adapted.md, "Tests to pin").

Masked crops (fill colour, tight box, strict threshold, bounded batches), mask prompt tuning
(exactly the blank patches at the three insertion points), the ensemble (invalid queries,
no-object column), the soft-mask semantic map, the Hungarian matcher (against brute force),
the set criterion (against a direct computation) and a save/load round trip of the prompts
and the no-object embedding.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ovseg.config.schema import ClipConfig
from ovseg.encoders.clip import OPENAI_MEAN, OPENAI_STD, TINY_CLIP, build_clip
from ovseg.io import atomic_path, load_state_dict_file
from ovseg.layers import masked_crops
from ovseg.layers.mask_ensemble import (
    clip_ensemble_weight,
    clip_region_logits,
    ensemble_probabilities,
    proposal_probabilities,
    semantic_map,
)
from ovseg.layers.masked_crops import (
    CLIP_MEAN_COLOUR,
    CLIP_STD_COLOUR,
    binary_masks,
    crop_region,
    mask_box,
    masked_crop_batches,
)
from ovseg.modeling.mask_criterion import MaskCriterion, MaskPredictions
from ovseg.modeling.mask_prompt_tuning import MaskPrompts, mask_prompted_tokens, patch_coverage
from ovseg.modeling.matcher import HungarianMatcher, MaskTargets, optimal_assignment

# ----------------------------------------------------------------------------- masked crops


def _hand_image() -> torch.Tensor:
    """(3, 5, 6): channel c, row y, column x holds 100 c + 10 y + x."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(5), torch.arange(6), indexing="ij")
    return (100 * c + 10 * y + x).float()


def _hand_probs() -> torch.Tensor:
    """(5, 5, 6) mask probabilities of five queries, threshold 0.5."""
    probs = torch.full((5, 5, 6), 0.1)
    for y, x in [(1, 2), (1, 3), (2, 2), (3, 4)]:  # query 0: an irregular region
        probs[0, y, x] = 0.9
    probs[0, 2, 3] = 0.5  # exactly at the threshold: outside
    probs[1] = 0.5  # every pixel at the threshold: an empty mask, invalid
    probs[2] = 0.0  # empty: invalid
    probs[3, 4, 0] = 0.51  # one pixel
    probs[4] = 1.0  # the whole image
    return probs


def test_fill_colour_is_clip_mean_on_0_255_scale():
    assert CLIP_MEAN_COLOUR == pytest.approx((122.7709383, 116.7460125, 104.0937362), abs=1e-6)
    assert CLIP_MEAN_COLOUR == pytest.approx(tuple(255 * c for c in OPENAI_MEAN), abs=1e-9)
    assert CLIP_STD_COLOUR == pytest.approx(tuple(255 * c for c in OPENAI_STD), abs=1e-9)
    # the spec's display (122.8, 116.8, 104.1) is the same colour, loosely rounded (116.746)
    assert CLIP_MEAN_COLOUR == pytest.approx((122.8, 116.8, 104.1), abs=0.06)


def test_threshold_is_strict():
    probs = torch.tensor([0.4999, 0.5, 0.5001])
    assert binary_masks(probs, 0.5).tolist() == [False, False, True]


def test_tight_crop_and_mean_fill_on_a_hand_mask():
    image, probs = _hand_image(), _hand_probs()
    mask = binary_masks(probs[0], 0.5)
    box = mask_box(mask)
    assert box == (2, 1, 5, 4)  # x1, y1, x2, y2 exclusive: rows 1..3, columns 2..4
    assert mask_box(binary_masks(probs[1], 0.5)) is None
    assert mask_box(binary_masks(probs[3], 0.5)) == (0, 4, 1, 5)
    region, region_mask = crop_region(image, mask, box)
    assert region_mask.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    f0, f1, f2 = CLIP_MEAN_COLOUR
    expected = torch.tensor([
        [[12, 13, f0], [22, f0, f0], [f0, f0, 34]],
        [[112, 113, f1], [122, f1, f1], [f1, f1, 134]],
        [[212, 213, f2], [222, f2, f2], [f2, f2, 234]],
    ])
    torch.testing.assert_close(region, expected)
    black, _ = crop_region(image, mask, box, fill=(0.0, 0.0, 0.0))
    assert black[0].tolist() == [[12, 13, 0], [22, 0, 0], [0, 0, 34]]


def test_crop_batches_skip_invalid_queries_normalise_then_resize(monkeypatch):
    image, probs = _hand_image(), _hand_probs()
    thresholded = []
    original = masked_crops.binary_masks

    def recording(mask_probs, threshold):
        thresholded.append(mask_probs.shape[0])
        return original(mask_probs, threshold)

    monkeypatch.setattr(masked_crops, "binary_masks", recording)
    batches_iter = masked_crop_batches(image, probs, threshold=0.5, crop_batch=2)
    assert inspect.isgenerator(batches_iter)  # lazy: nothing is held before it is asked for
    batches = list(batches_iter)
    # queries 1 (all exactly 0.5) and 2 (empty) are invalid; at most 2 crops a batch
    assert [b.queries.tolist() for b in batches] == [[0, 3], [4]]
    assert thresholded == [2, 2, 1]  # never more than crop_batch full-size masks at once
    assert batches[0].boxes.tolist() == [[2, 1, 5, 4], [0, 4, 1, 5]]
    assert batches[0].images.shape == (2, 3, 224, 224)
    assert batches[0].masks.shape == (2, 224, 224)
    # query 3: one pixel (40, 140, 240) -> a constant crop, CLIP-normalised
    one_pixel = batches[0].images[1]
    for channel, value in enumerate((-1.2083254690, 0.3489904610, 1.9325960033)):
        assert torch.allclose(one_pixel[channel], torch.tensor(value), atol=1e-5)
    # query 0: the hand region, normalised, then bicubic to 224 (aspect not kept)
    region, region_mask = crop_region(image, binary_masks(probs[0], 0.5), (2, 1, 5, 4))
    mean = torch.tensor(CLIP_MEAN_COLOUR).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD_COLOUR).view(1, 3, 1, 1)
    expected = F.interpolate((region[None] - mean) / std, size=(224, 224), mode="bicubic",
                             align_corners=False)
    torch.testing.assert_close(batches[0].images[0], expected[0])
    # the fill colour normalises to 0
    assert ((torch.tensor(CLIP_MEAN_COLOUR).view(3, 1, 1) - mean[0]) / std[0]).abs().max() == 0
    # nearest-resized 3x3 mask: source cell floor(i * 3 / 224): 0..74, 75..149, 150..223
    mask = batches[0].masks[0]
    cells = [(0, 75), (75, 150), (150, 224)]
    for r, (r0, r1) in enumerate(cells):
        for c, (c0, c1) in enumerate(cells):
            assert (mask[r0:r1, c0:c1] == region_mask[r, c]).all()
    assert batches[1].images.shape == (1, 3, 224, 224)  # the whole image, no fill


def test_crop_batches_with_no_valid_query_yield_nothing():
    image = _hand_image()
    probs = torch.full((3, 5, 6), 0.5)
    assert list(masked_crop_batches(image, probs, threshold=0.5, crop_batch=4)) == []
    assert list(masked_crop_batches(image, probs[:0], threshold=0.5, crop_batch=4)) == []


# ----------------------------------------------------------------------------- MPT


@pytest.fixture(scope="module")
def clip():
    return build_clip(ClipConfig(arch=TINY_CLIP, weights="random"))


def _mpt_masks() -> torch.Tensor:
    """(3, 224, 224): a partial mask, an empty one, a full one."""
    masks = torch.zeros(3, 224, 224)
    masks[0, 20:36, 5:17] = 1  # patch rows 1-2, patch columns 0-1 (column 1 by one pixel)
    masks[0, 223, 223] = 1  # one pixel in the last patch
    masks[2] = 1
    return masks


# covered patches of mask 0 (row-major, 14 x 14 grid): (1,0), (1,1), (2,0), (2,1), (13,13)
_COVERED_0 = [14, 15, 28, 29, 195]


def test_patch_coverage_is_any_pixel_inside():
    coverage = patch_coverage(_mpt_masks(), 16)
    assert coverage.shape == (3, 196)
    assert torch.nonzero(coverage[0]).flatten().tolist() == _COVERED_0
    assert coverage[1].sum() == 0 and coverage[2].sum() == 196
    # direct: a patch is covered iff any of its 16 x 16 pixels is in the mask
    direct = _mpt_masks()[0].reshape(14, 16, 14, 16).amax(dim=(1, 3)).flatten()
    assert torch.equal(coverage[0], direct)


class _Recorder:
    """Captures module inputs and outputs with forward hooks (test-only)."""

    def __init__(self, clip):
        visual = clip.model.visual
        self.records: dict[str, torch.Tensor] = {}
        self.handles = [
            visual.conv1.register_forward_hook(self._output("conv1")),
            visual.ln_pre.register_forward_pre_hook(self._input("ln_pre_in")),
        ]
        for i, block in enumerate(visual.transformer.resblocks):
            self.handles.append(block.register_forward_pre_hook(self._input(f"in{i}")))
            self.handles.append(block.register_forward_hook(self._output(f"out{i}")))

    def _output(self, name):
        def hook(module, args, output):
            self.records[name] = output.detach().clone()
        return hook

    def _input(self, name):
        def hook(module, args):
            self.records[name] = args[0].detach().clone()
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def _record(clip, fn):
    recorder = _Recorder(clip)
    try:
        result = fn()
    finally:
        recorder.close()
    return result, recorder.records


def test_mpt_replaces_exactly_the_blank_patches_at_three_points(clip):
    torch.manual_seed(0)
    prompts = MaskPrompts.for_encoder(clip, depth=3, init_std=0.02)
    assert prompts.mask_embedding.shape == (3, 196, 128)
    prompt = prompts.mask_embedding.detach()
    images = clip.normalize(torch.rand(3, 3, 224, 224) * 255)
    masks = _mpt_masks()
    with torch.no_grad():
        _, plain = _record(clip, lambda: clip.encode_image(images))
        embeddings, mpt = _record(clip, lambda: prompts(clip, images, masks))
    assert embeddings.shape == (3, 64)
    visual = clip.model.visual
    pos = visual.positional_embedding.detach()
    blank = 1 - patch_coverage(masks, 16).bool().float()  # (3, 196)
    is_blank = blank.bool()
    assert is_blank.sum(1).tolist() == [191, 196, 0]
    # point 0: patch embeddings before class/positional embeddings; against the run without MPT
    patches = plain["conv1"].flatten(2).transpose(1, 2)
    torch.testing.assert_close(mpt["ln_pre_in"][:, 0], plain["ln_pre_in"][:, 0])  # CLS
    torch.testing.assert_close(mpt["ln_pre_in"][:, 1:][~is_blank],
                               plain["ln_pre_in"][:, 1:][~is_blank])
    expected_blank = (prompt[0] + pos[1:]).expand(3, -1, -1)[is_blank]
    torch.testing.assert_close(mpt["ln_pre_in"][:, 1:][is_blank], expected_blank)
    assert not torch.allclose(mpt["ln_pre_in"][:, 1:][is_blank],
                              (patches + pos[1:])[is_blank])
    # points 1 and 2: after the first and second blocks; CLS and covered tokens untouched
    for point, (before, after) in enumerate([("out0", "in1"), ("out1", "in2")], start=1):
        out, nxt = mpt[before], mpt[after]
        torch.testing.assert_close(nxt[:, 0], out[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(nxt[:, 1:][~is_blank], out[:, 1:][~is_blank], rtol=0, atol=0)
        torch.testing.assert_close(nxt[:, 1:][is_blank],
                                   prompt[point].expand(3, -1, -1)[is_blank])
    # no fourth insertion: the last block's output goes to ln_post/proj as it is
    torch.testing.assert_close(embeddings, clip.project(mpt["out2"][:, 0]))
    # a full mask replaces nothing: every token equals the run without MPT, token by token
    for name in ("ln_pre_in", "out0", "in1", "out1", "in2", "out2"):
        torch.testing.assert_close(mpt[name][2], plain[name][2])
    with torch.no_grad():
        reference = clip.encode_image(images[2:])
    torch.testing.assert_close(embeddings[2:], reference)


def test_mpt_handles_one_crop_and_zero_prompts_blank_the_patches(clip):
    zero = MaskPrompts.for_encoder(clip)
    assert zero.depth == 3 and zero.mask_embedding.abs().sum() == 0
    images = clip.normalize(torch.rand(1, 3, 224, 224) * 255)
    masks = _mpt_masks()[:1]
    with torch.no_grad():
        one = zero(clip, images, masks)  # batch of one: no squeezed batch axis
        tokens = mask_prompted_tokens(clip, images, masks, zero.mask_embedding)
    assert one.shape == (1, 64) and tokens.shape == (1, 197, 128)
    with pytest.raises(ValueError, match="patch positions"):
        mask_prompted_tokens(clip, images[:, :, :112, :112], masks[:, :112, :112],
                             zero.mask_embedding)


def test_mpt_prompts_receive_gradients_through_frozen_clip(clip):
    prompts = MaskPrompts.for_encoder(clip, init_std=0.02)
    images = clip.normalize(torch.rand(2, 3, 224, 224) * 255)
    prompts(clip, images, _mpt_masks()[:2]).sum().backward()
    grad = prompts.mask_embedding.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_save_load_round_trip_of_prompts_and_no_object_embedding(tmp_path, clip):
    class RegionClassifierState(nn.Module):
        def __init__(self, init: bool):
            super().__init__()
            self.mask_prompts = MaskPrompts.for_encoder(clip, init_std=0.02 if init else 0.0)
            # std = text width^-0.5 (tiny CLIP: text width 64); dimension = the joint space
            self.no_object_embedding = nn.Parameter(torch.zeros(1, clip.embed_dim))
            if init:
                nn.init.normal_(self.no_object_embedding, std=64 ** -0.5)

    torch.manual_seed(1)
    saved = RegionClassifierState(init=True)
    path = tmp_path / "region_classifier.safetensors"
    with atomic_path(path) as temporary:
        save_file({k: v.detach().contiguous() for k, v in saved.state_dict().items()},
                  str(temporary))
    state = load_state_dict_file(path)
    assert sorted(state) == ["mask_prompts.mask_embedding", "no_object_embedding"]
    assert state["mask_prompts.mask_embedding"].shape == (3, 196, 128)
    assert state["no_object_embedding"].shape == (1, 64)
    loaded = RegionClassifierState(init=False)
    loaded.load_state_dict(state, strict=True)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    images = clip.normalize(torch.rand(2, 3, 224, 224) * 255)
    with torch.no_grad():
        torch.testing.assert_close(loaded.mask_prompts(clip, images, _mpt_masks()[:2]),
                                   saved.mask_prompts(clip, images, _mpt_masks()[:2]),
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------- ensemble


def _logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


def test_ensemble_with_invalid_query_and_no_object_column():
    # proposals over K = 2 names + no-object; softmax(log p) = p
    proposal_logits = _logits_of([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    # CLIP logits of the valid queries 0 and 2; the huge no-object logit must not matter
    clip_logits = torch.cat([_logits_of([[0.8, 0.2], [0.25, 0.75]]),
                             torch.tensor([[50.0], [50.0]])], dim=1)
    valid = torch.tensor([True, False, True])
    probs, rows = ensemble_probabilities(proposal_logits, clip_logits, valid, clip_weight=0.5)
    assert rows.tolist() == [True, True, True]
    expected = [
        [math.sqrt(0.5 * 0.8), math.sqrt(0.3 * 0.2)],  # valid: sqrt(p_prop p_clip)
        [math.sqrt(0.6), math.sqrt(0.2)],  # invalid: p_prop^(1 - lambda) only
        [math.sqrt(0.1 * 0.25), math.sqrt(0.1 * 0.75)],
    ]
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert probs[0].tolist() == pytest.approx([0.6324555, 0.2449490], abs=1e-6)
    # p_prop drops the no-object column after the softmax: rows sum to 1 - p(no object)
    assert proposal_probabilities(proposal_logits).sum(1).tolist() == pytest.approx(
        [0.8, 0.8, 0.2], abs=1e-6)
    # lambda = 0.7: 0.5^0.3 x 0.8^0.7 and 0.6^0.3 for the invalid query
    probs, _ = ensemble_probabilities(proposal_logits, clip_logits, valid, clip_weight=0.7)
    assert float(probs[0, 0]) == pytest.approx(0.5**0.3 * 0.8**0.7, rel=1e-5)
    assert float(probs[1, 0]) == pytest.approx(0.6**0.3, rel=1e-5)
    # lambda <= 0: CLIP only, valid queries only
    probs, rows = ensemble_probabilities(proposal_logits, clip_logits, valid, clip_weight=0.0)
    assert rows.tolist() == [True, False, True]
    torch.testing.assert_close(probs, torch.tensor([[0.8, 0.2], [0.25, 0.75]]))


def test_ensemble_with_no_valid_query_and_one():
    proposal_logits = _logits_of([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    none = torch.zeros(0, 3)
    probs, rows = ensemble_probabilities(proposal_logits, none, torch.tensor([False, False]), 0.7)
    torch.testing.assert_close(probs, proposal_probabilities(proposal_logits) ** 0.3)
    probs, rows = ensemble_probabilities(proposal_logits, none, torch.tensor([False, False]), 0)
    assert probs.shape == (0, 2) and not rows.any()
    assert semantic_map(probs, torch.rand(2, 4, 5)[rows]).abs().sum() == 0
    one = _logits_of([[0.9, 0.1, 0.5]])
    probs, _ = ensemble_probabilities(proposal_logits, one, torch.tensor([False, True]), 0.5)
    assert float(probs[1, 0]) == pytest.approx(math.sqrt(0.6 * 0.9), rel=1e-5)
    with pytest.raises(ValueError, match="valid"):
        ensemble_probabilities(proposal_logits, one, torch.tensor([True, True]), 0.5)


def test_clip_region_logits_are_100_cosines_with_no_object_last():
    regions = torch.tensor([[3.0, 4.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits = clip_region_logits(regions, texts, torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(logits, torch.tensor([[60.0, 80.0, -60.0]]))


def test_ensemble_weights_per_benchmark():
    assert clip_ensemble_weight("swin_b_vit_l14", "ade20k_150") == 0.7
    assert clip_ensemble_weight("swin_b_vit_l14", "ade20k_847") == 0.7
    assert clip_ensemble_weight("swin_b_vit_l14", "pcontext_59") == 0.6
    assert clip_ensemble_weight("swin_b_vit_l14", "pcontext_459") == 0.6
    assert clip_ensemble_weight("swin_b_vit_l14", "voc_20") == 0.45
    assert clip_ensemble_weight("r101c_vit_b16", "ade20k_150") == 0.7


def test_semantic_map_is_the_soft_mask_einsum():
    torch.manual_seed(2)
    probs, masks = torch.rand(5, 3), torch.rand(5, 4, 6)
    result = semantic_map(probs, masks)
    direct = torch.zeros(3, 4, 6)
    for q in range(5):
        for c in range(3):
            direct[c] += probs[q, c] * masks[q]
    torch.testing.assert_close(result, direct)
    torch.testing.assert_close(result, torch.einsum("qc,qhw->chw", probs, masks))
    # hand value: two queries, one pixel
    hand = semantic_map(torch.tensor([[0.5, 0.1], [0.2, 0.4]]), torch.tensor([[[0.8]], [[0.5]]]))
    torch.testing.assert_close(hand.flatten(), torch.tensor([0.5, 0.28]))


def test_pipeline_with_zero_one_and_many_valid_regions(clip):
    """Crops -> MPT -> region logits -> ensemble -> semantic map, with 0, 1 and 3 valid."""
    torch.manual_seed(3)
    image = torch.rand(3, 40, 56) * 255
    texts, no_object = torch.randn(4, 64), torch.randn(64)
    prompts = MaskPrompts.for_encoder(clip)
    for valid_count in (0, 1, 3):
        probs = torch.rand(5, 40, 56) * 0.4  # all below the 0.4 threshold... except:
        for q in range(valid_count):
            probs[q, 5 * q:5 * q + 8, 3:20] = 0.9
        proposal_logits = torch.randn(5, 5)
        queries, logits = [], []
        with torch.no_grad():
            for batch in masked_crop_batches(image, probs, threshold=0.4, crop_batch=2):
                embeddings = prompts(clip, batch.images, batch.masks)
                queries.append(batch.queries)
                logits.append(clip_region_logits(embeddings, texts, no_object))
        valid = torch.zeros(5, dtype=torch.bool)
        if queries:
            valid[torch.cat(queries)] = True
        clip_logits = torch.cat(logits) if logits else torch.zeros(0, 5)
        assert int(valid.sum()) == valid_count
        p, rows = ensemble_probabilities(proposal_logits, clip_logits, valid, 0.7)
        assert semantic_map(p, probs[rows]).shape == (4, 40, 56)
        p, rows = ensemble_probabilities(proposal_logits, clip_logits, valid, 0.0)
        assert p.shape == (valid_count, 4)
        assert semantic_map(p, probs[rows]).shape == (4, 40, 56)


# ----------------------------------------------------------------------------- matcher


def _brute_force_minimum(cost: torch.Tensor) -> float:
    queries, targets = cost.shape
    return min(
        sum(float(cost[perm[j], j]) for j in range(targets))
        for perm in itertools.permutations(range(queries), targets)
    )


@pytest.mark.parametrize("seed", range(5))
def test_optimal_assignment_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    for queries, targets in [(3, 3), (5, 2), (6, 4), (4, 1), (6, 6)]:
        cost = torch.rand(queries, targets, generator=generator, dtype=torch.float64)
        rows, cols = optimal_assignment(cost)
        assert rows.dtype == torch.int64 and len(rows) == targets
        assert sorted(cols.tolist()) == list(range(targets))
        assert len(set(rows.tolist())) == targets
        assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force_minimum(cost),
                                                              abs=1e-9)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _focal_pixel(x: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    s = _sigmoid(x)
    p_t = s if t else 1 - s
    alpha_t = alpha if t else 1 - alpha
    return alpha_t * (1 - p_t) ** gamma * -math.log(p_t)


def _dice(prob: list[float], target: list[float]) -> float:
    inter = sum(p * t for p, t in zip(prob, target, strict=True))
    return 1 - (2 * inter + 1) / (sum(prob) + sum(target) + 1)


@pytest.mark.parametrize("seed", range(3))
def test_matcher_cost_is_direct_and_assignment_optimal(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, classes, targets = 5, 3, 3
    class_logits = torch.randn(queries, classes + 1, generator=generator)
    mask_logits = torch.randn(queries, 3, 4, generator=generator) * 2
    target = MaskTargets(
        labels=torch.randint(0, classes, (targets,), generator=generator),
        masks=torch.rand(targets, 6, 8, generator=generator) > 0.5,
    )
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(class_logits, mask_logits, target)
    # direct: targets nearest-downsampled 6x8 -> 3x4 take pixel (2i, 2j)
    small = target.masks[:, ::2, ::2].float()
    prob = class_logits.softmax(-1)
    for q in range(queries):
        x = mask_logits[q].flatten().tolist()
        s = [_sigmoid(v) for v in x]
        for j in range(targets):
            t = small[j].flatten().tolist()
            focal = sum(_focal_pixel(v, u) for v, u in zip(x, t, strict=True)) / len(x)
            direct = -float(prob[q, target.labels[j]]) + 20 * focal + _dice(s, t)
            assert float(cost[q, j]) == pytest.approx(direct, rel=1e-5, abs=1e-5)
    [(rows, cols)] = matcher(class_logits[None], mask_logits[None], [target])
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force_minimum(cost), abs=1e-5)


def test_matcher_with_no_target():
    empty = MaskTargets(labels=torch.zeros(0, dtype=torch.int64),
                        masks=torch.zeros(0, 4, 4, dtype=torch.bool))
    [(rows, cols)] = HungarianMatcher()(torch.randn(1, 3, 4), torch.randn(1, 3, 2, 2), [empty])
    assert rows.numel() == 0 and cols.numel() == 0


# ----------------------------------------------------------------------------- criterion


def _hand_example():
    """One image, 2 queries, K = 2; one target (class 0, top half of a 4 x 4 mask)."""
    class_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    mask_logits = torch.tensor([[[[2.0, 2.0], [-2.0, -2.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    masks = torch.zeros(1, 4, 4)
    masks[0, :2] = 1
    return MaskPredictions(class_logits, mask_logits), [MaskTargets(torch.tensor([0]), masks)]


def test_criterion_on_a_hand_example():
    outputs, targets = _hand_example()
    losses = MaskCriterion()(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    # query 0 is matched (class 0, top-half mask); query 1's target is no-object (weight 0.1)
    ce0 = math.log(math.e**2 + 2) - 2
    ce1 = math.log(2 + math.e) - 1
    assert float(losses["loss_ce"]) == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-5)
    assert float(losses["loss_ce"]) == pytest.approx(0.2678993, abs=1e-6)
    # full masks: 2x2 logits bilinearly upsampled to 4x4 give rows 2, 1, -1, -2
    rows, target_rows = [2.0, 1.0, -1.0, -2.0], [1, 1, 0, 0]
    focal = sum(4 * _focal_pixel(x, t) for x, t in zip(rows, target_rows, strict=True)) / 16
    prob = [_sigmoid(x) for x in rows for _ in range(4)]
    dice = _dice(prob, [t for t in target_rows for _ in range(4)])
    assert float(losses["loss_mask"]) == pytest.approx(20 * focal, rel=1e-5)  # / 1 mask
    assert float(losses["loss_dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(losses["loss_mask"]) == pytest.approx(0.1223081, abs=1e-6)
    assert float(losses["loss_dice"]) == pytest.approx(0.1826562, abs=1e-6)


def test_criterion_normalises_by_target_count_and_supervises_every_layer():
    torch.manual_seed(4)
    batch, queries, classes = 2, 4, 3
    targets = [
        MaskTargets(torch.tensor([0, 2]), torch.rand(2, 8, 8) > 0.5),
        MaskTargets(torch.tensor([1]), torch.rand(1, 6, 10) > 0.5),  # another size
    ]

    def predictions():
        return MaskPredictions(torch.randn(batch, queries, classes + 1, requires_grad=True),
                               torch.randn(batch, queries, 4, 5, requires_grad=True))

    final, aux = predictions(), [predictions() for _ in range(5)]
    criterion = MaskCriterion()
    losses = criterion(final, targets, aux)
    values = {name: float(value.detach()) for name, value in losses.items()}
    assert len(losses) == 3 * 6
    assert {f"loss_dice_{i}" for i in range(5)} <= set(losses)
    # direct computation of the final layer with the matcher's assignment
    indices = HungarianMatcher()(final.class_logits.detach(), final.mask_logits.detach(),
                                 targets)
    focal_sum = dice_sum = 0.0
    ce_num = ce_den = 0.0
    for b, (rows, cols) in enumerate(indices):
        matched = dict(zip(rows.tolist(), cols.tolist(), strict=True))
        size = targets[b].masks.shape[-2:]
        up = F.interpolate(final.mask_logits[b].detach()[:, None], size=size, mode="bilinear",
                           align_corners=False)[:, 0]
        for q in range(queries):
            log_prob = final.class_logits[b, q].detach().log_softmax(-1)
            if q in matched:
                j = matched[q]
                label = int(targets[b].labels[j])
                ce_num, ce_den = ce_num - float(log_prob[label]), ce_den + 1.0
                x = up[q].flatten().tolist()
                t = targets[b].masks[j].float().flatten().tolist()
                focal_sum += sum(_focal_pixel(v, u) for v, u in zip(x, t, strict=True)) / len(x)
                dice_sum += _dice([_sigmoid(v) for v in x], t)
            else:
                ce_num, ce_den = ce_num - 0.1 * float(log_prob[classes]), ce_den + 0.1
    assert values["loss_ce"] == pytest.approx(ce_num / ce_den, rel=1e-5)
    assert values["loss_mask"] == pytest.approx(20 * focal_sum / 3, rel=1e-5)
    assert values["loss_dice"] == pytest.approx(dice_sum / 3, rel=1e-5)
    # each aux layer: the same losses, matched on its own predictions
    for i, layer in enumerate(aux):
        alone = criterion(layer, targets)
        for name in ("loss_ce", "loss_mask", "loss_dice"):
            assert values[f"{name}_{i}"] == pytest.approx(float(alone[name].detach()), rel=1e-6)
    sum(losses.values()).backward()
    assert final.mask_logits.grad is not None and aux[4].class_logits.grad is not None


def test_criterion_without_targets_is_class_loss_only():
    empty = MaskTargets(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, 4))
    outputs = MaskPredictions(torch.randn(1, 3, 4), torch.randn(1, 3, 2, 2))
    losses = MaskCriterion()(outputs, [empty])
    assert float(losses["loss_mask"]) == 0 and float(losses["loss_dice"]) == 0
    expected = F.cross_entropy(outputs.class_logits[0], torch.full((3,), 3))
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), rel=1e-6)
