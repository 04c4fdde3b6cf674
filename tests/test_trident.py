"""Trident (specs/trident.md) on tiny random encoders: each step against a hand or direct
computation, the refinement rules with a stand-in SAM decoder, and ``predict`` end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import ovseg
from ovseg.encoders import sam as sam_module
from ovseg.encoders.sam import SamFeatures, attention_rows
from ovseg.errors import ConfigError
from ovseg.layers import cut_windows, stitch_windows
from ovseg.layers.components import connected_components
from ovseg.layers.sam_prompts import longest_side_shape, mask_prompt
from ovseg.methods import trident as tr
from ovseg.methods.trident import TridentConfig
from ovseg.text import Vocabulary
from tests.fixtures.builders import build_voc

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny/trident_tiny.yaml"


def tiny_model(*overrides: str):
    return ovseg.build_model(ovseg.get_config(TINY, list(overrides)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(70, 110, 3), dtype=np.uint8)


# ---- step 0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "patch", "expected"),
    [
        ((320, 480), 16, (320, 480)),  # multiples of p: left as they are, even under 336
        ((448, 597), 16, (464, 608)),  # 597 -> 608; 448 * 608 / 597 = 456.2 -> 464
        ((448, 597), 14, (462, 602)),  # 597 -> 602; 448 * 602 / 597 = 451.8 -> 462
        ((200, 250), 16, (336, 336)),  # 250 -> 256; 200 * 256 / 250 = 204.8 -> 208 -> 336
        ((597, 448), 16, (608, 464)),
        ((336, 351), 16, (336, 352)),  # 351 -> 352; int(336 * 352 / 351) = 336, a multiple
    ],
)
def test_processed_size_hand_computed(size, patch, expected):
    assert tr.processed_size(*size, patch=patch, min_side=336) == expected


def reference_processed_size(height, width, patch, min_side):
    """The reference's step-0 rule, transcribed: truncate the scaled side (float arithmetic),
    round it up to the patch only when it is not a multiple already, at least min_side."""
    if height % patch == 0 and width % patch == 0:
        return height, width
    longer = max(height, width)
    dst_longer = (longer // patch + (longer % patch != 0)) * patch
    sides = []
    for side in (height, width):
        new = int(side * dst_longer / longer)
        if new % patch != 0:
            new = (new // patch + 1) * patch
        sides.append(max(new, min_side))
    return tuple(sides)


@pytest.mark.parametrize("patch", [16, 14])
def test_processed_size_follows_the_reference_over_a_sweep(patch):
    sizes = [(h, w) for h in range(200, 1100, 7) for w in range(300, 1300, 13)]
    differs_from_ceiling = 0
    for h, w in sizes:
        assert tr.processed_size(h, w, patch, 336) == reference_processed_size(h, w, patch, 336)
        longer = max(h, w)
        target = -(-longer // patch) * patch
        ceiling = tuple(max(-(-s * target // (longer * patch)) * patch, 336) for s in (h, w))
        differs_from_ceiling += ceiling != reference_processed_size(h, w, patch, 336)
    # the rule matters: rounding the exact product up differs on a good share of sizes
    assert differs_from_ceiling > 0.02 * len(sizes)


# ---- step 1 ----------------------------------------------------------------------------------
def mmseg_slide_windows(height, width, crop, stride):
    """mmseg's slide_inference loop, written out."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            out.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return out


@pytest.mark.parametrize(
    ("height", "width", "stride"),
    [(448, 608, 224), (336, 336, 224), (464, 608, 112), (320, 480, 224), (688, 1376, 224)],
)
def test_windows_match_mmseg_slide_and_the_spec_count(height, width, stride):
    windows = tr.trident_windows(height, width, 336, stride, 16)
    assert windows == mmseg_slide_windows(height, width, 336, stride)
    rows = max(math.ceil((height - 336) / stride), 0) + 1
    cols = max(math.ceil((width - 336) / stride), 0) + 1
    assert len(windows) == rows * cols
    assert all(v % 16 == 0 for window in windows for v in window)
    assert max(w[2] for w in windows) == height and max(w[3] for w in windows) == width


def test_windows_off_the_patch_grid_are_an_error():
    with pytest.raises(ConfigError, match="multiple of the CLIP patch"):
        tr.trident_windows(448, 600, 336, 224, 16)


