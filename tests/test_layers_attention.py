"""Last-block attention variants (layers/attention.py): each against a direct re-computation
from the state dict on the tiny CLIP, and the properties specs/dense_clip.md pins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovseg.config.schema import ClipConfig
from ovseg.encoders.clip import TINY_CLIP, build_clip
from ovseg.layers import attention
from ovseg.layers.attention import (
    LAST_BLOCK_VARIANTS,
    gaussian_window_bias,
    maskclip_last_block,
    proxy_attention,
    proxy_last_block,
    sclip_last_block,
)

LAST = "visual.transformer.resblocks.2."  # the tiny CLIP has 3 blocks
OPTIONS = {"naclip": {"sigma": 5.0}}


@pytest.fixture(scope="module")
def clip():
    return build_clip(ClipConfig(arch=TINY_CLIP, weights="random"))


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
    out = clip(image)
    last_output, grid = LAST_BLOCK_VARIANTS[mode](out, clip, **OPTIONS.get(mode, {}))
    expected = reference_last_block(weights, out.last_block_input, mode, out.grid)
    assert grid == out.grid == (6, 8)
    assert torch.allclose(last_output, expected, atol=1e-5)
    visual = clip.model.visual
    features = visual.ln_post(expected) @ visual.proj
    assert torch.allclose(clip.project(last_output)[:, 1:], features[:, 1:], atol=1e-5)


def test_vanilla_class_token_is_the_encoders_image_embedding(clip, image):
    out = clip(image)
    tokens, _ = LAST_BLOCK_VARIANTS["vanilla"](out, clip)
    assert torch.allclose(clip.project(tokens)[:, 0], out.cls_token, atol=1e-5)


def test_maskclip_is_vanilla_with_identity_attention(clip, image):
    out = clip(image)
    last_output, _ = maskclip_last_block(out, clip)
    v = out.v
    identity = torch.eye(v.shape[2]).expand(*v.shape[:2], -1, -1)
    block = clip.model.visual.transformer.resblocks[-1]
    z = out.last_block_input + clip.attention_output(identity @ v, layer_scale=False)
    z = z + block.mlp(block.ln_2(z))
    assert torch.allclose(last_output, z, atol=1e-6)


def test_sclip_attention_rows_sum_to_two(clip, image):
    out = clip(image)
    scale = out.q.shape[-1] ** -0.5
    attn = ((out.q @ out.q.transpose(-1, -2)) * scale).softmax(-1)
    attn = attn + ((out.k @ out.k.transpose(-1, -2)) * scale).softmax(-1)
    assert torch.allclose(attn.sum(-1), torch.full(attn.shape[:-1], 2.0), atol=1e-5)
    # and the variant is x + out_proj(attn v) with the FFN
    last_output, _ = sclip_last_block(out, clip)
    z = out.last_block_input + clip.attention_output(attn @ out.v, layer_scale=True)
    assert torch.allclose(last_output, clip.feed_forward(z), atol=1e-6)


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
    out = clip(image)
    n = out.grid[0] * out.grid[1]
    last_output, grid = proxy_last_block(
        out, clip, proxy_tokens=torch.eye(n).expand(2, -1, -1), proxy_grid=out.grid, gamma=3.0,
        beta=1.2,
    )
    expected = clip.attention_output(out.v[:, :, 1:], layer_scale=False)
    assert torch.allclose(last_output, expected, atol=1e-6)
    assert grid == out.grid and last_output.shape[1] == n  # no class token


def test_variants_are_named_by_mode_and_import_no_encoder():
    assert set(LAST_BLOCK_VARIANTS) == {"vanilla", "maskclip", "sclip", "naclip", "proxy"}
    assert "ovseg.encoders" not in Path(attention.__file__).read_text()
