"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP applies it.

Masks are repeatedly replaced by an image-adaptive average of their dilated 3x3 neighbours:
neighbours whose colour is close to the centre pixel's (relative to the local colour spread)
weigh more, so mask values flow along regions of similar colour and stop at image edges.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _shifted(x: torch.Tensor, dilation: int, with_centre: bool) -> Iterator[torch.Tensor]:
    """The 3x3 neighbours at offset ``dilation`` of every pixel, border replicated.

    Yields (B, C, H, W) views, rows first: (-d, -d), (-d, 0), (-d, d), (0, -d), [(0, 0)],
    (0, d), (d, -d), (d, 0), (d, d) — the order of the reference's shift kernels.
    """
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    for dy in (0, dilation, 2 * dilation):
        for dx in (0, dilation, 2 * dilation):
            if not with_centre and dy == dilation and dx == dilation:
                continue
            yield padded[:, :, dy : dy + height, dx : dx + width]


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement; no parameters.

    Affinity of a pixel to its K = 8 * len(dilations) neighbours (3x3 at each dilation):
    per colour channel, ``-|x_k - x_centre| / (1e-8 + 0.1 * std)`` with ``std`` the unbiased
    standard deviation of the 9 * len(dilations) values of the 3x3 windows (centre included,
    once per dilation, as the reference's ``LocalStDev`` computes it); averaged over channels and
    soft-maxed over the K neighbours. Then ``num_iter`` times: ``masks = sum_k affinity_k *
    masks_k``, with the neighbours taken from the current masks.

    Args:
        num_iter: refinement steps (NACLIP: 10; 0 leaves the masks unchanged).
        dilations: neighbour offsets in pixels (NACLIP: (8, 16)).
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"PAMR num_iter must be >= 0, got {num_iter}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"PAMR dilations must be positive pixel offsets, got {dilations}")
        self.num_iter = int(num_iter)
        self.dilations = dilations

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Neighbour weights of every pixel.

        Args:
            image: (B, 3, H, W) float (any number of channels works).

        Returns:
            (B, K, H, W), K = 8 * len(dilations), non-negative and summing to 1 over K; the
            neighbours in the order of ``_shifted`` for each dilation in turn.
        """
        # Local spread per channel; two passes over views instead of stacking all 9 * D shifts,
        # which keeps memory at a few image-sized tensors.
        count = 9 * len(self.dilations)
        mean = torch.zeros_like(image)
        for d in self.dilations:
            for view in _shifted(image, d, with_centre=True):
                mean += view
        mean /= count
        sq_dev = torch.zeros_like(image)
        for d in self.dilations:
            for view in _shifted(image, d, with_centre=True):
                sq_dev += (view - mean).square()
        scale = 1e-8 + 0.1 * (sq_dev / (count - 1)).sqrt()

        logits = [
            -((view - image).abs() / scale).mean(dim=1)
            for d in self.dilations
            for view in _shifted(image, d, with_centre=False)
        ]
        return torch.stack(logits, dim=1).softmax(dim=1)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refine masks along the image's edges.

        Args:
            image: (B, 3, H, W) float, the image at the masks' resolution (resizing it is the
                caller's job; NACLIP feeds its normalised input, bilinearly resized).
            masks: (B, C, H, W) float, e.g. per-class cosine logits or probabilities.

        Returns:
            (B, C, H, W) refined masks, in the promoted dtype of image and masks; each output
            value is a convex combination of input values of the same channel, so probabilities
            stay probabilities. ``masks`` itself when ``num_iter == 0``.
        """
        if self.num_iter == 0:
            return masks
        if image.dim() != 4 or masks.dim() != 4:
            raise ValueError(
                f"PAMR expects (B, 3, H, W) image and (B, C, H, W) masks, got "
                f"{tuple(image.shape)} and {tuple(masks.shape)}"
            )
        if image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"PAMR image {tuple(image.shape)} and masks {tuple(masks.shape)} differ in batch "
                "or size; resize the image to the masks' size first"
            )
        dtype = torch.promote_types(image.dtype, masks.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"PAMR needs floating-point inputs, got {image.dtype}/{masks.dtype}")
        weights = self.affinity(image.to(dtype))
        masks = masks.to(dtype)
        for _ in range(self.num_iter):
            refined = torch.zeros_like(masks)
            # Accumulate one neighbour at a time: the reference's (B, C, K, H, W) stack of
            # shifted masks is K times the size of the masks (gigabytes for 150+ classes).
            k = 0
            for d in self.dilations:
                for view in _shifted(masks, d, with_centre=False):
                    refined.addcmul_(weights[:, k : k + 1], view)
                    k += 1
            masks = refined
        return masks
