"""Readers of label files as they are stored: 8/16-bit and palette PNG, 16-bit TIFF.

Labels are read at their stored bit depth and widened to int64; nothing passes through uint8,
because 847- and 459-class labels (and their ignore value 65535) do not fit in it. A palette
PNG (VOC) gives its palette indices, not colours. The benchmark's label mapping (see
``catalog.BenchmarkInfo``) is applied after reading, and every value is then checked against
the class count, so label files written for another class list fail loudly instead of
producing a silently wrong mIoU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.errors import DatasetError

LABEL_MAPPINGS = ("none", "reduce_zero_label", "shift_up_background")

# single-channel PIL modes whose pixel values are the stored numbers (P: palette indices)
_INDEX_MODES = frozenset({"L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1"})
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# how many offending values a message lists
_MAX_LISTED = 8


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.mode not in _INDEX_MODES:
            raise DatasetError(
                f"label file {path} is a {img.mode} image; labels are single-channel class "
                "indices (8/16-bit grayscale or palette PNG, 16-bit TIFF), not colours"
            )
        # np.array of a P image gives the indices, of I;16 uint16: no conversion happens
        return np.array(img)


def _read_with_cv2(path: Path) -> np.ndarray | None:
    import cv2

    # IMREAD_UNCHANGED keeps 16 bit; the default flag would convert to 8-bit BGR
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _read_stored(path: Path) -> np.ndarray:
    """The stored values of a label file, (H, W), in its own integer dtype."""
    if path.is_dir():
        raise DatasetError(f"label file {path} is a folder, not a file")
    if not path.is_file():
        raise DatasetError(f"label file {path} does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(f"label file {path} is empty (0 bytes); write it again")
    try:
        array = _read_with_pil(path)
    except DatasetError:
        raise
    except Exception as error:  # PIL raises many types for files it cannot decode
        array = None
        # some TIFF compressions PIL lacks, OpenCV's libtiff reads; never a PNG through cv2,
        # which would turn a palette PNG into colours
        if path.suffix.lower() in _TIFF_SUFFIXES:
            array = _read_with_cv2(path)
        if array is None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise DatasetError(f"cannot read label file {path}: {reason}") from error
    if array.ndim != 2:
        raise DatasetError(
            f"label file {path} has shape {array.shape}; expected one channel (H, W)"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(
            f"label file {path} holds {array.dtype} values; expected integer class indices"
        )
    return array


def apply_label_mapping(stored: np.ndarray, mapping: str, ignore_value: int) -> np.ndarray:
    """Map stored label values to class indices.

    Args:
        stored: (H, W) integer array as read from the file.
        mapping: ``none``, ``reduce_zero_label`` (0 -> ignore, v -> v - 1, ignore stays) or
            ``shift_up_background`` (ignore -> 0, v -> v + 1).
        ignore_value: the benchmark's ignore value (also the stored value of unlabeled pixels).

    Returns:
        (H, W) int64.
    """
    labels = stored.astype(np.int64)
    if mapping == "none":
        return labels
    if mapping == "reduce_zero_label":
        ignore = (labels == 0) | (labels == ignore_value)
        labels -= 1
        labels[ignore] = ignore_value
        return labels
    if mapping == "shift_up_background":
        background = labels == ignore_value
        labels += 1
        labels[background] = 0
        return labels
    raise ValueError(f"unknown label mapping '{mapping}'; expected one of {LABEL_MAPPINGS}")


def read_label(
    path: str | os.PathLike[str], mapping: str, ignore_value: int, num_classes: int
) -> np.ndarray:
    """Read a label file, map it to class indices and check its values.

    Args:
        path: a PNG (8/16-bit grayscale or palette, whose indices are read) or TIFF file.
        mapping: a name of ``LABEL_MAPPINGS``, see ``apply_label_mapping``.
        ignore_value: the value of pixels that are not evaluated (255 or 65535).
        num_classes: K; after mapping every value must be in ``[0, K)`` or ``ignore_value``.

    Returns:
        (H, W) int64 class indices, C-contiguous.

    Raises:
        DatasetError: the file is missing, unreadable, not single-channel, or holds a value
            outside ``[0, num_classes)`` other than ``ignore_value`` (the message names the
            file and the values).
    """
    if mapping not in LABEL_MAPPINGS:
        raise ValueError(f"unknown label mapping '{mapping}'; expected one of {LABEL_MAPPINGS}")
    path = Path(path)
    labels = apply_label_mapping(_read_stored(path), mapping, ignore_value)
    invalid = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_value)
    if invalid.any():
        values = np.unique(labels[invalid])
        listed = ", ".join(str(v) for v in values[:_MAX_LISTED])
        more = f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
        after = "" if mapping == "none" else f" (after the {mapping} mapping)"
        raise DatasetError(
            f"label file {path} holds value(s) {listed}{more}{after} outside the "
            f"{num_classes} classes [0, {num_classes - 1}] and not the ignore value "
            f"{ignore_value}; was it written for another class list or by another prepare "
            "script? (see datasets/README.md)"
        )
    return np.ascontiguousarray(labels)
