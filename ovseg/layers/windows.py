"""Sliding-window dense inference: window grid, cutting, batching, overlap-averaged stitching.

The one dense-inference path of every 2D method. The grid follows mmseg's slide inference (the
last window is shifted back inside the image; a window larger than the image becomes the whole
image), so results match the SCLIP / NACLIP / ProxyCLIP references. Memory is bounded by the
window batch: only one batch of windows and its logits is alive at a time, beside the canvas.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

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


def splice_windows(
    batches: Iterable[tuple[Sequence[Window], torch.Tensor]], size: Sequence[int]
) -> torch.Tensor:
    """Sum window maps at their offsets on one canvas and divide by the cover count.

    The one stitching step of every 2D method: sliding-window inference (after resizing each
    window's logits to the window) and Trident's splice of window features. Batches are added
    as they come, one window after another in order, so only one batch is alive beside the
    canvas and the sums (so the result) do not depend on how windows were batched.

    Args:
        batches: (windows, maps) pairs; windows (y0, x0, y1, x1) on the canvas, maps
            (B, C, y1 - y0, x1 - x0), one per window.
        size: (H, W) of the canvas.

    Returns:
        (C, H, W) float32 on the maps' device.

    Raises:
        ValueError: no windows, or canvas cells that no window covers.
    """
    canvas: torch.Tensor | None = None
    placed: list[Window] = []
    for windows, maps in batches:
        if canvas is None:
            canvas = torch.zeros(
                (maps.shape[1], int(size[0]), int(size[1])), dtype=torch.float32,
                device=maps.device,
            )
        for window_map, (y0, x0, y1, x1) in zip(maps, windows, strict=True):
            canvas[:, y0:y1, x0:x1] += window_map.float()
        placed.extend(windows)
    if canvas is None:
        raise ValueError("splice_windows got no windows")
    counts = window_counts(placed, size, canvas.device)[0]
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
    return splice_windows([(grid, window_maps)], size)[None]


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


@dataclass
class WindowBatch:
    """Where one batch of a sliding-window pass lies: the windows' boxes and their padding.

    boxes: (y0, x0, y1, x1) of each window on the image (all of one size h x w).
    padding: (left, right, top, bottom) zeros around each window, centred
        (:func:`centred_padding`); padded_size: (h', w') of the padded windows.
    """

    boxes: list[Window]
    padding: tuple[int, int, int, int]
    padded_size: tuple[int, int]

    def to_window(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, gh, gw) logits of the padded windows -> (B, C, h, w) float32 on the windows:
        upsampled bilinearly to the padded size, the padding cut back out."""
        if logits.dim() != 4 or logits.shape[0] != len(self.boxes):
            raise ValueError(
                f"predict_windows returned shape {tuple(logits.shape)} for {len(self.boxes)} "
                "windows; expected (B, C, h, w) with B the number of windows"
            )
        logits = resize_logits(logits.float(), self.padded_size)
        left, right, top, bottom = self.padding
        if any(self.padding):
            height = self.padded_size[0] - top - bottom
            width = self.padded_size[1] - left - right
            logits = logits[:, :, top : top + height, left : left + width]
        return logits


def window_batches(
    image: torch.Tensor,
    *,
    crop: SizeArg,
    stride: SizeArg,
    window_batch: int = 8,
    pad_multiple: int = 0,
) -> Iterator[tuple[WindowBatch, torch.Tensor]]:
    """The windows of a sliding-window pass over one image, ``window_batch`` at a time.

    The grid is :func:`window_grid`'s; with ``pad_multiple > 0`` (ProxyCLIP) each window is
    zero-padded, centred, to a multiple of ``pad_multiple`` per side (:func:`centred_padding`).
    A batch is cut when it is asked for, so one batch of windows is alive at a time.

    Args:
        image: (1, C, H, W), already normalised as the model expects.

    Yields:
        (:class:`WindowBatch`, (B, C, h', w') padded window pixels), in grid order.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(
            f"sliding windows expect one (1, 3, H, W) image, got shape {tuple(image.shape)}"
        )
    if window_batch < 1:
        raise ValueError(f"window_batch must be at least 1, got {window_batch}")
    grid = window_grid(int(image.shape[-2]), int(image.shape[-1]), crop, stride)
    win_h, win_w = _window_size(grid)
    padding = centred_padding(win_h, win_w, pad_multiple)
    left, right, top, bottom = padding
    padded_size = (win_h + top + bottom, win_w + left + right)
    for start in range(0, len(grid), window_batch):
        boxes = grid[start : start + window_batch]
        windows = cut_windows(image, boxes)
        if any(padding):
            windows = F.pad(windows, padding)
        yield WindowBatch(list(boxes), padding, padded_size), windows


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

    The windows of :func:`window_batches` go through ``predict_windows``; each window's logits
    are upsampled bilinearly (``align_corners=False``) to the (padded) window size, the padding
    cut back out (:meth:`WindowBatch.to_window`), and the windows spliced on one canvas
    divided by the per-pixel overlap count (:func:`splice_windows`).

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
    batches = window_batches(
        image, crop=crop, stride=stride, window_batch=window_batch, pad_multiple=pad_multiple
    )
    spliced = (
        (batch.boxes, batch.to_window(predict_windows(pixels))) for batch, pixels in batches
    )
    return splice_windows(spliced, image.shape[-2:])[None]
