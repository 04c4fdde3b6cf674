"""Overlays: class colours blended over an image, a legend panel beside it, region prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ovseg.vis.fonts import draw_text, text_style
from ovseg.vis.palette import palette
from ovseg.vis.writers import class_fractions

_PANEL_COLOR = (255, 255, 255)
_TEXT_COLOR = (20, 20, 20)
_SWATCH_BORDER = (60, 60, 60)
# text height follows the image height so the legend reads the same at any resolution
_FONT_SIZE_PER_PIXEL = 1.0 / 28.0
_FONT_SIZE_RANGE = (12, 48)
# region labels: the class name beside a box or point prompt
_REGION_FONT_SIZE = 13


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


def draw_legend(
    image: np.ndarray,
    class_names: Sequence[str],
    colors: np.ndarray,
    present: Sequence[int],
) -> np.ndarray:
    """Add a legend panel (colour swatch + name per class) to the right of the image.

    The panel is appended, so no pixel of the image is covered; the result is wider than the
    image (and taller only when the image is lower than one legend row). Classes that do not
    fit in one column of the image's height go into more columns. Names are drawn with Unicode
    fonts (:mod:`ovseg.vis.fonts`: Latin, Greek, Cyrillic with DejaVu Sans; CJK when the system
    has a CJK font; a character no font has is drawn as "?").

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
    size = int(np.clip(round(height * _FONT_SIZE_PER_PIXEL), *_FONT_SIZE_RANGE))
    style = text_style(size)
    ascent, descent = style.ascent_descent
    swatch = ascent + descent
    gap = max(4, size // 3)
    row_height = swatch + gap
    margin = gap

    texts = [class_names[index] for index in entries]
    text_width = max(style.width(text) for text in texts)
    column_width = swatch + gap + text_width + margin
    rows_per_column = max(1, (height - 2 * margin + gap) // row_height)
    num_columns = math.ceil(len(entries) / rows_per_column)
    rows_used = min(len(entries), rows_per_column)

    panel_width = margin + num_columns * column_width
    out_height = max(height, 2 * margin + rows_used * row_height - gap)
    canvas = Image.new("RGB", (width + panel_width, out_height), _PANEL_COLOR)
    draw = ImageDraw.Draw(canvas)
    for position, (index, text) in enumerate(zip(entries, texts, strict=True)):
        column, row = divmod(position, rows_per_column)
        x = width + margin + column * column_width
        y = margin + row * row_height
        color = tuple(int(c) for c in colors[index])
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=color, outline=_SWATCH_BORDER)
        # baseline at the swatch's ascent: the text spans the swatch's height
        style.draw(draw, (x + swatch + gap, y + ascent), text, _TEXT_COLOR)
    out = np.array(canvas)
    out[:height, :width] = image
    return out


# weight of the class colour in the demos' overlays; the image stays recognisable underneath
OVERLAY_ALPHA = 0.5


def legend_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """The demos' picture of a segmentation: class colours over the image, and a legend of the
    classes present, largest area first.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer indices into ``class_names``.
        class_names: C class names.

    Returns:
        (H', W + P, 3) uint8 RGB, as :func:`draw_legend`.
    """
    fractions = class_fractions(labels, class_names)
    # a repeated name is listed once, at its first index (class_fractions pools its pixels)
    index_of = {name: i for i, name in reversed(list(enumerate(class_names)))}
    present = [index_of[name] for name in fractions]
    colors = palette(class_names)
    return draw_legend(overlay(image, labels, colors, alpha), class_names, colors, present)


def draw_regions(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]] | np.ndarray | None,
    points: Sequence[Sequence[float]] | np.ndarray | None,
    labels: Sequence[int],
    class_names: Sequence[str],
) -> tuple[np.ndarray, list[dict]]:
    """Draw region prompts with their classes: each box or point in its class's colour, with
    the class name beside it.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (R_b, 4) xyxy pixels, or None.
        points: (R_p, 2) xy pixels, or None.
        labels: R_b + R_p class indices into ``class_names``, boxes first.

    Returns:
        the drawn (H, W, 3) uint8 RGB copy, and per prompt ``{"kind": "box" | "point",
        "coords": [...], "class": name}``, boxes first.
    """
    _check_image(image)
    shown = np.ascontiguousarray(image.copy())
    colors = palette(class_names)
    prompts = [("box", box) for box in (boxes if boxes is not None else [])]
    prompts += [("point", point) for point in (points if points is not None else [])]
    entries = []
    for (kind, coords), label in zip(prompts, labels, strict=True):
        color = tuple(int(c) for c in colors[label])
        xy = tuple(int(round(v)) for v in coords)
        if kind == "box":
            cv2.rectangle(shown, xy[:2], xy[2:], color, 2)
        else:
            cv2.circle(shown, xy, 4, color, -1)
        shown = draw_text(shown, class_names[label], (xy[0] + 2, xy[1] + 12), color,
                          _REGION_FONT_SIZE)
        entries.append({"kind": kind, "coords": [float(v) for v in coords],
                        "class": class_names[label]})
    return shown, entries