# ---- step 3 ----------------------------------------------------------------------------------
def test_splice_keeps_a_constant_map_constant():
    windows = tr.to_patch_grid(tr.trident_windows(464, 608, 336, 224, 16), 16)
    maps = torch.full((len(windows), 3, 21, 21), 2.5)
    batches = [(windows[:3], maps[:3]), (windows[3:], maps[3:])]
    canvas = tr.splice_windows(batches, (29, 38))
    assert canvas.shape == (3, 29, 38)
    assert torch.equal(canvas, torch.full_like(canvas, 2.5))


def test_windows_cut_from_a_map_splice_back_exactly():
    # dyadic values: sums and divisions by the cover count are exact in float32
    full = torch.randint(-512, 512, (1, 4, 29, 38), generator=torch.Generator().manual_seed(0))
    full = full.float() / 8
    windows = tr.to_patch_grid(tr.trident_windows(464, 608, 336, 112, 16), 16)
    cut = cut_windows(full, windows)
    batches = [(windows[i:i + 2], cut[i:i + 2]) for i in range(0, len(windows), 2)]
    canvas = tr.splice_windows(batches, (29, 38))
    assert torch.equal(canvas, full[0])
    assert torch.equal(canvas, stitch_windows(cut, windows, (29, 38))[0])


# ---- step 2 ----------------------------------------------------------------------------------
def direct_proxy_outputs(clip, dino, x, windows, gamma, beta):
    """All windows at once: m = mean of S over every window, A, out_proj(A v)."""
    crops = cut_windows(x, windows)
    tokens = F.normalize(dino(dino.from_clip_normalized(crops)).tokens, dim=-1)
    similarity = tokens @ tokens.transpose(1, 2)
    logits = gamma * (similarity - beta * similarity.mean())
    attention = logits.masked_fill(logits < 0, float("-inf")).softmax(-1)
    hidden, grid = clip.embed_patches(crops)
    for block in clip.model.visual.transformer.resblocks[:-1]:
        hidden = block(hidden)
    _, _, v = clip.last_block_qkv(hidden)
    # out_proj without layer scale; the same 16-px grid for both
    out = clip.attention_output(attention[:, None] @ v[:, :, 1:], layer_scale=False)
    return out.transpose(1, 2).reshape(len(windows), -1, *grid), similarity


def test_proxy_attention_equals_direct_computation_with_mean_over_all_windows(model):
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    windows = tr.trident_windows(96, 160, 64, 32, 16)
    assert len(windows) == 8
    with torch.inference_mode():
        batches = list(tr.proxy_window_features(
            model.clip, model.dino, x, windows, window_batch=3, gamma=3.0, beta=1.2
        ))
        expected, similarity = direct_proxy_outputs(model.clip, model.dino, x, windows, 3.0, 1.2)
    assert [len(w) for w, _ in batches] == [3, 3, 2]
    assert [w for ws, _ in batches for w in ws] == tr.to_patch_grid(windows, 16)
    got = torch.cat([maps for _, maps in batches])
    assert torch.allclose(got, expected, atol=1e-5)
    # the image-wide m matters: each window's own mean gives another answer
    per_window = similarity.mean(dim=(1, 2))
    assert float(per_window.max() - per_window.min()) > 1e-4


# ---- step 4 ----------------------------------------------------------------------------------
def hand_example():
    """3 tokens, 2 heads, d = 2. Head 0 values (1,0), (0,1), (.6,.8); head 1 (1,0), (1,0),
    (-1,0). Cosines: head 0 [[1,0,.6],[0,1,.8],[.6,.8,1]]; head 1 [[1,1,-1],[1,1,-1],[-1,-1,1]]."""
    values = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
        [[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]],
    ])
    attention = torch.tensor([
        [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]],
        [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]],
    ])
    return attention, values


def as_tensor(rows):
    return torch.tensor([[float(Fraction(v)) for v in row] for row in rows])


