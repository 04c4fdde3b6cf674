"""Masked-region crops for CLIP: threshold, tight box, mean-colour fill, normalise, resize.

Implements mask_adapted.md, "Stage 2: masked-region classification" (the crop paragraph):
binary mask = probability > threshold (strict); queries with an empty binary mask are invalid
and get no crop; the crop is the tight bounding box of the binary mask (x2, y2 exclusive, no
expansion); pixels outside the mask are filled with CLIP's mean colour; the crop is normalised
with CLIP's mean/std, then resized bicubic to 224 x 224 (aspect ratio not kept); the binary
mask inside the box is resized nearest to 224 x 224 (for mask prompt tuning).

Memory is bounded by ``crop_batch``: :func:`masked_crop_batches` thresholds ``crop_batch``
queries at a time and yields the resized crops in batches of at most ``crop_batch``, so 100
queries on a large image never hold 100 full-size binary masks or crops at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, 0-1 scale: the same values as ovseg.encoders.clip.OPENAI_MEAN /
# OPENAI_STD (this layer may not import encoders; tests check they agree)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# the fill colour of outside-mask pixels, 0-255 RGB: 255 x CLIP's mean = (122.8, 116.8, 104.1),
# not a data set's mean; after CLIP normalisation these pixels are 0
CLIP_MEAN_COLOUR: tuple[float, float, float] = tuple(255.0 * c for c in _OPENAI_MEAN)
CLIP_STD_COLOUR: tuple[float, float, float] = tuple(255.0 * c for c in _OPENAI_STD)
# "zero" fill (MASK_FILL "zero"): black
BLACK: tuple[float, float, float] = (0.0, 0.0, 0.0)
CROP_SIZE = 224


@dataclass
class RegionCrops:
    """One batch of masked-region crops, n <= ``crop_batch``.

    queries: (n,) int64 indices of the crops' masks among the Q queries, increasing.
    images: (n, 3, S, S) float32 CLIP-normalised crops (S = ``size``, 224).
    masks: (n, S, S) float32 binary masks (0/1) inside the same boxes, resized nearest.
    boxes: (n, 4) int64 (x1, y1, x2, y2) boxes in the image, x2 and y2 exclusive.
    """

    queries: torch.Tensor
    images: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.queries.shape[0])


def binary_masks(mask_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(..., H, W) mask probabilities -> bool masks, probability **strictly** above ``threshold``
    (a pixel at exactly the threshold is outside)."""
    return mask_probs > threshold


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Tight box (x1, y1, x2, y2) of a (H, W) bool mask, x2 and y2 exclusive; None if empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_region(
    image: torch.Tensor,
    mask: torch.Tensor,
    box: tuple[int, int, int, int],
    fill: tuple[float, float, float] = CLIP_MEAN_COLOUR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``box`` out of the image and fill the pixels outside the mask with ``fill``.

    Args:
        image: (3, H, W) RGB, 0-255 scale, any dtype.
        mask: (H, W) bool binary mask.
        box: (x1, y1, x2, y2), x2 and y2 exclusive.
        fill: RGB on the 0-255 scale (default CLIP's mean colour).

    Returns:
        region: (3, y2 - y1, x2 - x1) float32, image * mask + fill * (1 - mask).
        region_mask: (y2 - y1, x2 - x1) float32 0/1.
    """
    x1, y1, x2, y2 = box
    region_mask = mask[y1:y2, x1:x2].float()
    region = image[:, y1:y2, x1:x2].float()
    colour = torch.tensor(fill, dtype=torch.float32, device=region.device).view(3, 1, 1)
    return region * region_mask + colour * (1.0 - region_mask), region_mask


def masked_crop_batches(
    image: torch.Tensor,
    mask_probs: torch.Tensor,
    *,
    threshold: float,
    crop_batch: int,
    fill: tuple[float, float, float] = CLIP_MEAN_COLOUR,
    mean: tuple[float, float, float] = CLIP_MEAN_COLOUR,
    std: tuple[float, float, float] = CLIP_STD_COLOUR,
    size: int = CROP_SIZE,
) -> Iterator[RegionCrops]:
    """CLIP inputs of every valid query's masked region, ``crop_batch`` at a time.

    Args:
        image: (3, H, W) RGB on the 0-255 scale, not normalised (the resized test image).
        mask_probs: (Q, H, W) sigmoid mask probabilities at the image's resolution.
        threshold: a pixel is inside a mask when its probability is > threshold.
        crop_batch: the most queries thresholded, and crops yielded, at a time (>= 1).
        fill: colour of outside-mask pixels, 0-255 RGB (CLIP's mean; :data:`BLACK` = "zero").
        mean, std: normalisation, 0-255 scale (CLIP's own).
        size: side of the square crops (224).

    Yields:
        :class:`RegionCrops` of at most ``crop_batch`` crops, valid queries in increasing
        order; nothing when no query has a pixel above the threshold. Queries that never
        appear are invalid (empty binary mask).
    """
    if crop_batch < 1:
        raise ValueError(f"crop_batch must be >= 1, got {crop_batch}")
    if image.ndim != 3 or mask_probs.ndim != 3 or image.shape[1:] != mask_probs.shape[1:]:
        raise ValueError(
            f"image (3, H, W) and mask_probs (Q, H, W) must share H, W; got {tuple(image.shape)}"
            f" and {tuple(mask_probs.shape)}"
        )
    device = image.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]] = []
    for start in range(0, mask_probs.shape[0], crop_batch):
        chunk = binary_masks(mask_probs[start:start + crop_batch].to(device), threshold)
        for offset, mask in enumerate(chunk):
            box = mask_box(mask)
            if box is None:  # an invalid query: CLIP does not see it
                continue
            region, region_mask = crop_region(image, mask, box, fill)
            # normalise, then resize (in this order, as the reference does)
            region = (region[None] - mean_t) / std_t
            region = F.interpolate(region, size=(size, size), mode="bicubic", align_corners=False)
            region_mask = F.interpolate(region_mask[None, None], size=(size, size), mode="nearest")
            pending.append((start + offset, region[0], region_mask[0, 0], box))
            if len(pending) == crop_batch:
                yield _batch(pending, device)
                pending = []
        del chunk
    if pending:
        yield _batch(pending, device)


def _batch(items, device: torch.device) -> RegionCrops:
    queries, images, masks, boxes = zip(*items, strict=True)
    return RegionCrops(
        queries=torch.tensor(queries, dtype=torch.int64, device=device),
        images=torch.stack(images),
        masks=torch.stack(masks),
        boxes=torch.tensor(boxes, dtype=torch.int64, device=device),
    )
