"""Swin-B backbone of the proposal network: MaskFormer's D2SwinTransformer, our own module.

Implements mask_adapted.md, "Stage 1", the Swin-B sentence (the authors' own
D2SwinTransformer, window 12, 384 pretrain, not a timm model), with the authors' config:
patch 4, embed dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 12, MLP ratio 4,
qkv bias, no absolute position embedding, patch norm, drop path 0.3 (linearly rising over the
24 blocks), no other dropout, nothing frozen. Outputs ``res2``..``res5`` (strides 4..32, widths
128 / 256 / 512 / 1024), each after its own LayerNorm ``norm0``..``norm3``.

Any input size works as in the authors' code: the patch embedding pads to a multiple of 4, each
block pads its map to a multiple of the window (bottom / right, zeros after norm1) and crops
back, patch merging pads odd sizes; shifted windows use the -100 attention mask of the padded
map. timm's SwinTransformer differs in these paddings and in its names, so it is not used.

Module names are the authors' (``patch_embed.proj``, ``layers.2.blocks.17.attn.qkv``,
``layers.0.downsample.reduction``, ``norm3``; ``attn.relative_position_index`` is a buffer of
their files), so ``backbone.*`` keys load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p while training,
    scaling the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (dropout 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) int64: the bias-table row of each (query, key) pair in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative = relative + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), H and W multiples of ``window``."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    batch = windows.shape[0] // ((height // window) * (width // window))
    x = windows.view(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B * nW, N, C); mask (nW, N, N) of 0 / -100 or None -> (B * nW, N, C)."""
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, tokens, channels))


class SwinBlock(nn.Module):
    """norm1 -> (shifted) window attention -> residual; norm2 -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float,
                 drop_path: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int,
                attn_mask: torch.Tensor) -> torch.Tensor:
        """x (B, H * W, C) -> (B, H * W, C)."""
        batch, _, channels = x.shape
        shortcut = x
        x = self.norm1(x).view(batch, height, width, channels)
        pad_r = (self.window - width % self.window) % self.window
        pad_b = (self.window - height % self.window) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        padded_h, padded_w = x.shape[1], x.shape[2]
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window),
                            attn_mask if self.shift > 0 else None)
        x = window_reverse(windows, self.window, padded_h, padded_w)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :height, :width].reshape(batch, height * width, channels)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)) -> LayerNorm -> Linear
    4C -> 2C without bias; odd sizes padded first."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * channels)))


class SwinStage(nn.Module):
    """``depth`` blocks (every second one shifted by window // 2), then optional merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if index % 2 == 0 else window // 2, mlp_ratio,
                      drop_paths[index])
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(nW, window^2, window^2): -100 between tokens of different regions of the shifted,
        padded map, 0 within one."""
        padded_h = -(-height // self.window) * self.window
        padded_w = -(-width // self.window) * self.window
        regions = torch.zeros((1, padded_h, padded_w, 1), device=device)
        bounds = (slice(0, -self.window), slice(-self.window, -self.shift),
                  slice(-self.shift, None))
        count = 0
        for rows in bounds:
            for cols in bounds:
                regions[:, rows, cols, :] = count
                count += 1
        windows = window_partition(regions, self.window).squeeze(-1)
        mask = windows[:, None, :] - windows[:, :, None]
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor, height: int, width: int):
        mask = self.shift_mask(height, width, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, height, width, mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Conv patch x patch, stride patch (input padded to a multiple), then LayerNorm."""

    def __init__(self, patch: int, dim: int, norm: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, (-width) % self.patch, 0, (-height) % self.patch))
        x = self.proj(x)
        if self.norm is not None:
            grid = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(
                x.shape[0], -1, *grid)
        return x


class SwinBackbone(nn.Module):
    """Swin Transformer returning ``res2``..``res5``.

    Args:
        embed_dim: stage-1 width (128 for Swin-B); stage k has embed_dim * 2^(k-1).
        depths, num_heads: per stage ((2, 2, 18, 2), (4, 8, 16, 32)).
        window: 12; patch: 4; mlp_ratio: 4; drop_path_rate: 0.3; patch_norm: True.
    """

    def __init__(self, embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window: int = 12, patch: int = 4,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.3, patch_norm: bool = True):
        super().__init__()
        self.window = window
        self.patch_embed = PatchEmbed(patch, embed_dim, patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.out_channels: dict[str, int] = {}
        for index, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = embed_dim * 2 ** index
            start = sum(depths[:index])
            self.layers.append(SwinStage(dim, depth, heads, window, mlp_ratio,
                                         rates[start:start + depth],
                                         downsample=index < len(depths) - 1))
            self.add_module(f"norm{index}", nn.LayerNorm(dim))
            self.out_channels[STAGE_NAMES[index]] = dim
        self.strides = {name: patch * 2 ** index for index, name in enumerate(STAGE_NAMES)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised -> {"res2": (B, C, H/4, W/4), ..., "res5": (.., H/32, W/32)}
        (sizes rounded up)."""
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        features = {}
        for index, stage in enumerate(self.layers):
            out, x, next_h, next_w = stage(x, height, width)
            out = getattr(self, f"norm{index}")(out)
            features[STAGE_NAMES[index]] = out.view(-1, height, width, out.shape[-1]).permute(
                0, 3, 1, 2).contiguous()
            height, width = next_h, next_w
        return features


def build_swin_b_backbone(drop_path_rate: float = 0.3) -> SwinBackbone:
    """The authors' Swin-B: embed 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 12."""
    return SwinBackbone(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                        window=12, patch=4, mlp_ratio=4.0, drop_path_rate=drop_path_rate)