def test_sam_correlation_hand_example():
    attention, values = hand_example()
    # mean cos over heads and j: .4333, .4667, .2333; x 1.2: t = .52, .56, .28 (under the cap).
    # Kept: head 0 rows [1,0,1], [0,1,1], [1,1,1]; head 1 rows [1,1,0], [1,1,0], [0,0,1].
    # Row 0: mean of [.5,0,.25] and [.4,.4,0] = [.45,.2,.125] -> /.775. Per-head thresholds
    # would differ: head 0 alone gives t = .64 and would drop cos .6.
    expected = as_tensor([
        ["18/31", "8/31", "5/31"],
        ["3/14", "9/14", "2/14"],
        ["1/15", "1/15", "13/15"],
    ])
    got = tr.sam_correlation(attention, values, torch.arange(3), cos_fac=1.2)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3))
    # a chunk of rows gives the same rows
    chunk = tr.sam_correlation(attention[:, 1:], values, torch.tensor([1, 2]), cos_fac=1.2)
    assert torch.allclose(chunk, expected[1:], atol=1e-6)


def test_sam_correlation_caps_the_threshold_at_0_9():
    attention, values = hand_example()
    # cos_fac 10: t = min(10 * mean, .9) = .9 for every row: only cosines of 1 survive.
    # Row 0: head 0 [.5,0,0], head 1 [.4,.4,0] -> [.45,.2,0]; row 1: [0,.6,0] and [.3,.3,0]
    # -> [.15,.45,0]; row 2: the diagonal only.
    expected = as_tensor([["9/13", "4/13", "0"], ["1/4", "3/4", "0"], ["0", "0", "1"]])
    got = tr.sam_correlation(attention, values, torch.arange(3), cos_fac=10.0)
    assert torch.allclose(got, expected, atol=1e-6)


def negative_example():
    """1 head, 4 tokens; token 0's cosines [1, .28, -1, -1], mean -.18: t_0 = 1.2 x -.18."""
    values = torch.tensor([[[1.0, 0.0], [0.28, 0.96], [-1.0, 0.0], [-1.0, 0.0]]])
    return torch.full((1, 1, 4), 0.25), values


