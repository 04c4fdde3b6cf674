"""Class colours: a fixed colour per class name, the same in every run and every vocabulary.

A colour comes from a cryptographic hash of the name (not Python's ``hash()``, which is salted
per process), mapped to HSV with saturation and value kept in a band that reads well over
photos and under black legend text. Names are compared case-insensitively after collapsing
whitespace, so "Traffic  light" and "traffic light" share a colour.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence

import numpy as np

# bands chosen so no class is near-black (invisible in overlays) or near-white/gray (washed out)
_SATURATION_RANGE = (0.55, 0.95)
_VALUE_RANGE = (0.65, 0.95)


def _color_from_key(key: str) -> tuple[int, int, int]:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest()
    hue = int.from_bytes(digest[0:4], "big") / 2**32
    sat_unit = int.from_bytes(digest[4:8], "big") / 2**32
    val_unit = int.from_bytes(digest[8:12], "big") / 2**32
    saturation = _SATURATION_RANGE[0] + sat_unit * (_SATURATION_RANGE[1] - _SATURATION_RANGE[0])
    value = _VALUE_RANGE[0] + val_unit * (_VALUE_RANGE[1] - _VALUE_RANGE[0])
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255))


def _name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def class_color(name: str) -> tuple[int, int, int]:
    """The colour of a class name: (r, g, b), each an int in [0, 255], deterministic."""
    return _color_from_key(_name_key(name))


def palette(class_names: Sequence[str]) -> np.ndarray:
    """Colours of a vocabulary's classes, pairwise different.

    Each class gets ``class_color(name)``. When that colour is already taken by an earlier
    class of the list (a hash collision, or two names equal up to case), the later class is
    given the colour of ``"<name>#1"``, ``"<name>#2"``, ... until it is free, so the result
    depends only on the list.

    Args:
        class_names: C class names, in vocabulary order.

    Returns:
        (C, 3) uint8 RGB colours; row i is the colour of ``class_names[i]``.
    """
    if isinstance(class_names, str):
        # a bare string would otherwise be read as one class per character
        class_names = [class_names]
    taken: set[tuple[int, int, int]] = set()
    colors: list[tuple[int, int, int]] = []
    for name in class_names:
        key = _name_key(name)
        color = _color_from_key(key)
        attempt = 0
        while color in taken:
            attempt += 1
            color = _color_from_key(f"{key}#{attempt}")
        taken.add(color)
        colors.append(color)
    return np.asarray(colors, dtype=np.uint8).reshape(len(colors), 3)
