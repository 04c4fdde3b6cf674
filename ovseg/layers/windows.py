"""Sliding-window dense inference: window grid, cutting, batching, overlap-averaged stitching.

The one dense-inference path of every 2D method. The grid follows mmseg's slide inference (the
last window is shifted back inside the image; a window larger than the image becomes the whole
image), so results match the SCLIP / NACLIP / ProxyCLIP references. Memory is bounded by the
window batch: only one batch of windows and its logits is alive at a time, beside the canvas.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ovseg.layers.resize import resize_logits

Window = tuple[int, int, int, int]
"""(y0, x0, y1, x1): rows y0..y1-1 and columns x0..x1-1 of the image."""

SizeArg = int | Sequence[int]
"""A side length for both axes, or an (h, w) pair."""


def _pair(value: SizeArg, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral):
        return int(value), int(value)
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    return values[0], values[1]


def _spans(length: int, crop: int, stride: int, axis: str) -> list[tuple[int, int]]:
    """Start/end of the windows along one side, as mmseg's slide inference places them."""
    if crop <= 0 or crop >= length:
        # One window covering the side whole (crop <= 0 means whole-image inference).
        return [(0, length)]
    if stride <= 0:
        raise ValueError(f"window stride along {axis} must be positive, got {stride}")
    if stride > crop:
        raise ValueError(
            f"window stride along {axis} ({stride}) is larger than the crop ({crop}): "
            "pixels between windows would get no prediction; use stride <= crop"
        )
    count = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def window_grid(height: int, width: int, crop: SizeArg, stride: SizeArg) -> list[Window]:
    """Windows of a sliding-window pass over an image, row-major, as mmseg places them.

    Per side: ``n = max(side - crop + stride - 1, 0) // stride + 1`` windows starting at
    ``i * stride``; the last one is shifted back to end at the border. A crop <= 0, or one at
    least as long as the side, gives one window covering that side whole. All windows of one
    grid have the same size.

    Args:
        height, width: image size in pixels.
        crop: window side, an int or an (h, w) pair.
        stride: step between windows, an int or an (h, w) pair; at most the crop.

    Returns:
        list of (y0, x0, y1, x1), rows first.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"window_grid: image size must be positive, got {height}x{width}")
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    rows = _spans(height, crop_h, stride_h, "height")
    cols = _spans(width, crop_w, stride_w, "width")
    return [(y0, x0, y1, x1) for y0, y1 in rows for x0, x1 in cols]


def _window_size(grid: Sequence[Window]) -> tuple[int, int]:
    if not grid:
        raise ValueError("the window grid is empty")
    y0, x0, y1, x1 = grid[0]
    size = (y1 - y0, x1 - x0)
    for window in grid:
        if (window[2] - window[0], window[3] - window[1]) != size:
            raise ValueError(
                f"windows of one grid must share one size; {window} differs from {grid[0]}"
            )
    return size


def cut_windows(x: torch.Tensor, grid: Sequence[Window]) -> torch.Tensor:
    """Cut the windows of ``grid`` out of one image or map and stack them.

    Args:
        x: (1, C, H, W) tensor, any dtype.
        grid: windows as ``window_grid`` returns them (all of one size h x w).

    Returns:
        (N, C, h, w) tensor of x's dtype and device, N = len(grid), in grid order.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"cut_windows expects one (1, C, H, W) image, got shape {tuple(x.shape)}")
    _window_size(grid)
    return torch.cat([x[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in grid], dim=0)


def window_counts(
    grid: Sequence[Window], size: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """How many windows cover each pixel.

    Args:
        grid: windows as ``window_grid`` returns them.
        size: (H, W) of the image.
        device: where the map lives.

    Returns:
        (1, 1, H, W) float32 counts.
    """
    counts = torch.zeros((1, 1, int(size[0]), int(size[1])), dtype=torch.float32, device=device)
    for y0, x0, y1, x1 in grid:
        counts[:, :, y0:y1, x0:x1] += 1
    return counts


def _add_windows(canvas: torch.Tensor, window_maps: torch.Tensor, grid: Sequence[Window]) -> None:
    # One window after another in grid order: the sums, and so the result, do not depend on
    # how windows were batched, and match the references' accumulation order.
    for window_map, (y0, x0, y1, x1) in zip(window_maps, grid, strict=True):
        canvas[0, :, y0:y1, x0:x1] += window_map


def _divide_by_counts(canvas: torch.Tensor, grid: Sequence[Window]) -> torch.Tensor:
    counts = window_counts(grid, canvas.shape[-2:], canvas.device)
    if bool((counts == 0).any()):
        raise ValueError("the window grid leaves pixels uncovered; every pixel needs a window")
    return canvas.div_(counts)


def stitch_windows(
    window_maps: torch.Tensor, grid: Sequence[Window], size: Sequence[int]
) -> torch.Tensor:
    """Average maps that are already at window size into one map of the image size.

    Each pixel gets the mean of the maps of all windows covering it (sum, then divide by the
    overlap count).

    Args:
        window_maps: (N, C, h, w), one map per window of ``grid``, in grid order.
        grid: windows as ``window_grid`` returns them (each h x w).
        size: (H, W) of the image.

    Returns:
        (1, C, H, W) float32 on window_maps' device.
    """
    if window_maps.dim() != 4 or window_maps.shape[0] != len(grid):
        raise ValueError(
            f"stitch_windows expects (N, C, h, w) maps with N = {len(grid)} windows, "
            f"got shape {tuple(window_maps.shape)}"
        )
    if tuple(window_maps.shape[-2:]) != _window_size(grid):
        raise ValueError(
            f"window maps are {tuple(window_maps.shape[-2:])} but the windows are "
            f"{_window_size(grid)}; resize the maps to the window size first"
        )
    canvas = torch.zeros(
        (1, window_maps.shape[1], int(size[0]), int(size[1])),
        dtype=torch.float32,
        device=window_maps.device,
    )
    _add_windows(canvas, window_maps.float(), grid)
    return _divide_by_counts(canvas, grid)


def centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """Zero padding that brings a window to the next multiple of ``multiple``, centred.

    As ProxyCLIP pads its windows: per axis the missing amount p goes p // 2 before and the rest
    after.

    Returns:
        (left, right, top, bottom), the order ``torch.nn.functional.pad`` takes; zeros when
        ``multiple <= 0`` or the sides are multiples already.
    """
    if multiple <= 0:
        return 0, 0, 0, 0
    pad_h = -height % multiple
    pad_w = -width % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def sliding_window_logits(
    image: torch.Tensor,
    predict_windows: Callable[[torch.Tensor], torch.Tensor],
    *,
    crop: SizeArg,
    stride: SizeArg,
    window_batch: int = 8,
    pad_multiple: int = 0,
) -> torch.Tensor:
    """Dense logits of one image by sliding windows, averaged where windows overlap.

    The windows of ``window_grid`` go through ``predict_windows`` in batches of at most
    ``window_batch``. Each window's logits are upsampled bilinearly (``align_corners=False``) to
    the window size, summed into a canvas and divided by the per-pixel overlap count. With
    ``pad_multiple > 0`` (ProxyCLIP) each window is first zero-padded, centred, to a multiple of
    ``pad_multiple`` per side; its logits are upsampled to the padded size and the window part
    cut back out.

    Memory: one batch of windows and its logits at a time, plus the (1, C, H, W) float32 canvas
    on the image's device.

    Args:
        image: (1, 3, H, W) float, already normalised as the model expects.
        predict_windows: (B, 3, h, w) windows -> (B, C, h', w') logits, any h', w' (usually the
            patch grid); B <= window_batch.
        crop: window side, an int or an (h, w) pair; <= 0 means the whole image.
        stride: step between windows, an int or an (h, w) pair.
        window_batch: most windows per call of ``predict_windows``.
        pad_multiple: pad each window to a multiple of this (0: no padding).

    Returns:
        (1, C, H, W) float32 logits on the image's device.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(
            f"sliding_window_logits expects one (1, 3, H, W) image, got shape {tuple(image.shape)}"
        )
    if window_batch < 1:
        raise ValueError(f"window_batch must be at least 1, got {window_batch}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    grid = window_grid(height, width, crop, stride)
    win_h, win_w = _window_size(grid)
    left, right, top, bottom = centred_padding(win_h, win_w, pad_multiple)
    padded = any((left, right, top, bottom))

    canvas: torch.Tensor | None = None
    for start in range(0, len(grid), window_batch):
        boxes = grid[start : start + window_batch]
        windows = cut_windows(image, boxes)
        if padded:
            windows = F.pad(windows, (left, right, top, bottom))
        logits = predict_windows(windows)
        if logits.dim() != 4 or logits.shape[0] != len(boxes):
            raise ValueError(
                f"predict_windows returned shape {tuple(logits.shape)} for {len(boxes)} windows; "
                "expected (B, C, h, w) with B the number of windows"
            )
        logits = logits.to(device=image.device, dtype=torch.float32)
        logits = resize_logits(logits, windows.shape[-2:])
        if padded:
            logits = logits[:, :, top : top + win_h, left : left + win_w]
        if canvas is None:
            canvas = torch.zeros(
                (1, logits.shape[1], height, width), dtype=torch.float32, device=image.device
            )
        _add_windows(canvas, logits, boxes)
        # Free this batch before the next one is cut, so memory stays one batch deep.
        del windows, logits
    assert canvas is not None  # the grid always has at least one window
    return _divide_by_counts(canvas, grid)
