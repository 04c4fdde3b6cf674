"""DeepLab ResNet backbones of the proposal network: R101c, and a tiny one for tests.

Implements mask_adapted.md, "Stage 1", the R101c sentence, as the authors' config builds it
(detectron2's ``build_resnet_deeplab_backbone`` with ``STEM_TYPE deeplab``,
``STEM_OUT_CHANNELS 128``, ``STRIDE_IN_1X1 False``, ``RES5_MULTI_GRID [1, 2, 4]`` and the
detectron2 defaults the config leaves alone: ``NORM FrozenBN``, ``RES5_DILATION 1``,
``RES4_DILATION 1``, ``FREEZE_AT 2``):

- stem: three 3x3 convs 3 -> 64 (stride 2) -> 64 -> 128, each with norm and ReLU, then a 3x3
  max-pool with stride 2 (output stride 4);
- res2..res5: bottleneck blocks (3, 4, 23, 3), widths 256 / 512 / 1024 / 2048 with bottleneck
  64 / 128 / 256 / 512; the stride sits in the 3x3 conv; res3..res5 start with stride 2
  (output strides 4, 8, 16, 32); the blocks of res5 have dilations 1 x (1, 2, 4);
- all norms frozen batch norm; the stem and res2 get no gradient (``freeze_at`` 2).

Module names are detectron2's (``stem.conv1``, ``res5.2.conv2``, ``res2.0.shortcut``, each
conv's norm under ``.norm``), so the authors' ``backbone.*`` keys load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.modeling.mask_proposal.blocks import ConvNorm, c2_msra_fill, make_norm

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class DeepLabStem(nn.Module):
    """3x3 convs in -> out/2 (stride 2) -> out/2 -> out, ReLU after each, then max-pool 3/2."""

    def __init__(self, in_channels: int = 3, out_channels: int = 128, norm: str = "FrozenBN",
                 gn_groups: int = 32):
        super().__init__()
        half = out_channels // 2
        self.conv1 = ConvNorm(in_channels, half, 3, stride=2, padding=1, bias=False,
                              norm=make_norm(norm, half, gn_groups))
        self.conv2 = ConvNorm(half, half, 3, stride=1, padding=1, bias=False,
                              norm=make_norm(norm, half, gn_groups))
        self.conv3 = ConvNorm(half, out_channels, 3, stride=1, padding=1, bias=False,
                              norm=make_norm(norm, out_channels, gn_groups))
        for conv in (self.conv1, self.conv2, self.conv3):
            c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out, H/4, W/4)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1, plus a projection shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int,
                 stride: int = 1, dilation: int = 1, norm: str = "FrozenBN", gn_groups: int = 32):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride, bias=False,
                                     norm=make_norm(norm, out_channels, gn_groups))
        else:
            self.shortcut = None
        # STRIDE_IN_1X1 False: the stride is in the 3x3 conv
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=1, bias=False,
                              norm=make_norm(norm, bottleneck_channels, gn_groups))
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride,
                              padding=dilation, dilation=dilation, bias=False,
                              norm=make_norm(norm, bottleneck_channels, gn_groups))
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, bias=False,
                              norm=make_norm(norm, out_channels, gn_groups))
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class DeepLabResNet(nn.Module):
    """DeepLab-stem ResNet returning ``res2``..``res5`` (output strides 4, 8, 16, 32).

    Args:
        blocks_per_stage: bottleneck blocks of res2..res5 ((3, 4, 23, 3) for ResNet-101).
        stem_channels: the stem's output width (128).
        res2_channels: res2's output width (256); each later stage doubles it.
        bottleneck_channels: res2's bottleneck width (64); each later stage doubles it.
        res5_multi_grid: dilation factors of res5's blocks ((1, 2, 4)), times
            ``res5_dilation``; one per res5 block.
        res5_dilation: res5's base dilation (1: res5 keeps its stride 2).
        norm: ``FrozenBN`` (the authors'), ``BN``, ``GN`` or "".
        freeze_at: 0 nothing frozen; 1 the stem; 2 the stem and res2 (detectron2's rule).
        gn_groups: groups of ``GN`` norms.
    """

    def __init__(self, blocks_per_stage: Sequence[int] = (3, 4, 23, 3), stem_channels: int = 128,
                 res2_channels: int = 256, bottleneck_channels: int = 64,
                 res5_multi_grid: Sequence[int] = (1, 2, 4), res5_dilation: int = 1,
                 norm: str = "FrozenBN", freeze_at: int = 2, gn_groups: int = 32):
        super().__init__()
        if len(blocks_per_stage) != 4:
            raise ValueError(f"blocks_per_stage needs 4 entries (res2..res5), got "
                             f"{tuple(blocks_per_stage)}")
        if len(res5_multi_grid) != blocks_per_stage[3]:
            raise ValueError(f"res5_multi_grid {tuple(res5_multi_grid)} needs one entry per res5 "
                             f"block ({blocks_per_stage[3]})")
        self.stem = DeepLabStem(3, stem_channels, norm, gn_groups)
        in_channels, out_channels, bottleneck = stem_channels, res2_channels, bottleneck_channels
        self.out_channels: dict[str, int] = {}
        for index, (name, num_blocks) in enumerate(zip(STAGE_NAMES, blocks_per_stage,
                                                       strict=True)):
            dilation = res5_dilation if name == "res5" else 1
            first_stride = 1 if index == 0 or dilation > 1 else 2
            if name == "res5":
                dilations = [dilation * grid for grid in res5_multi_grid]
            else:
                dilations = [dilation] * num_blocks
            blocks = []
            for block in range(num_blocks):
                blocks.append(BottleneckBlock(
                    in_channels, out_channels, bottleneck,
                    stride=first_stride if block == 0 else 1, dilation=dilations[block],
                    norm=norm, gn_groups=gn_groups,
                ))
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            self.out_channels[name] = out_channels
            out_channels *= 2
            bottleneck *= 2
        self.strides = dict(STAGE_STRIDES)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients of the stem (``freeze_at`` >= 1) and of res{k} (>= k)."""
        modules = [self.stem] + [getattr(self, name) for name in STAGE_NAMES]
        for index, module in enumerate(modules):
            if freeze_at >= index + 1:
                for parameter in module.parameters():
                    parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised -> {"res2": (B, C2, H/4, W/4), ..., "res5": (.., H/32, W/32)}."""
        x = self.stem(x)
        features = {}
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            features[name] = x
        return features


def build_r101c_backbone() -> DeepLabResNet:
    """The authors' R101c: ResNet-101, DeepLab stem 64-64-128, res5 multi-grid (1, 2, 4)."""
    return DeepLabResNet(blocks_per_stage=(3, 4, 23, 3), stem_channels=128, res2_channels=256,
                         bottleneck_channels=64, res5_multi_grid=(1, 2, 4), res5_dilation=1,
                         norm="FrozenBN", freeze_at=2)


def build_tiny_backbone(norm: str = "GN", freeze_at: int = 0) -> DeepLabResNet:
    """A small DeepLab ResNet for tests: one block per stage up to res5's (1, 2, 4) multi-grid,
    stem 16-16-32, widths 32 / 64 / 128 / 256, GroupNorm with 8 groups; the same names and
    strides as R101c."""
    return DeepLabResNet(blocks_per_stage=(1, 1, 1, 3), stem_channels=32, res2_channels=32,
                         bottleneck_channels=16, res5_multi_grid=(1, 2, 4), res5_dilation=1,
                         norm=norm, freeze_at=freeze_at, gn_groups=8)
