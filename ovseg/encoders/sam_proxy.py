"""SAM's image encoder as ProxyCLIP's proxy model (``model.dense_clip.proxy: sam``).

ProxyCLIP (mc-lan/ProxyCLIP, ``proxyclip_segmentor.py``, ``vfm_model == 'sam'``) feeds SAM the
same crop as CLIP: un-normalised from CLIP's statistics and normalised with ImageNet's, which
are SAM's own ``pixel_mean``/``pixel_std`` on the 0-1 scale; resized bilinearly
(``align_corners=False``) to SAM's square input (1024 x 1024 for vit_b), a stretch, not SAM's
longest-side resize with padding; through the whole image encoder, neck included. Its
(B, 256, 64, 64) image embedding is the proxy feature on a 64 x 64 grid, whatever the crop.

:class:`SamProxy` offers what the dense CLIP segmentor asks of a DINO proxy
(:meth:`renormalize`, a forward returning ``tokens`` and ``grid``), so one proxy path serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.encoders.dino import DinoEncoder

if TYPE_CHECKING:
    from ovseg.encoders.sam import SamEncoder


@dataclass
class SamProxyFeatures:
    """What one :class:`SamProxy` forward returns.

    Fields:
        tokens: (B, N, C) SAM's image embedding (neck output) as tokens, N = h * w row-major;
            C = 256 for every released SAM. The encoder's dtype.
        grid: (h, w) = SAM's encoder grid (64 x 64 for an input of 1024).
    """

    tokens: Tensor
    grid: tuple[int, int]


class SamProxy(nn.Module):
    """A frozen SAM image encoder that turns CLIP windows into proxy features.

    Attributes:
        sam: the :class:`~ovseg.encoders.sam.SamEncoder`.
        mean, std: (3,) float32, SAM's pixel statistics on the 0-1 scale (ImageNet's).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, sam: SamEncoder) -> None:
        super().__init__()
        self.sam = sam
        self.register_buffer("mean", sam.pixel_mean.detach().float().flatten() / 255.0,
                             persistent=False)
        self.register_buffer("std", sam.pixel_std.detach().float().flatten() / 255.0,
                             persistent=False)

    def train(self, mode: bool = True) -> SamProxy:
        """Stay in eval mode: the encoder is frozen."""
        return super().train(False)

    # ProxyCLIP's arithmetic (un-normalise from the given 0-1 statistics, e.g. CLIP's input, then
    # normalise with ``mean``/``std``), shared with the DINO proxies: (B, 3, H, W) float ->
    # the same shape, dtype and device
    renormalize = DinoEncoder.renormalize

    def forward(self, x: Tensor) -> SamProxyFeatures:
        """SAM's image embedding of SAM-normalised windows of any size.

        Args:
            x: (B, 3, H, W) float, normalised for SAM (see :meth:`renormalize`).

        Returns:
            :class:`SamProxyFeatures` on SAM's grid.
        """
        side = self.sam.img_size
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        embedding = self.sam(x).embedding  # (B, C, h, w)
        grid = (int(embedding.shape[-2]), int(embedding.shape[-1]))
        return SamProxyFeatures(embedding.flatten(2).transpose(1, 2), grid)
