"""CLIP encoder: each dense mode against a direct re-computation, weights loading, text side."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.encoders.clip import (
    TINY_CLIP,
    build_clip,
    gaussian_window_bias,
    interpolate_pos_embed,
    proxy_attention,
)
from ovseg.encoders.weights import save_state_dict_file
from ovseg.errors import WeightsError

LAST = "visual.transformer.resblocks.2."  # the tiny CLIP has 3 blocks


@pytest.fixture(scope="module")
def clip():
    return build_clip(TINY_CLIP, "random")


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 96, 128, generator=generator)  # a 6 x 8 patch grid


def reference_last_block(weights, x, mode, grid, proxy=None):
    """The last block written out from the state dict with plain tensor ops (dense_clip.md)."""
    heads, width = 4, x.shape[-1]
    head_dim = width // heads

    def layer_norm(t, name):
        return F.layer_norm(t, (width,), weights[name + ".weight"], weights[name + ".bias"])

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    def out_proj(t):
        merged = t.transpose(1, 2).reshape(t.shape[0], -1, width)
        projection = weights[LAST + "attn.out_proj.weight"]
        return merged @ projection.T + weights[LAST + "attn.out_proj.bias"]

    def mlp(t):
        hidden = t @ weights[LAST + "mlp.c_fc.weight"].T + weights[LAST + "mlp.c_fc.bias"]
        hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
        return hidden @ weights[LAST + "mlp.c_proj.weight"].T + weights[LAST + "mlp.c_proj.bias"]

    y = layer_norm(x, LAST + "ln_1")
    qkv = y @ weights[LAST + "attn.in_proj_weight"].T + weights[LAST + "attn.in_proj_bias"]
    q, k, v = (split(part) for part in qkv.chunk(3, dim=-1))

    def softmax_logits(a, b):
        return torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)

    if mode == "vanilla":
        z = x + out_proj(softmax_logits(q, k) @ v)
        return z + mlp(layer_norm(z, LAST + "ln_2"))
    if mode == "maskclip":
        z = x + out_proj(v)
        return z + mlp(layer_norm(z, LAST + "ln_2"))
    if mode == "sclip":
        z = x + out_proj((softmax_logits(q, q) + softmax_logits(k, k)) @ v)
        return z + mlp(layer_norm(z, LAST + "ln_2"))
    if mode == "naclip":
        h, w = grid
        n = h * w
        gauss = torch.zeros(1 + n, 1 + n)
        for i in range(n):
            for j in range(n):
                dy, dx = i // w - j // w, i % w - j % w
                gauss[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * 5.0**2))
        logits = k @ k.transpose(-1, -2) / math.sqrt(head_dim) + gauss
        return out_proj(torch.softmax(logits, dim=-1) @ v)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["vanilla", "maskclip", "sclip", "naclip"])
def test_mode_equals_direct_recomputation(clip, image, mode):
    weights = clip.model.state_dict()
    out = clip(image, mode)
    expected = reference_last_block(weights, out.last_block_input, mode, out.grid)
    assert out.grid == (6, 8)
    assert torch.allclose(out.last_block_output, expected, atol=1e-5)
    visual = clip.model.visual
    features = visual.ln_post(expected) @ visual.proj
    assert torch.allclose(out.features, features[:, 1:], atol=1e-5)


def test_vanilla_class_token_equals_open_clip_forward(clip):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = clip(x, "vanilla")
    assert torch.allclose(out.cls_token, clip.encode_image(x), atol=1e-5)


def test_last_block_input_equals_open_clip_blocks(clip, image):
    out = clip(image, "vanilla", ln2_blocks=(0, 2))
    tokens, _ = clip.embed_patches(image)
    for block in clip.model.visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    assert torch.allclose(out.last_block_input, tokens, atol=1e-6)
    assert set(out.ln2) == {0, 2}
    first = clip.model.visual.transformer.resblocks[0]
    start, _ = clip.embed_patches(image)
    attended = start + first.attention(first.ln_1(start))
    assert torch.allclose(out.ln2[0], first.ln_2(attended), atol=1e-6)


def test_maskclip_is_vanilla_with_identity_attention(clip, image):
    out = clip(image, "maskclip")
    v = out.v
    identity = torch.eye(v.shape[2]).expand(*v.shape[:2], -1, -1)
    block = clip.model.visual.transformer.resblocks[-1]
    z = out.last_block_input + clip._merge_heads(identity @ v)
    z = z + block.mlp(block.ln_2(z))
    assert torch.allclose(out.last_block_output, z, atol=1e-6)


def test_sclip_attention_rows_sum_to_two(clip, image):
    out = clip(image, "sclip")
    scale = out.q.shape[-1] ** -0.5
    attn = ((out.q @ out.q.transpose(-1, -2)) * scale).softmax(-1)
    attn = attn + ((out.k @ out.k.transpose(-1, -2)) * scale).softmax(-1)
    assert torch.allclose(attn.sum(-1), torch.full(attn.shape[:-1], 2.0), atol=1e-5)


def test_naclip_gaussian_is_closed_form():
    gauss = gaussian_window_bias((3, 4), sigma=2.0)
    assert gauss.shape == (13, 13)
    assert torch.all(gauss[0] == 0) and torch.all(gauss[:, 0] == 0)
    assert torch.allclose(torch.diagonal(gauss)[1:], torch.ones(12))
    # patch (0, 0) vs patch (2, 3): squared distance 4 + 9
    assert gauss[1, 1 + 2 * 4 + 3].item() == pytest.approx(math.exp(-13 / 8), rel=1e-6)


def test_proxy_attention_of_identity_similarity_is_identity():
    # orthonormal proxy tokens: S = I, beta * mean(S) = beta / N < 1 keeps the diagonal
    tokens = torch.eye(6)[None]
    attn = proxy_attention(tokens, gamma=3.0, beta=1.2)
    assert torch.equal(attn, torch.eye(6)[None])


def test_proxy_with_identity_attention_is_pure_value_path(clip, image):
    out = clip(image, "maskclip")
    n = out.grid[0] * out.grid[1]
    proxy = clip(image, "proxy", proxy_tokens=torch.eye(n).expand(2, -1, -1), proxy_grid=out.grid)
    expected = clip._merge_heads(out.v[:, :, 1:])
    assert torch.allclose(proxy.last_block_output, expected, atol=1e-6)
    assert proxy.cls_token is None and proxy.features.shape[1] == n


def test_positional_embedding_unchanged_at_training_grid(clip):
    pos = clip.model.visual.positional_embedding
    for how in ("offset", "size"):
        assert torch.equal(interpolate_pos_embed(pos, (14, 14), how), pos)
    resized = interpolate_pos_embed(pos, (6, 8), "size")
    assert resized.shape == (1 + 48, pos.shape[1])
    assert torch.equal(resized[0], pos[0])


def test_unknown_mode_is_an_error(clip, image):
    with pytest.raises(ValueError, match="unknown CLIP attention mode"):
        clip(image, "maskclipp")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    source = build_clip(TINY_CLIP, "random")
    state = {k: torch.randn_like(v) for k, v in source.model.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    save_state_dict_file(state, path)
    loaded = build_clip(TINY_CLIP, str(path))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_wrong_architecture_names_file_and_keys(tmp_path):
    state = build_clip(TINY_CLIP, "random").model.state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    del state["ln_final.bias"]
    path = tmp_path / "broken.pt"
    save_state_dict_file(state, path)
    with pytest.raises(WeightsError) as error:
        build_clip(TINY_CLIP, str(path))
    message = str(error.value)
    assert str(path) in message and "ln_final.bias" in message and "visual.proj" in message


def test_missing_file_and_unfetchable_tag_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        build_clip(TINY_CLIP, str(tmp_path / "absent.pt"))
    with pytest.raises(WeightsError, match="no pretrained tag"):
        build_clip("ViT-B-16", "no_such_tag")
    # the real download path, told it is offline (a blocked network only retries for longer)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="model.clip.weights"):
        build_clip("ViT-B-16", "laion2b_s34b_b88k")


def test_random_weights_are_reproducible():
    first = build_clip(TINY_CLIP, "random").model.state_dict()
    second = build_clip(TINY_CLIP, "random").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_encode_text_gives_one_embedding_per_prompt(clip):
    embeddings = clip.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert embeddings.shape == (2, clip.embed_dim) and embeddings.dtype == torch.float32
    assert not torch.allclose(embeddings[0], embeddings[1])
    again = clip.encode_text(["a photo of a dog."])
    assert torch.allclose(again[0], embeddings[1], atol=1e-5)
