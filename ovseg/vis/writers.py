"""Output writers (label PNGs, RGB PNGs, JSON), all atomic through ``ovseg.io.atomic_path``.

Each writer writes a temporary file in the destination's folder and renames it over the
destination only when the write succeeded, so an interrupted or failed write never leaves a
half-written file under the final name (and never destroys an older complete one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# atomic_path stays importable from here (and ovseg.vis): writers and prepare scripts use it
from ovseg.io import atomic_path

__all__ = [
    "atomic_path",
    "class_fractions",
    "write_json",
    "write_label_png",
    "write_rgb_png",
]

# labels above this need 16-bit PNGs; 255 stays free in 8-bit files for an ignore value
_MAX_UINT8_CLASSES = 255
_MAX_UINT16_CLASSES = 65536


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.ndim != 2:
        raise ValueError(f"labels have shape {labels.shape}; expected (H, W)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels have dtype {labels.dtype}; expected an integer dtype")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}]; expected values in "
            f"[0, {num_classes}) for {num_classes} classes"
        )


def _imwrite(path: Path, array: np.ndarray) -> None:
    # cv2.imwrite reports failure by returning False, not by raising
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write image {path}")


def write_label_png(path: str | os.PathLike[str], labels: np.ndarray, num_classes: int) -> None:
    """Write class indices as a single-channel PNG, atomically.

    Args:
        path: destination ``.png`` file.
        labels: (H, W) integer class indices in ``[0, num_classes)``.
        num_classes: C. The PNG is 8-bit when C <= 255, else 16-bit (C <= 65536); pixel
            values are the class indices, unchanged.
    """
    if not 0 < num_classes <= _MAX_UINT16_CLASSES:
        raise ValueError(f"num_classes is {num_classes}; expected 1 to {_MAX_UINT16_CLASSES}")
    _check_labels(labels, num_classes)
    dtype = np.uint8 if num_classes <= _MAX_UINT8_CLASSES else np.uint16
    array = np.ascontiguousarray(labels.astype(dtype))
    with atomic_path(path) as temporary:
        _imwrite(temporary, array)


def write_rgb_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as a PNG, atomically."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8"
        )
    # cv2 stores channels in BGR order
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    with atomic_path(path) as temporary:
        _imwrite(temporary, bgr)


def class_fractions(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Fraction of the pixels of each class present in ``labels``.

    Args:
        labels: (H, W) integer class indices in ``[0, len(class_names))``.
        class_names: C class names.

    Returns:
        ``{name: fraction}`` for the classes with at least one pixel, by decreasing fraction
        (ties in class order); the fractions sum to 1 (up to float rounding).
    """
    num_classes = len(class_names)
    _check_labels(labels, num_classes)
    if labels.size == 0:
        return {}
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)
    # a repeated name (not possible in a Vocabulary, but in a plain list) pools its pixels
    pooled: dict[str, int] = {}
    for name, count in zip(class_names, counts.tolist(), strict=True):
        if count:
            pooled[name] = pooled.get(name, 0) + count
    total = float(labels.size)
    # sorted() is stable, so equal fractions keep class order
    ranked = sorted(pooled.items(), key=lambda item: -item[1])
    return {name: count / total for name, count in ranked}


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays sneak into results; write them as plain JSON numbers/lists
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (indented, numpy values and paths converted), atomically."""
    # serialise first: an unserialisable object then fails before any file is touched
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