def test_negative_threshold_rule():
    attention, values = negative_example()
    query = torch.tensor([0])
    # refine_neg_cos true: t = -.216 stays, cos .28 is kept
    kept = tr.sam_correlation(attention, values, query, cos_fac=1.2, refine_neg_cos=True)
    assert torch.allclose(kept, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    # false (Cityscapes, ADE): the negative t becomes .6, only the diagonal is left
    dropped = tr.sam_correlation(attention, values, query, cos_fac=1.2, refine_neg_cos=False)
    assert torch.allclose(dropped, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_cos_fac_zero_keeps_positive_cosines():
    attention, values = negative_example()
    # t = 0, not negative, so the .6 rule does not fire either way
    for flag in (True, False):
        got = tr.sam_correlation(attention, values, torch.tensor([0]), cos_fac=0.0,
                                 refine_neg_cos=flag)
        assert torch.allclose(got, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


def test_diagonal_survives_even_for_a_zero_value_vector():
    values = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    attention = torch.full((1, 3, 3), 1 / 3)
    got = tr.sam_correlation(attention, values, torch.arange(3), cos_fac=1.2)
    assert torch.allclose(got.sum(-1), torch.ones(3))
    assert torch.allclose(got.diagonal(), torch.ones(3))


def random_sam_features(grid=(8, 8), input_size=(112, 96), heads=2, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n = gh * gw

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return SamFeatures(
        embedding=rand(1, 8, gh, gw), grid=grid, last_global_index=0,
        last_global_input=rand(1, gh, gw, heads * dim), last_global_q=rand(1, heads, n, dim),
        last_global_k=rand(1, heads, n, dim), last_global_v=rand(1, heads, n, dim),
        rel_h=rand(1, heads, n, gh), rel_w=rand(1, heads, n, gw), attn_scale=dim**-0.5,
        input_size=input_size,
    )


def test_aggregation_in_chunks_equals_one_pass_and_a_direct_computation():
    features = random_sam_features()
    canvas = torch.randn(3, 10, 12, generator=torch.Generator().manual_seed(2))
    one_pass = tr.aggregate_with_sam(canvas, features, 16, TridentConfig(sam_chunk_rows=10**6))
    chunked = tr.aggregate_with_sam(canvas, features, 16, TridentConfig(sam_chunk_rows=1))
    assert one_pass.shape == (3, 7, 6)  # valid grid: floor(112 / 16) x floor(96 / 16)
    assert torch.allclose(chunked, one_pass, atol=1e-6)
    # direct: the whole N x N attention, valid tokens gathered by index
    valid = [y * 8 + x for y in range(7) for x in range(6)]
    attention = attention_rows(features, slice(0, 64))[0][:, valid][:, :, valid]
    values = features.last_global_v[0][:, valid]
    correlation = tr.sam_correlation(attention, values, torch.arange(42), cos_fac=1.2)
    resized = F.interpolate(canvas[None], size=(7, 6), mode="bilinear", align_corners=False)
    expected = (correlation @ resized[0].flatten(1).T).T.reshape(3, 7, 6)
    assert torch.allclose(one_pass, expected, atol=1e-5)


def test_sam_attention_is_computed_in_row_chunks(monkeypatch):
    features = random_sam_features()
    sizes = []
    original = sam_module.attention_rows

    def spy(feats, rows):
        sizes.append(rows.stop - rows.start)
        return original(feats, rows)

    monkeypatch.setattr(sam_module, "attention_rows", spy)
    tr.aggregate_with_sam(torch.zeros(3, 10, 12), features, 16, TridentConfig(sam_chunk_rows=16))
    assert sizes and max(sizes) == 16  # two grid rows of 8 at a time; padding rows skipped
    assert sum(sizes) == 64


# ---- step 7 ----------------------------------------------------------------------------------
def identity_sam_features(grid, input_size):
    """SAM features whose correlation C is the identity: one-hot q = k, orthogonal values."""
    n = grid[0] * grid[1]
    eye = torch.eye(n)[None, None]
    return SamFeatures(
        embedding=torch.zeros(1, 8, *grid), grid=grid, last_global_index=0,
        last_global_input=torch.zeros(1, *grid, n), last_global_q=30 * eye,
        last_global_k=30 * eye, last_global_v=eye, rel_h=None, rel_w=None, attn_scale=1.0,
        input_size=input_size,
    )


def ramp_canvas(height, width):
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(),
                            indexing="ij")
    return torch.stack([xs, ys])


def test_cityscapes_halves_join_without_a_seam():
    halves = [identity_sam_features((8, 8), (96, 64))] * 2  # valid grid 6 x 4 each
    joined = tr.cityscapes_halves(ramp_canvas(6, 16), halves, 8, 16, TridentConfig())
    assert joined.shape == (2, 6, 8)  # width 2 * ws
    steps = joined[0].diff(dim=1)
    assert torch.allclose(steps, torch.full_like(steps, 2.0))  # the x ramp stays a ramp


def test_cityscapes_unequal_halves():
    halves = [identity_sam_features((8, 8), (96, 64)), identity_sam_features((8, 8), (96, 80))]
    joined = tr.cityscapes_halves(ramp_canvas(6, 18), halves, 8, 16, TridentConfig())
    assert joined.shape == (2, 6, 4 + 5)
    steps = joined[0].diff(dim=1)
    assert torch.allclose(steps, torch.full_like(steps, 2.0))
    # halves whose valid grids differ in height are brought to the taller one
    halves = [identity_sam_features((8, 8), (96, 64)), identity_sam_features((8, 8), (80, 80))]
    assert tr.cityscapes_halves(ramp_canvas(6, 18), halves, 8, 16, TridentConfig()).shape == (
        2, 6, 9)
    assert tr.canvas_split_column(86, 2048, 1024) == 43
    assert tr.canvas_split_column(87, 2047, 1023) == 43
    left, right = tr.image_halves(np.zeros((4, 7, 3), np.uint8))
    assert left.shape[1] == 3 and right.shape[1] == 4


# ---- steps 5-6 -------------------------------------------------------------------------------
def test_background_is_the_max_over_its_names_after_a_softmax_over_all_names():
    vocabulary = Vocabulary([("sky", "wall", "floor"), ("cat",), ("dog",)])
    cosine = torch.tensor([0.30, 0.20, 0.28, 0.25, 0.10]).view(5, 1, 1).expand(5, 2, 3)
    probs = tr.class_probabilities(cosine.contiguous(), (2, 3), 40.0, vocabulary)
    names = (40 * torch.tensor([0.30, 0.20, 0.28, 0.25, 0.10])).softmax(0)
    expected = torch.stack([names[:3].max(), names[3], names[4]])
    assert torch.allclose(probs, expected.view(3, 1, 1).expand(3, 2, 3), atol=1e-6)
    # not a softmax over classes: the background words' mass is not summed
    assert float(probs[:, 0, 0].sum()) < 1


def test_probability_threshold_sends_unsure_pixels_to_background(image):
    result = tiny_model("model.trident.prob_thd", "0.99", "model.refine.enabled", "false").predict(
        image, "cat, dog, sky")
    assert (result.labels == 0).all()


# ---- step 8 (the refinement itself: tests/test_sam_refine.py) --------------------------------
def test_connected_components_are_8_connected():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal chain: one component
    mask[4:6, 4:6] = True
    components = connected_components(mask)
    assert len(components) == 2
    assert components.areas.tolist() == [3, 4]
    assert components.boxes.tolist() == [[0, 0, 2, 2], [4, 4, 5, 5]]


def test_mask_prompt_is_256_square_with_values_0_or_scaled_probability():
    prompt = mask_prompt(torch.full((100, 150), 0.5), (768, 1024), 1024, 0.2, 0.005)
    assert prompt.shape == (1, 1, 256, 256)
    assert torch.allclose(prompt[0, 0, :192], torch.full((192, 256), 0.0025))
    assert (prompt[0, 0, 192:] == 0).all()  # padding below SAM's 768 x 1024 frame
    assert (mask_prompt(torch.full((100, 150), 0.1), (768, 1024), 1024, 0.2, 0.005) == 0).all()
    probs = torch.rand(60, 80, generator=torch.Generator().manual_seed(0))
    prompt = mask_prompt(probs, (768, 1024), 1024, 0.2, 0.005)
    nonzero = prompt[prompt != 0] / 0.005
    assert (nonzero > 0.2).all() and (nonzero <= 1).all()
    assert longest_side_shape(760, 1024, 256) == (190, 256)


# ---- predict end to end ----------------------------------------------------------------------
def count_decoder_calls(model, monkeypatch):
    calls = []
    original = model.sam.predict_masks

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.sam, "predict_masks", spy)
    return calls


@pytest.mark.parametrize("refine", [True, False])
def test_predict_on_a_non_square_image(image, refine, monkeypatch):
    model = tiny_model("model.refine.enabled", str(refine).lower())
    calls = count_decoder_calls(model, monkeypatch)
    result = model.predict(image, "cat, dog, sky")
    assert result.classes == ["cat", "dog", "sky"]
    assert result.labels.shape == (70, 110) and result.labels.dtype == np.uint8
    assert result.logits.shape == (3, 70, 110)
    assert bool(calls) == refine
    # the scores are the ones the labels were taken from, refined or not (prob_thd is 0)
    assert np.array_equal(result.labels, result.logits.argmax(0).numpy())
    if not refine:
        assert torch.allclose(result.logits.sum(0), torch.ones(70, 110), atol=1e-5)
    else:  # refined scores replace the probabilities where a mask decided
        assert not torch.allclose(result.logits.sum(0), torch.ones(70, 110), atol=1e-3)


@pytest.mark.parametrize("size", [(48, 80), (50, 70), (20, 300)])
def test_predict_with_a_side_under_the_crop(size):
    # short side 48 < crop 64: (48, 80) stays as it is (multiples of 16, one 48-px window row);
    # (50, 70) -> (48, 67) -> (64, 80)
    model = tiny_model("model.inference.short_side", "48")
    picture = np.random.default_rng(1).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    result = model.predict(picture, ["cat", "dog"])
    assert result.labels.shape == size and result.logits.shape == (2, *size)


@pytest.mark.parametrize("width", [128, 129])
def test_predict_with_cityscapes_halves(width, monkeypatch):
    model = tiny_model("model.trident.cityscapes_halves", "true")
    encodes = []
    original = model.sam.forward

    def spy(x, input_size=None):
        encodes.append(input_size)
        return original(x, input_size)

    monkeypatch.setattr(model.sam, "forward", spy)
    picture = np.random.default_rng(2).integers(0, 256, size=(64, width, 3), dtype=np.uint8)
    result = model.predict(picture, "road, car, sky")
    assert result.labels.shape == (64, width)
    assert len(encodes) == 3  # left half, right half, whole image for the refinement


def test_windows_go_through_clip_and_dino_in_window_batches(monkeypatch):
    model = tiny_model("model.inference.window_batch", "2", "model.refine.enabled", "false")
    batches = []
    original = model.clip.forward

    def spy(x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model.clip, "forward", spy)
    model.predict(np.zeros((96, 160, 3), np.uint8), "cat, dog")
    assert max(batches) == 2 and sum(batches) == 2 * 4  # 96 x 160: 2 x 4 windows of 64


def test_synonyms_of_every_class_take_the_max(image):
    model = tiny_model("model.refine.enabled", "false")
    split = model.predict(image, "cat, kitten, dog")
    merged = model.predict(image, "cat; kitten, dog")
    assert torch.allclose(merged.logits[0], torch.maximum(split.logits[0], split.logits[1]))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="model.inference.stride"):
        tiny_model("model.inference.stride", "40")
    with pytest.raises(ConfigError, match="compat"):
        tiny_model("model.refine.compat", "mmseg")


# ---- configs and the demo --------------------------------------------------------------------
BENCHMARKS = {  # short side, stride, cos_fac, prob_thd, coarse_thresh, refine_neg_cos
    "voc_21": (448, 224, 1.2, 0.2, 0.2, True),
    "pcontext_60": (576, 224, 1.2, 0.15, 0.15, True),
    "coco_object_81": (448, 224, 1.2, 0.25, 0.25, True),
    "voc_20": (336, 112, 0.0, 0.0, 0.2, True),
    "pcontext_59": (576, 224, 1.2, 0.0, 0.15, True),
    "coco_stuff_171": (448, 224, 1.2, 0.0, 0.05, True),
    "cityscapes_19": (688, 224, 3.0, 0.0, 0.10, False),
    "ade20k_150": (576, 224, 1.2, 0.0, 0.05, False),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_configs_follow_the_spec(name):
    for suffix, arch in (("", "ViT-B-16"), ("_vith14", "ViT-H-14")):
        cfg = ovseg.get_config(f"trident/{name}{suffix}.yaml")
        # steps 0-1 live in model.inference, step 8 in model.refine, the rest in model.trident
        t = SimpleNamespace(**OmegaConf.to_container(cfg.model.inference),
                            **OmegaConf.to_container(cfg.model.trident),
                            **OmegaConf.to_container(cfg.model.refine))
        assert t.enabled and t.compat == "fixed"
        assert (t.short_side, t.stride, t.cos_fac, t.prob_thd, t.coarse_thresh,
                t.refine_neg_cos) == BENCHMARKS[name]
        assert t.cityscapes_halves == (name == "cityscapes_19")
        assert (t.crop, t.gamma, t.beta, t.iou_thresh, t.min_component) == (336, 3.0, 1.2, 0.8,
                                                                            225)
        assert cfg.model.clip.arch == arch and cfg.model.sam.arch == "vit_b"
        assert cfg.model.dino.arch == "vit_base_patch16_224.dino"
        assert list(cfg.datasets.test) == [name]


def test_demo_runs_the_tiny_trident(tmp_path):
    spec = importlib.util.spec_from_file_location("ovseg_demo_trident", REPO / "demo" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    picture = np.random.default_rng(3).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.jpg"), picture)
    code = demo.main([
        "--config-file", str(REPO / "configs" / "tiny" / "trident_tiny.yaml"),
        "--input", str(tmp_path / "img.jpg"), "--output", str(tmp_path / "out"),
        "--vocab", "cat,dog,sky", "--device", "cpu",
    ])
    assert code == 0
    assert (tmp_path / "out" / "img_labels.png").is_file()


def test_eval_only_runs_the_tiny_trident(tmp_path):
    build_voc(tmp_path / "datasets")
    command = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
        "configs/tiny/trident_tiny.yaml", "--eval-only", "datasets.test", "[voc_21]",
        "datasets.root", str(tmp_path / "datasets"), "output_dir", str(tmp_path / "out"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "voc_21" / "results.json").read_text())
    assert results["num_images"] == 3 and 0.0 <= results["mIoU"] <= 100.0
