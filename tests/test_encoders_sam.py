"""Tests of the SAM encoder: last global attention in chunks against segment_anything's own
Attention, the one-pass forward, prompt decoding, preprocessing, sizes from config (named and
custom), weights loading (tiny SAM; real sizes are slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from ovseg.config.schema import SamConfig
from ovseg.encoders.sam import (
    SAM_SIZES,
    SamEncoder,
    SamFeatures,
    attention_in_chunks,
    attention_rows,
    build_sam,
    sam_size_from_config,
)
from ovseg.encoders.weights import save_state_dict_file
from ovseg.errors import ConfigError, WeightsError


def make_sam(arch: str, weights: str = "random", **sizes) -> SamEncoder:
    return build_sam(SamConfig(arch=arch, weights=weights, **sizes))


def _randomize_positions(encoder: SamEncoder) -> SamEncoder:
    """Random (non-zero) positional and relative-position parameters, which SAM initialises to
    zero."""
    with torch.no_grad():
        for name, param in encoder.sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                param.copy_(torch.randn_like(param) * 0.5)
    return encoder


def _randomized_tiny() -> SamEncoder:
    return _randomize_positions(make_sam("tiny"))


@pytest.fixture(scope="module")
def tiny() -> SamEncoder:
    torch.manual_seed(0)
    return _randomized_tiny()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(tiny: SamEncoder, image: np.ndarray) -> SamFeatures:
    x, input_size = tiny.preprocess(image)
    with torch.no_grad():
        return tiny(x, input_size)


def test_preprocess(tiny: SamEncoder, image: np.ndarray) -> None:
    x, input_size = tiny.preprocess(image)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert input_size == (171, 256)  # longest side 150 -> 256, 100 * 256 / 150 + 0.5 -> 171
    assert torch.equal(x[..., 171:, :], torch.zeros(1, 3, 85, 256))  # padding bottom
    x_tensor, size_tensor = tiny.preprocess(torch.from_numpy(image))
    assert torch.equal(x, x_tensor) and size_tensor == input_size
    flat = np.full((20, 10, 3), 200, dtype=np.uint8)
    x_flat, flat_size = tiny.preprocess(flat)
    assert flat_size == (256, 128)
    expected = (200 - tiny.pixel_mean) / tiny.pixel_std
    assert torch.allclose(x_flat[0, :, :256, :128], expected.expand(3, 256, 128))
    with pytest.raises(ValueError, match="uint8"):
        tiny.preprocess(flat.astype(np.float32))


def test_forward_shapes_and_embedding(
    tiny: SamEncoder, image: np.ndarray, features: SamFeatures
) -> None:
    assert tiny.img_size == 256 and tiny.patch_size == 16 and tiny.grid == (16, 16)
    assert features.embedding.shape == (1, 32, 16, 16)
    assert features.grid == (16, 16)
    assert features.input_size == (171, 256)
    assert features.last_global_index == 1
    assert features.last_global_input.shape == (1, 16, 16, 64)
    for t in (features.last_global_q, features.last_global_k, features.last_global_v):
        assert t.shape == (1, 2, 256, 32)
    assert features.rel_h is not None and features.rel_h.shape == (1, 2, 256, 16)
    assert features.rel_w is not None and features.rel_w.shape == (1, 2, 256, 16)
    assert features.attn_scale == pytest.approx(32 ** -0.5)
    x, _ = tiny.preprocess(image)
    with torch.no_grad():
        assert torch.allclose(features.embedding, tiny.sam.image_encoder(x), atol=1e-6)
    with pytest.raises(ValueError, match="256"):
        tiny(torch.zeros(1, 3, 128, 128))


def _reference_qkv(tiny: SamEncoder, features: SamFeatures):
    """q, k, v and rel-pos terms of the last global block, recomputed from its input with
    segment_anything's own pieces (the computation the encoder used to repeat)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    attn = tiny.sam.image_encoder.blocks[features.last_global_index].attn
    x = features.last_global_input
    b, h, w, _ = x.shape
    block = tiny.sam.image_encoder.blocks[features.last_global_index]
    qkv = attn.qkv(block.norm1(x)).reshape(b, h * w, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    r_q = q.reshape(b * attn.num_heads, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w))
    return q, k, v, rel_h.reshape(b, -1, h * w, h), rel_w.reshape(b, -1, h * w, w)


@pytest.mark.parametrize("chunk_rows", [1024, 48])
def test_one_forward_equals_segment_anything_and_computes_qkv_once(
    tiny: SamEncoder, image: np.ndarray, chunk_rows: int
) -> None:
    x, input_size = tiny.preprocess(image)
    block = tiny.sam.image_encoder.blocks[tiny.last_global_index]
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    handle = block.attn.qkv.register_forward_hook(count)  # test-only: counts the Linear's calls
    tiny.attention_chunk_rows = chunk_rows
    try:
        with torch.no_grad():
            features = tiny(x, input_size)
            assert calls[0] == 1
            tiny(x, input_size)
            assert calls[0] == 2  # once per forward
            expected = tiny.sam.image_encoder(x)
            reference = _reference_qkv(tiny, features)
    finally:
        handle.remove()
        tiny.attention_chunk_rows = 1024
    scale = expected.abs().max()
    assert (features.embedding - expected).abs().max() <= 1e-5 * scale
    ours = (features.last_global_q, features.last_global_k, features.last_global_v,
            features.rel_h, features.rel_w)
    for name, got, want in zip(("q", "k", "v", "rel_h", "rel_w"), ours, reference, strict=True):
        assert torch.allclose(got, want, atol=1e-6), name


