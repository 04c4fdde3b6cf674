"""The proposal network's pixel decoder: MaskFormer's BasePixelDecoder (an FPN, no transformer).

Implements mask_adapted.md, "Stage 1", the pixel-decoder sentence (FPN, 256 channels, GroupNorm,
mask dim 256, no transformer encoder), as MaskFormer builds it:

- res5: ``layer_4`` = 3x3 conv (C5 -> 256, no bias) + GN(32) + ReLU;
- res4, res3, res2 (top-down): lateral ``adapter_k`` = 1x1 conv (Ck -> 256, no bias) + GN(32),
  plus the coarser output upsampled by nearest neighbour to its size, then ``layer_k`` = 3x3
  conv + GN(32) + ReLU (k = 3, 2, 1);
- ``mask_features`` = 3x3 conv 256 -> mask dim (with bias, no norm) on the res2-level map:
  the per-pixel embeddings at 1/4 of the input.

Convs use caffe2's Xavier fill. Module names are MaskFormer's, so the authors'
``sem_seg_head.pixel_decoder.*`` keys load under ``pixel_decoder.``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.modeling.mask_proposal.blocks import ConvNorm, c2_xavier_fill, make_norm


class PixelDecoder(nn.Module):
    """FPN over res2..res5 giving the per-pixel mask embeddings.

    Args:
        in_channels: {"res2": C2, ..., "res5": C5}, finest first (strides 4..32).
        conv_dim: FPN width (256).
        mask_dim: per-pixel embedding width (256).
        norm: "GN" (the authors'), or another name of :func:`make_norm`; "" means no norm and
            biased convs.
        gn_groups: GroupNorm groups (32).
    """

    def __init__(self, in_channels: Mapping[str, int], conv_dim: int = 256, mask_dim: int = 256,
                 norm: str = "GN", gn_groups: int = 32):
        super().__init__()
        self.in_features = list(in_channels)
        use_bias = norm == ""
        last = len(self.in_features) - 1
        for index, name in enumerate(self.in_features):
            channels = in_channels[name]
            if index == last:
                layer = ConvNorm(channels, conv_dim, 3, padding=1, bias=use_bias,
                                 norm=make_norm(norm, conv_dim, gn_groups), activation=F.relu)
                c2_xavier_fill(layer)
                self.add_module(f"layer_{index + 1}", layer)
            else:
                adapter = ConvNorm(channels, conv_dim, 1, bias=use_bias,
                                   norm=make_norm(norm, conv_dim, gn_groups))
                layer = ConvNorm(conv_dim, conv_dim, 3, padding=1, bias=use_bias,
                                 norm=make_norm(norm, conv_dim, gn_groups), activation=F.relu)
                c2_xavier_fill(adapter)
                c2_xavier_fill(layer)
                self.add_module(f"adapter_{index + 1}", adapter)
                self.add_module(f"layer_{index + 1}", layer)
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features -> (B, mask_dim, H2, W2) per-pixel embeddings at res2's size."""
        y = None
        for index in reversed(range(len(self.in_features))):
            x = features[self.in_features[index]]
            if y is None:
                y = getattr(self, f"layer_{index + 1}")(x)
            else:
                lateral = getattr(self, f"adapter_{index + 1}")(x)
                y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
                y = getattr(self, f"layer_{index + 1}")(y)
        return self.mask_features(y)
