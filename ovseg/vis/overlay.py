"""Overlays: class colours blended over an image, and a legend panel beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_PANEL_COLOR = (255, 255, 255)
_TEXT_COLOR = (20, 20, 20)
_SWATCH_BORDER = (60, 60, 60)
# text height follows the image height so the legend reads the same at any resolution
_FONT_SCALE_PER_PIXEL = 1.0 / 720.0
_FONT_SCALE_RANGE = (0.4, 1.5)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8"
        )


def _check_colors(colors: np.ndarray, num_classes: int | None = None) -> None:
    if colors.ndim != 2 or colors.shape[1] != 3:
        raise ValueError(f"colors has shape {colors.shape}; expected (C, 3)")
    if num_classes is not None and colors.shape[0] != num_classes:
        raise ValueError(
            f"colors has {colors.shape[0]} rows for {num_classes} class names; expected one "
            "row per class"
        )


def overlay(
    image: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend each pixel's class colour over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer class indices into ``colors``; pixels outside [0, C) (e.g. an
            ignore value) keep the image's colour.
        colors: (C, 3) uint8 RGB, e.g. from ``palette``.
        alpha: weight of the class colour, in [0, 1]; 0 returns the image, 1 the colours.

    Returns:
        (H, W, 3) uint8 RGB: ``round((1 - alpha) * image + alpha * colors[labels])``.
    """
    _check_image(image)
    _check_colors(colors)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels have shape {labels.shape}; expected {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is {alpha}; expected a value in [0, 1]")
    num_classes = colors.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    class_rgb = colors.astype(np.float32)[np.where(valid, labels, 0)]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * class_rgb
    out = np.rint(blended).clip(0, 255).astype(np.uint8)
    out[~valid] = image[~valid]
    return out


def _ascii(text: str) -> str:
    # cv2's Hershey fonts draw ASCII only; make the loss visible instead of drawing garbage
    return "".join(char if 32 <= ord(char) < 127 else "?" for char in text)


def draw_legend(
    image: np.ndarray,
    class_names: Sequence[str],
    colors: np.ndarray,
    present: Sequence[int],
) -> np.ndarray:
    """Add a legend panel (colour swatch + name per class) to the right of the image.

    The panel is appended, so no pixel of the image is covered; the result is wider than the
    image (and taller only when the image is lower than one legend row). Classes that do not
    fit in one column of the image's height go into more columns.

    Args:
        image: (H, W, 3) uint8 RGB (usually an ``overlay``).
        class_names: C class names.
        colors: (C, 3) uint8 RGB colours of the classes.
        present: indices (into ``class_names``) of the classes to list, in the order to list
            them; repeats are listed once. Empty: the image is returned unchanged (a copy).

    Returns:
        (H', W + P, 3) uint8 RGB with ``H' >= H``; ``out[:H, :W]`` equals ``image``.
    """
    _check_image(image)
    _check_colors(colors, len(class_names))
    entries = list(dict.fromkeys(int(index) for index in present))
    for index in entries:
        if not 0 <= index < len(class_names):
            raise ValueError(
                f"present class index {index} is outside [0, {len(class_names)}) of the class names"
            )
    if not entries:
        return image.copy()

    height, width = image.shape[:2]
    scale = float(
        np.clip(height * _FONT_SCALE_PER_PIXEL, _FONT_SCALE_RANGE[0], _FONT_SCALE_RANGE[1])
    )
    thickness = 1 if scale < 0.8 else 2
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    swatch = text_height + baseline
    gap = max(4, text_height // 2)
    row_height = swatch + gap
    margin = gap

    texts = [_ascii(class_names[index]) for index in entries]
    text_width = max(cv2.getTextSize(text, _FONT, scale, thickness)[0][0] for text in texts)
    column_width = swatch + gap + text_width + margin
    rows_per_column = max(1, (height - 2 * margin + gap) // row_height)
    num_columns = math.ceil(len(entries) / rows_per_column)
    rows_used = min(len(entries), rows_per_column)

    panel_width = margin + num_columns * column_width
    out_height = max(height, 2 * margin + rows_used * row_height - gap)
    out = np.empty((out_height, width + panel_width, 3), dtype=np.uint8)
    out[:] = _PANEL_COLOR
    out[:height, :width] = image

    for position, (index, text) in enumerate(zip(entries, texts, strict=True)):
        column, row = divmod(position, rows_per_column)
        x = width + margin + column * column_width
        y = margin + row * row_height
        color = tuple(int(c) for c in colors[index])
        cv2.rectangle(out, (x, y), (x + swatch - 1, y + swatch - 1), color, thickness=-1)
        cv2.rectangle(out, (x, y), (x + swatch - 1, y + swatch - 1), _SWATCH_BORDER, 1)
        # org is the text's baseline-left corner: baseline level with the swatch's upper part
        # so descenders stay within the swatch's height
        cv2.putText(
            out,
            text,
            (x + swatch + gap, y + text_height),
            _FONT,
            scale,
            _TEXT_COLOR,
            thickness,
            cv2.LINE_AA,
        )
    return out
