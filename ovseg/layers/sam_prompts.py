"""SAM prompts from a coarse segmentation: a component's box, its best point, a mask prompt.

Coordinates are pixels (x, y) of a source map (e.g. the half-resolution label map) scaled to
SAM's input frame: the resized image inside SAM's padded square, of size ``frame`` (h, w). The
frame is SAM's actual input size (``SamFeatures.input_size``); the authors' code instead
derived it from the source map's own size, which lands prompts up to ~1% off.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size of an image resized so its long side is ``long_side``, ratio kept, as SAM's
    ``ResizeLongestSide.get_preprocess_shape`` rounds it (``int(side * scale + 0.5)``), each
    side at least 1 (SAM's would give 0 for a 1x4000 strip, which no resize takes)."""
    scale = long_side / max(height, width)
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def prompt_scale(source_size: tuple[int, int], frame: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy): multiply x by sx and y by sy to go from ``source_size`` (h, w) to ``frame``."""
    return frame[1] / source_size[1], frame[0] / source_size[0]


def box_prompt(
    box: np.ndarray | tuple[int, int, int, int], scale: tuple[float, float]
) -> torch.Tensor:
    """A component's box (x0, y0, x1, y1), inclusive pixel bounds in the source map, in SAM's
    frame: (1, 4) float32."""
    sx, sy = scale
    x0, y0, x1, y1 = (float(v) for v in box)
    # guess: the inclusive bounds are scaled as they are (SAM's own box-from-mask convention)
    return torch.tensor([[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dtype=torch.float32)


def best_point(
    probability: torch.Tensor, component: torch.Tensor, offset: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """The pixel of highest probability inside a component, (x, y) in the source map.

    Args:
        probability: (h, w) float class probability (e.g. cut to the component's box).
        component: (h, w) bool, the component's pixels (at least one).
        offset: (x0, y0) added to the result (the box's corner when the maps are cut to it).

    Returns:
        (x, y); the first in row-major order on ties.
    """
    masked = torch.where(component, probability, torch.full_like(probability, -torch.inf))
    index = int(masked.flatten().argmax())
    y, x = divmod(index, probability.shape[1])
    return x + offset[0], y + offset[1]


def point_prompt(
    point: tuple[int, int], scale: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive point (x, y) of the source map in SAM's frame: coordinates (1, 1, 2)
    float32 and labels (1, 1) int64 (1 = foreground)."""
    sx, sy = scale
    coords = torch.tensor([[[point[0] * sx, point[1] * sy]]], dtype=torch.float32)
    return coords, torch.ones((1, 1), dtype=torch.int64)


def mask_prompt(
    probability: torch.Tensor,
    frame: tuple[int, int],
    sam_size: int,
    threshold: float,
    scale: float,
) -> torch.Tensor:
    """SAM's low-resolution mask prompt from a class's whole-image probability map.

    The map is resized (bilinear) to the frame at SAM's mask resolution (long side
    ``sam_size // 4``), padded bottom/right with zeros to a square, and every value p above
    ``threshold`` becomes ``scale * p``, the rest 0.

    Args:
        probability: (h, w) float class probability.
        frame: (h, w) of SAM's input frame (the resized image inside the padded square).
        sam_size: S, SAM's square input side (1024); the prompt is (S / 4) x (S / 4).
        threshold: ct, the coarse threshold.
        scale: the mask-prompt coefficient (0.005).

    Returns:
        (1, 1, S / 4, S / 4) float32, values in {0} and scale * (0, 1].
    """
    side = sam_size // 4
    size = longest_side_shape(frame[0], frame[1], side)
    # guess: the probability map is resized bilinearly (align_corners=False), as the logits are
    resized = F.interpolate(
        probability.float()[None, None], size=size, mode="bilinear", align_corners=False
    )
    prompt = torch.where(resized > threshold, resized * scale, torch.zeros_like(resized))
    return F.pad(prompt, (0, side - size[1], 0, side - size[0]))
