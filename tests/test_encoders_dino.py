"""Tests of the DINO encoder: fixture parity with ProxyCLIP's DINO features, pos-embed resizing,
last-block q/k/v, weights loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from ovseg.config.schema import DinoConfig
from ovseg.encoders.dino import DinoEncoder, _adapt_checkpoint, build_dino
from ovseg.encoders.weights import save_state_dict_file
from ovseg.errors import ConfigError, WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_dino(arch: str, weights: str = "random") -> DinoEncoder:
    return build_dino(DinoConfig(arch=arch, weights=weights))


def dense_clip_fixtures() -> Path:
    """shared/fixtures/dense_clip beside the repo (or inside it); skip the test if absent."""
    for shared in (REPO_ROOT / "shared", REPO_ROOT.parent / "shared"):
        path = shared / "fixtures" / "dense_clip"
        if (path / "outputs.pt").is_file():
            return path
    pytest.skip("shared/fixtures/dense_clip not found")


@pytest.fixture(scope="module")
def tiny_p8() -> DinoEncoder:
    torch.manual_seed(0)
    return make_dino("tiny-p8", "random")


@pytest.mark.parametrize("patch", [8, 16])
def test_proxy_features_match_proxyclip_fixture(patch: int) -> None:
    fixtures = dense_clip_fixtures()
    inputs = torch.load(fixtures / "inputs.pt", weights_only=True)
    outputs = torch.load(fixtures / "outputs.pt", weights_only=True)
    reference = outputs[f"proxyclip_p{patch}"]["s336"]["ex_feats"]  # (1, 64, I, J)
    encoder = make_dino(f"tiny-p{patch}", str(fixtures / f"weights_dino_p{patch}.pt"))

    # ProxyCLIP's DINO input: the CLIP-normalised crop, un-normalised, ImageNet-normalised
    x = encoder.from_clip_normalized(inputs["x_s336"])
    with torch.no_grad():
        features = encoder(x)
    assert features.grid == (336 // patch, 336 // patch)
    assert features.tokens.shape == (1, (336 // patch) ** 2, 64)
    assert (features.dense() - reference).abs().max() <= 1e-5

    # the uint8 image normalised directly is the same input up to the rounding of the mmseg
    # 0-255 constants (~1e-5 in the input): close, not bit-level
    image = inputs["img_s336_u8"].permute(2, 0, 1)
    direct = encoder.normalize(image)
    assert (direct - x).abs().max() < 1e-4
    with torch.no_grad():
        assert (encoder(direct).dense() - reference).abs().max() < 1e-3


def test_pos_embed_unchanged_at_training_grid(tiny_p8: DinoEncoder) -> None:
    model = tiny_p8.model
    assert tiny_p8.train_grid == (28, 28)
    assert torch.equal(tiny_p8.pos_embed_for((28, 28)), model.pos_embed)


def test_pos_embed_offset_and_size_rules(tiny_p8: DinoEncoder) -> None:
    model = tiny_p8.model
    patch_pos = model.pos_embed[:, 1:].reshape(1, 28, 28, 64).permute(0, 3, 1, 2)
    grid = (42, 30)
    by_offset = F.interpolate(
        patch_pos, scale_factor=((42 + 0.1) / 28, (30 + 0.1) / 28), mode="bicubic",
        align_corners=False,
    )
    by_size = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    offset = tiny_p8.pos_embed_for(grid)
    assert offset.shape == (1, 1 + 42 * 30, 64)
    assert torch.equal(offset[:, :1], model.pos_embed[:, :1])  # class position unchanged
    assert torch.allclose(offset[:, 1:], by_offset.flatten(2).transpose(1, 2), atol=1e-6)

    size_encoder = DinoEncoder(model, pos_embed_resize="size")
    by_size_ours = size_encoder.pos_embed_for(grid)[:, 1:]
    assert torch.allclose(by_size_ours, by_size.flatten(2).transpose(1, 2), atol=1e-6)
    assert not torch.allclose(by_size_ours, offset[:, 1:], atol=1e-6)

    with pytest.raises(ConfigError, match="pos_embed_resize"):
        DinoEncoder(model, pos_embed_resize="nearest")


def test_forward_equals_timm_at_training_size(tiny_p8: DinoEncoder) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = tiny_p8(x)
        theirs = tiny_p8.model.forward_features(x)
    assert torch.allclose(ours.tokens, theirs[:, 1:], atol=1e-6)
    assert torch.allclose(ours.cls_token, theirs[:, 0], atol=1e-6)


def test_any_input_size_floors_the_grid(tiny_p8: DinoEncoder) -> None:
    x = torch.randn(1, 3, 100, 130)
    with torch.no_grad():
        features = tiny_p8(x, last_qkv=True)
    assert features.grid == (12, 16)
    assert features.tokens.shape == (1, 12 * 16, 64)
    assert features.dense().shape == (1, 64, 12, 16)
    assert features.last_block_input.shape == (1, 1 + 12 * 16, 64)
    assert features.q.shape == features.k.shape == features.v.shape == (1, 4, 1 + 12 * 16, 16)


def test_last_block_qkv_recompute_the_block(tiny_p8: DinoEncoder) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 96, 120)
    with torch.no_grad():
        features = tiny_p8(x, last_qkv=True)
    block = tiny_p8.model.blocks[-1]
    tokens = features.last_block_input
    b, t, c = tokens.shape
    qkv = F.linear(block.norm1(tokens), block.attn.qkv.weight, block.attn.qkv.bias)
    q, k, v = qkv.reshape(b, t, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
    assert torch.allclose(features.q, q, atol=1e-6)
    assert torch.allclose(features.k, k, atol=1e-6)
    assert torch.allclose(features.v, v, atol=1e-6)

    # attention from q/k/v + the block's remaining submodules rebuild the block's output
    with torch.no_grad():
        attn = (features.q @ features.k.transpose(-2, -1) / math.sqrt(c // 4)).softmax(-1)
        mixed = (attn @ features.v).transpose(1, 2).reshape(b, t, c)
        out = tokens + block.attn.proj(mixed)
        out = tiny_p8.model.norm(out + block.mlp(block.norm2(out)))
    assert torch.allclose(out[:, 1:], features.tokens, atol=1e-5)
    assert torch.allclose(out[:, 0], features.cls_token, atol=1e-5)


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element list counting the forwards of ``module`` (a test-only forward hook)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_last_block_qkv_only_when_asked_and_computed_once(fused: bool) -> None:
    torch.manual_seed(6)
    encoder = make_dino("tiny-p8")
    encoder.model.blocks[-1].attn.fused_attn = fused  # timm's two attention paths
    calls = count_calls(encoder.model.blocks[-1].attn.qkv)
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        plain = encoder(x)
        assert calls[0] == 1  # the block's own forward, nothing kept or computed beside it
        assert plain.q is None and plain.k is None and plain.v is None
        assert plain.last_block_input is None
        asked = encoder(x, last_qkv=True)
        assert calls[0] == 2  # one more forward: q/k/v come from the block's own computation
    assert asked.q is not None and asked.q.shape == (2, 4, 1 + 8 * 9, 16)
    assert torch.allclose(asked.tokens, plain.tokens, atol=1e-6)
    assert torch.allclose(asked.cls_token, plain.cls_token, atol=1e-6)


def test_from_clip_normalized_is_proxyclips_renormalisation(tiny_p8: DinoEncoder) -> None:
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.rand(1, 3, 4, 5)
    x = (pixels - clip_mean) / clip_std
    expected = (pixels - tiny_p8.mean.view(1, 3, 1, 1)) / tiny_p8.std.view(1, 3, 1, 1)
    assert torch.allclose(tiny_p8.from_clip_normalized(x), expected, atol=1e-5)


def test_normalize_uint8_images(tiny_p8: DinoEncoder) -> None:
    images = torch.full((3, 4, 5), 255, dtype=torch.uint8)
    x = tiny_p8.normalize(images)
    assert x.shape == (1, 3, 4, 5) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0, :, 0, 0], expected)


def test_frozen(tiny_p8: DinoEncoder) -> None:
    tiny_p8.train()
    assert not tiny_p8.training and not tiny_p8.model.training
    assert not any(p.requires_grad for p in tiny_p8.parameters())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    original = make_dino("tiny-p16", "random")
    path = tmp_path / f"dino{suffix}"
    save_state_dict_file(original.model.state_dict(), path)
    loaded = make_dino("tiny-p16", str(path))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(original(x).tokens, loaded(x).tokens)


def test_checkpoint_head_keys_are_dropped(tmp_path: Path, tiny_p8: DinoEncoder) -> None:
    state = dict(tiny_p8.model.state_dict())
    state["head.weight"] = torch.zeros(10, 64)
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "with_head.pth"
    save_state_dict_file(state, path)
    loaded = make_dino("tiny-p8", str(path))
    assert torch.equal(loaded.model.pos_embed, tiny_p8.model.pos_embed)


def test_wrong_architecture_file_names_the_file(tmp_path: Path) -> None:
    p16 = make_dino("tiny-p16", "random")
    path = tmp_path / "p16.pt"
    save_state_dict_file(p16.model.state_dict(), path)
    with pytest.raises(WeightsError, match="p16.pt") as info:
        make_dino("tiny-p8", str(path))
    assert "tiny-p8" in str(info.value) and "patch_embed.proj.weight" in str(info.value)

    state = p16.model.state_dict()
    del state["norm.weight"]
    path = tmp_path / "missing.safetensors"
    save_state_dict_file(state, path)
    with pytest.raises(WeightsError, match="missing.safetensors.*norm.weight"):
        make_dino("tiny-p16", str(path))

    with pytest.raises(WeightsError, match="nowhere.pth"):
        make_dino("tiny-p16", str(tmp_path / "nowhere.pth"))


def test_download_failure_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, pretrained: bool = False, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="model.dino.weights") as info:
        make_dino("vit_base_patch8_224.dino", "timm")
    assert "vit_base_patch8_224.dino" in str(info.value) and "no network" in str(info.value)
    with pytest.raises(WeightsError, match="vit_base_patch8_224.dino"):
        make_dino("vit_base_patch8_224", "dino")  # a tag is appended to an untagged arch
    with pytest.raises(WeightsError, match="conflicts|already names"):
        make_dino("vit_base_patch8_224.dino", "augreg_in21k")
    with pytest.raises(WeightsError, match="test model"):
        make_dino("tiny-p8", "timm")


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="vit_nonexistent"):
        make_dino("vit_nonexistent", "random")


def _tiny_dinov2_reg() -> DinoEncoder:
    """A DINOv2-with-registers ViT shrunk like the tiny DINO (layer scale, 4 registers)."""
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, embed_dim=64, depth=2,
        num_heads=4, num_classes=0,
    )
    with torch.no_grad():  # layer scale starts at 1e-5; make the blocks matter
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
    return DinoEncoder(model)


def test_register_tokens_and_layer_scale() -> None:
    torch.manual_seed(4)
    encoder = _tiny_dinov2_reg()
    assert encoder.num_prefix_tokens == 5 and encoder.patch_size == 14
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        features = encoder(x, last_qkv=True)
        reference = encoder.model.forward_features(x)
        other_size = encoder(torch.randn(1, 3, 70, 100))
    assert features.num_prefix_tokens == 5
    assert torch.allclose(features.tokens, reference[:, 5:], atol=1e-6)
    assert torch.allclose(features.cls_token, reference[:, 0], atol=1e-6)
    assert features.q.shape == (1, 4, 5 + 16, 16)
    assert other_size.grid == (5, 7) and other_size.tokens.shape == (1, 35, 64)


def test_dinov2_checkpoint_layout_is_converted() -> None:
    torch.manual_seed(5)
    encoder = _tiny_dinov2_reg()
    timm_state = encoder.model.state_dict()
    # facebookresearch/dinov2 layout: registers apart, a class position inside pos_embed
    class_pos = torch.randn(1, 1, 64)
    original = {k: v for k, v in timm_state.items() if k not in ("reg_token", "pos_embed")}
    original["register_tokens"] = timm_state["reg_token"]
    original["pos_embed"] = torch.cat([class_pos, timm_state["pos_embed"]], dim=1)
    original["cls_token"] = timm_state["cls_token"] - class_pos
    original["mask_token"] = torch.zeros(1, 64)
    converted = _adapt_checkpoint(original, encoder.model)
    assert sorted(converted) == sorted(timm_state)
    for key, value in timm_state.items():
        assert torch.allclose(converted[key], value, atol=1e-6), key


def test_random_weights_are_reproducible():
    first = make_dino("tiny-p16", "random").state_dict()
    second = make_dino("tiny-p16", "random").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