def _reference_attention(tiny: SamEncoder, features: SamFeatures) -> torch.Tensor:
    """segment_anything's Attention.forward up to the softmax, on the block's own input:
    (B, heads, N, N)."""
    block = tiny.sam.image_encoder.blocks[features.last_global_index]
    attn = block.attn
    y = block.norm1(features.last_global_input)
    b, h, w, _ = y.shape
    qkv = attn.qkv(y).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
    return logits.softmax(dim=-1).view(b, attn.num_heads, h * w, h * w)


def test_chunked_attention_equals_segment_anything(
    tiny: SamEncoder, features: SamFeatures
) -> None:
    with torch.no_grad():
        reference = _reference_attention(tiny, features)
        chunks = list(attention_in_chunks(features, chunk_rows=100))
    assert [rows.start for rows, _ in chunks] == [0, 100, 200]
    assert chunks[-1][0] == slice(200, 256)
    full = torch.cat([attn for _, attn in chunks], dim=2)
    assert full.shape == (1, 2, 256, 256)
    assert torch.allclose(full, reference, atol=1e-6)
    assert torch.allclose(full.sum(-1), torch.ones(1, 2, 256), atol=1e-5)
    # the relative positions matter here (non-zero), so this is not just q k^T
    plain = (features.last_global_q * features.attn_scale) @ features.last_global_k.transpose(
        -2, -1
    )
    assert not torch.allclose(full, plain.softmax(-1), atol=1e-3)


@pytest.mark.parametrize("chunk_rows", [1, 7, 256, 5000])
def test_chunk_size_does_not_change_the_result(features: SamFeatures, chunk_rows: int) -> None:
    with torch.no_grad():
        whole = attention_rows(features, slice(0, 256))
        chunked = torch.cat([a for _, a in attention_in_chunks(features, chunk_rows)], dim=2)
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_attention_times_values_is_the_block_attention(
    tiny: SamEncoder, features: SamFeatures
) -> None:
    block = tiny.sam.image_encoder.blocks[features.last_global_index]
    with torch.no_grad():
        attn = torch.cat([a for _, a in attention_in_chunks(features, 64)], dim=2)
        mixed = attn @ features.last_global_v  # (B, heads, N, d)
        b, heads, n, d = mixed.shape
        ours = block.attn.proj(mixed.permute(0, 2, 1, 3).reshape(b, 16, 16, heads * d))
        theirs = block.attn(block.norm1(features.last_global_input))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_predict_masks_with_point_box_and_mask(tiny: SamEncoder, features: SamFeatures) -> None:
    points = torch.tensor([[[60.0, 40.0], [10.0, 90.0]]])
    labels = torch.tensor([[1, 0]])
    boxes = torch.tensor([[10.0, 20.0, 120.0, 90.0], [0.0, 0.0, 30.0, 30.0]])
    mask_inputs = torch.randn(1, 1, 64, 64)
    prompt_encoder, decoder = tiny.sam.prompt_encoder, tiny.sam.mask_decoder
    with torch.no_grad():
        masks, iou = tiny.predict_masks(features, points=points, point_labels=labels)
        sparse, dense = prompt_encoder(points=(points, labels), boxes=None, masks=None)
        ref_masks, ref_iou = decoder(
            features.embedding, prompt_encoder.get_dense_pe(), sparse, dense, False
        )
        box_masks, box_iou = tiny.predict_masks(features, boxes=boxes, multimask_output=True)
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        ref_box_masks, ref_box_iou = decoder(
            features.embedding, prompt_encoder.get_dense_pe(), sparse, dense, True
        )
        all_masks, all_iou = tiny.predict_masks(
            features, points=points, point_labels=labels, boxes=boxes[:1],
            mask_inputs=mask_inputs,
        )
    assert masks.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
    assert torch.equal(masks, ref_masks) and torch.equal(iou, ref_iou)
    assert box_masks.shape == (2, 3, 64, 64) and box_iou.shape == (2, 3)
    assert torch.equal(box_masks, ref_box_masks) and torch.equal(box_iou, ref_box_iou)
    assert all_masks.shape == (1, 1, 64, 64) and all_iou.shape == (1, 1)

    full = tiny.postprocess_masks(box_masks, features.input_size, (100, 150))
    assert full.shape == (2, 3, 100, 150)
    with pytest.raises(ValueError, match="point_labels"):
        tiny.predict_masks(features, points=points)


