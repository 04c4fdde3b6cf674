"""Last-block attention variants of a frozen CLIP ViT: vanilla, MaskCLIP, SCLIP, NACLIP, ProxyCLIP.

Only the last residual block changes between the dense CLIP baselines (``specs/dense_clip.md``).
Each variant takes the encoder's intermediates (the last block's input and its q/k/v from ln_1)
and the block's own pieces through :class:`LastBlock`, and returns the block's output tokens
before ln_post with the grid they live on. A new variant is a function here; no encoder changes.

``LAST_BLOCK_VARIANTS`` names them; a variant's own numbers (NACLIP's sigma, ProxyCLIP's gamma
and beta) are keyword arguments given by the method from its config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class LastBlockInputs(Protocol):
    """What a variant reads of one encoder forward (e.g. ``ClipIntermediates``).

    last_block_input: (B, 1 + N, W) tokens entering the last block, class token first.
    q, k, v: (B, heads, 1 + N, head_dim) of the last block, from its ln_1 output.
    grid: (h, w) patch grid, N = h * w.
    """

    last_block_input: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    grid: tuple[int, int]


class LastBlock(Protocol):
    """The pieces of the last block a variant may reuse (e.g. ``ClipEncoder``)."""

    def attention_output(self, heads_out: Tensor, layer_scale: bool) -> Tensor:
        """(B, heads, L, head_dim) -> (B, L, W): merge heads, out_proj, then ls_1 if asked."""
        ...

    def feed_forward(self, z: Tensor) -> Tensor:
        """(B, L, W) -> z + ls_2(mlp(ln_2(z)))."""
        ...


class BlockOutput(NamedTuple):
    """A variant's result.

    tokens: (B, L, W) last-block output before ln_post; L = 1 + h * w with the class token
        first, or h * w (ProxyCLIP, whose output has no class token).
    grid: (h, w) of the patch tokens, which are always the last h * w of ``tokens``.
    """

    tokens: Tensor
    grid: tuple[int, int]


def scaled_softmax(queries: Tensor, keys: Tensor) -> Tensor:
    """softmax(queries keysᵀ / √d) over keys: (..., Lq, d), (..., Lk, d) -> (..., Lq, Lk)."""
    scale = queries.shape[-1] ** -0.5
    return ((queries @ keys.transpose(-1, -2)) * scale).softmax(-1)


def vanilla_last_block(inputs: LastBlockInputs, block: LastBlock) -> BlockOutput:
    """The unmodified block: x + ls_1(out_proj(softmax(q kᵀ/√d) v)), then the FFN."""
    heads_out = scaled_softmax(inputs.q, inputs.k) @ inputs.v
    z = inputs.last_block_input + block.attention_output(heads_out, layer_scale=True)
    return BlockOutput(block.feed_forward(z), tuple(inputs.grid))


def maskclip_last_block(inputs: LastBlockInputs, block: LastBlock) -> BlockOutput:
    """MaskCLIP: the value path, no token mixing: z = x + out_proj(v), then the FFN."""
    z = inputs.last_block_input + block.attention_output(inputs.v, layer_scale=True)
    return BlockOutput(block.feed_forward(z), tuple(inputs.grid))


def sclip_last_block(inputs: LastBlockInputs, block: LastBlock) -> BlockOutput:
    """SCLIP's correlative self-attention: [softmax(q qᵀ/√d) + softmax(k kᵀ/√d)] v (rows sum
    to 2, no halving), with the residual and the FFN."""
    q, k = inputs.q, inputs.k
    attn = scaled_softmax(q, q)
    attn = attn + scaled_softmax(k, k)
    z = inputs.last_block_input + block.attention_output(attn @ inputs.v, layer_scale=True)
    return BlockOutput(block.feed_forward(z), tuple(inputs.grid))


def gaussian_window_bias(grid: tuple[int, int], sigma: float) -> Tensor:
    """NACLIP's neighbourhood bias G: (1 + N, 1 + N), exp(-|p_i - p_j|^2 / (2 sigma^2)).

    Peak 1 on the diagonal (not a normalised density); class row and column are 0.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    squared = torch.cdist(positions, positions).pow(2)
    gauss = torch.exp(-squared / (2 * sigma**2))
    return F.pad(gauss, (1, 0, 1, 0))


def naclip_last_block(inputs: LastBlockInputs, block: LastBlock, *, sigma: float) -> BlockOutput:
    """NACLIP: out_proj(softmax(k kᵀ/√d + G) v), G = :func:`gaussian_window_bias` with
    ``sigma`` in patches; no residual, no FFN."""
    k = inputs.k
    bias = gaussian_window_bias(inputs.grid, sigma).to(k.dtype).to(k.device)
    scale = k.shape[-1] ** -0.5
    attn = ((k @ k.transpose(-1, -2)) * scale + bias).softmax(-1)
    return BlockOutput(block.attention_output(attn @ inputs.v, layer_scale=False),
                       tuple(inputs.grid))


def proxy_attention(
    proxy_tokens: Tensor,
    gamma: float,
    beta: float,
    mean: Tensor | float | None = None,
) -> Tensor:
    """ProxyCLIP's attention from proxy features (B, N', C) -> (B, N', N').

    S = cosine similarity; S' = gamma * (S - beta * m) with m one scalar mean of S per image;
    entries with S' < 0 are masked out, then a row softmax.

    mean: m given from outside, a float or a tensor broadcastable to (B, 1, 1) (Trident takes
        the mean of S over all windows of an image); None = the mean of each image's own S.
    """
    normed = F.normalize(proxy_tokens, dim=-1)
    similarity = normed @ normed.transpose(1, 2)
    if mean is None:
        mean = similarity.mean(dim=(1, 2), keepdim=True)
    elif isinstance(mean, Tensor):
        mean = mean.to(similarity.device, similarity.dtype)
    logits = gamma * (similarity - beta * mean)
    logits = logits.masked_fill(logits < 0, float("-inf"))
    return logits.softmax(dim=-1)


def proxy_last_block(
    inputs: LastBlockInputs,
    block: LastBlock,
    *,
    proxy_tokens: Tensor,
    proxy_grid: tuple[int, int],
    gamma: float,
    beta: float,
    mean: Tensor | float | None = None,
) -> BlockOutput:
    """ProxyCLIP: out_proj(A up(v)) on the proxy grid; no residual, no FFN, no class token.

    A = :func:`proxy_attention` of ``proxy_tokens`` (B, N', C) on ``proxy_grid`` (a DINO's
    tokens), the same for every head; up(v) = CLIP's patch values resized bilinearly per head
    to ``proxy_grid``. ``mean``: m given from outside (see :func:`proxy_attention`).
    """
    v = inputs.v
    attn = proxy_attention(proxy_tokens.to(v.dtype), gamma, beta, mean)
    batch, heads, _, head_dim = v.shape
    patch_v = v[:, :, 1:].transpose(2, 3).reshape(batch * heads, head_dim, *inputs.grid)
    patch_v = F.interpolate(patch_v, size=proxy_grid, mode="bilinear", align_corners=False)
    patch_v = patch_v.reshape(batch, heads, head_dim, -1).transpose(2, 3)
    return BlockOutput(block.attention_output(attn.unsqueeze(1) @ patch_v, layer_scale=False),
                       tuple(proxy_grid))


LAST_BLOCK_VARIANTS: dict[str, Callable[..., BlockOutput]] = {
    "vanilla": vanilla_last_block,
    "maskclip": maskclip_last_block,
    "sclip": sclip_last_block,
    "naclip": naclip_last_block,
    "proxy": proxy_last_block,
}
