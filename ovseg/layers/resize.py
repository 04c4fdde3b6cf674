"""Resizing of images and logit maps, as the mmcv/mmseg pipelines of the references do it."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def rescale_size(
    h: int, w: int, short_side: int, max_long_side: int, min_side: int = 1
) -> tuple[int, int]:
    """Size of an image resized keeping its aspect ratio, as mmcv's ``rescale_size`` computes it.

    The factor is the largest one that keeps the short side at most ``short_side`` and the long
    side at most ``max_long_side``: ``min(max_long_side / max(h, w), short_side / min(h, w))``.
    Each side becomes ``int(side * factor + 0.5)`` (round half up, as mmcv does), and at least
    ``min_side``: only an image far longer than wide (1x4000 with a 2048 bound: 1x2048) gets
    there, and is then stretched across, because a ViT cannot take a side below its patch.

    Args:
        h, w: size of the input image in pixels (positive).
        short_side: target length of the short side (e.g. 336).
        max_long_side: bound on the long side (2048 in every reference config).
        min_side: the smallest side returned (a method passes its patch size).

    Returns:
        (new_h, new_w).
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"rescale_size: image size must be positive, got {h}x{w}")
    if short_side <= 0 or max_long_side <= 0:
        raise ValueError(
            f"rescale_size: short_side ({short_side}) and max_long_side ({max_long_side}) "
            "must be positive"
        )
    factor = min(max_long_side / max(h, w), short_side / min(h, w))
    return max(int(h * factor + 0.5), min_side), max(int(w * factor + 0.5), min_side)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an image bilinearly with OpenCV (mmcv's ``imresize`` with ``bilinear``).

    Args:
        image: (H, W, 3) uint8 RGB (any dtype and channel count cv2 accepts also works).
        size: (new_h, new_w).

    Returns:
        (new_h, new_w, 3) array of the input's dtype.
    """
    new_h, new_w = (int(s) for s in size)
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"resize_image: target size must be positive, got {new_h}x{new_w}")
    # cv2 takes (width, height).
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of logit maps (``align_corners=False``), as every reference does it.

    Args:
        logits: (B, C, h, w) floating tensor.
        size: (H, W).

    Returns:
        (B, C, H, W) tensor of the input's dtype; the input itself when it already has that size.
    """
    if logits.dim() != 4:
        raise ValueError(
            f"resize_logits expects (B, C, h, w) logits, got shape {tuple(logits.shape)}"
        )
    target = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == target:
        return logits
    return F.interpolate(logits, size=target, mode="bilinear", align_corners=False)


def check_image(image, who: str, max_pixels: int | None = None) -> np.ndarray:
    """``image`` as an (H, W, 3) uint8 RGB numpy array, converted from the accepted forms
    (gray, RGBA, channel-first, torch tensors, PIL images, paths), or a one-line ValueError
    (floats, NaN/Inf, other types, more than ``max_pixels`` pixels; None = the default limit):
    :func:`ovseg.data.image_io.as_rgb_image`."""
    from ovseg.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, as_rgb_image

    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    return as_rgb_image(image, who, limit)


def image_tensor(
    image: np.ndarray, size: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """An (H, W, 3) uint8 RGB image resized to ``size`` (:func:`resize_image`, skipped when it
    has that size) as a (1, 3, h, w) uint8 tensor on ``device``: every 2D method's input."""
    if tuple(image.shape[:2]) != tuple(size):
        image = resize_image(image, size)
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # e.g. a view of a PIL image: torch wants writable memory
        image = image.copy()
    pixels = torch.from_numpy(image).to(device)
    return pixels.permute(2, 0, 1)[None]