def test_frozen(tiny: SamEncoder) -> None:
    tiny.train()
    assert not tiny.training and not tiny.sam.training
    assert not any(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str, image: np.ndarray) -> None:
    torch.manual_seed(1)
    original = _randomized_tiny()
    path = tmp_path / f"sam_tiny{suffix}"
    save_state_dict_file(original.sam.state_dict(), path)
    loaded = make_sam("tiny", str(path))
    x, size = original.preprocess(image)
    with torch.no_grad():
        a, b = original(x, size), loaded(x, size)
    assert torch.equal(a.embedding, b.embedding)
    assert torch.equal(a.last_global_v, b.last_global_v)
    assert torch.equal(a.rel_h, b.rel_h)


def test_missing_or_wrong_checkpoint(tmp_path: Path, tiny: SamEncoder) -> None:
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth"):
        make_sam("tiny", str(tmp_path / "sam_vit_b_01ec64.pth"))
    state = dict(tiny.sam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "broken.pth"
    save_state_dict_file(state, path)
    with pytest.raises(WeightsError, match="broken.pth.*SAM tiny.*iou_token"):
        make_sam("tiny", str(path))


@pytest.mark.parametrize("spec", ["", "   ", "sam"])
def test_real_sizes_need_a_checkpoint(spec: str) -> None:
    with pytest.raises(WeightsError, match="model.sam.weights") as info:
        make_sam("vit_b", spec)
    assert "sam_vit_b_01ec64.pth" in str(info.value)


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="vit_s"):
        make_sam("vit_s", "random")


@pytest.mark.slow
def test_vit_b_builds() -> None:
    encoder = make_sam("vit_b", "random")
    assert encoder.img_size == 1024 and encoder.grid == (64, 64)
    assert encoder.last_global_index == 11 and encoder.num_heads == 12 and encoder.out_chans == 256


def test_random_weights_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = make_sam("tiny", "random").state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = make_sam("tiny", "random").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


# A custom size: a SAM no release has (3 blocks, 2 of them global, input 128, window 2).
CUSTOM = dict(
    embed_dim=48, depth=3, num_heads=3, global_attn_indexes=[0, 2], img_size=128, patch_size=16,
    window_size=2, prompt_embed_dim=24, mask_in_chans=4, decoder_depth=1, decoder_mlp_dim=32,
    decoder_heads=2, iou_head_hidden_dim=16,
)


def test_custom_size_from_config_builds() -> None:
    encoder = make_sam("custom", **CUSTOM)
    image_encoder = encoder.sam.image_encoder
    assert encoder.img_size == 128 and encoder.patch_size == 16 and encoder.grid == (8, 8)
    assert len(image_encoder.blocks) == 3 and encoder.last_global_index == 2
    assert [b.window_size for b in image_encoder.blocks] == [0, 2, 0]
    assert encoder.num_heads == 3 and encoder.out_chans == 24
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(x)
        assert torch.allclose(features.embedding, image_encoder(x), atol=1e-5)
    assert features.last_global_q.shape == (1, 3, 64, 16)
    # an OmegaConf node of the section works the same (what the method helpers pass)
    from omegaconf import OmegaConf

    section = SamConfig(arch="custom", weights="random", **CUSTOM)
    node = OmegaConf.structured(section)
    assert sam_size_from_config(node) == sam_size_from_config(section)


def test_custom_size_takes_vit_b_for_unset_fields_and_named_sizes_take_none() -> None:
    size = sam_size_from_config(SamConfig(arch="custom", depth=4, global_attn_indexes=[3]))
    assert size.depth == 4 and size.global_attn_indexes == (3,)
    assert size.embed_dim == SAM_SIZES["vit_b"].embed_dim and size.img_size == 1024
    with pytest.raises(ConfigError, match="model.sam.depth.*custom"):
        sam_size_from_config(SamConfig(arch="vit_b", depth=4))
    with pytest.raises(ConfigError, match="global_attn_indexes"):
        sam_size_from_config(SamConfig(arch="custom", depth=4))  # vit_b's 5, 8, 11 >= 4
    with pytest.raises(ConfigError, match="img_size"):
        sam_size_from_config(SamConfig(arch="custom", img_size=1000))
    with pytest.raises(WeightsError, match="model.sam.weights"):
        make_sam("custom", "", **CUSTOM)  # random weights must be asked for


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_custom_size_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    source = make_sam("custom", **CUSTOM)
    generator = torch.Generator().manual_seed(2)
    state = {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in source.sam.state_dict().items()
    }
    path = tmp_path / f"sam_custom{suffix}"
    save_state_dict_file(state, path)
    loaded = make_sam("custom", str(path), **CUSTOM)
    for key, value in loaded.sam.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "image_encoder.blocks.2.attn.rel_pos_h" in state  # the real key names
    other = dict(CUSTOM, embed_dim=96)
    with pytest.raises(WeightsError, match=f"sam_custom{suffix}"):
        make_sam("custom", str(path), **other)
