"""Text in images (legend names, region labels): Unicode fonts found on the machine, drawn
with PIL, a fallback font per character.

cv2's Hershey fonts draw ASCII only, so class names like "café", "Straße" or "ёлка" need a
TrueType font. The fonts tried, in order:

1. the files in ``$OVSEG_FONT`` (paths separated by ``os.pathsep``), e.g. a CJK font;
2. DejaVu Sans (Latin, Greek, Cyrillic, and more): matplotlib's copy when matplotlib is
   installed, else the system's (Debian/Ubuntu ``fonts-dejavu-core``, Fedora, Arch), else
   Arial / Arial Unicode on macOS and Windows;
3. a CJK font when the system has one (Noto Sans CJK: Debian ``fonts-noto-cjk``; WenQuanYi;
   PingFang / Hiragino on macOS; Microsoft YaHei on Windows);
4. PIL's built-in font (ASCII only).

Each character is drawn with the first font that has a glyph for it; a character no font has
(e.g. Chinese on a machine without a CJK font) is drawn as "?", so the loss shows.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["FONT_ENV_VAR", "MISSING_GLYPH", "TextStyle", "draw_text", "font_files",
           "fonts_cover", "text_style"]

FONT_ENV_VAR = "OVSEG_FONT"
MISSING_GLYPH = "?"

# inside the matplotlib package
_MATPLOTLIB_DEJAVU = ("mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
_SYSTEM_FONTS = (
    # DejaVu Sans / Arial: Latin, Greek, Cyrillic
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
    # CJK
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
# a code point no font has a glyph for: its rendering is the font's "missing glyph" box
_NO_GLYPH = "\U0010fffd"
_PROBE_SIZE = 16


def _matplotlib_font() -> list[str]:
    # find_spec locates the package without importing matplotlib (slow, and not a dependency)
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [os.path.join(location, *_MATPLOTLIB_DEJAVU)
            for location in spec.submodule_search_locations]


@functools.lru_cache(maxsize=8)
def _font_files(env_value: str) -> tuple[str, ...]:
    """Existing font files in the order they are tried (``env_value``: ``$OVSEG_FONT``)."""
    candidates = [p for p in env_value.split(os.pathsep) if p]
    candidates += _matplotlib_font() + list(_SYSTEM_FONTS)
    found: list[str] = []
    for candidate in candidates:
        path = os.path.expanduser(candidate)
        if os.path.isfile(path) and path not in found:
            try:
                ImageFont.truetype(path, _PROBE_SIZE)
            except OSError:  # not a font FreeType reads: skip it rather than fail a drawing
                continue
            found.append(path)
    return tuple(found)


def font_files() -> tuple[str, ...]:
    """The TrueType font files text is drawn with, in the order they are tried."""
    return _font_files(os.environ.get(FONT_ENV_VAR, ""))


@functools.lru_cache(maxsize=65536)
def _has_glyph(path: str, char: str) -> bool:
    # FreeType draws a missing character as the font's .notdef box: compare with that box
    # (spaces draw nothing, as an empty .notdef does, so they never count as missing)
    if char.isspace():
        return True
    return _mask_key(path, char) != _mask_key(path, _NO_GLYPH)


@functools.lru_cache(maxsize=32)
def _probe_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _PROBE_SIZE)


def _mask_key(path: str, text: str) -> tuple[tuple[int, int], bytes]:
    mask = _probe_font(path).getmask(text)
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=64)
def _fonts(files: tuple[str, ...], size: int) -> tuple[ImageFont.ImageFont, ...]:
    fonts: list[ImageFont.ImageFont] = [ImageFont.truetype(path, size) for path in files]
    if not fonts:
        try:
            fonts.append(ImageFont.load_default(size=size))
        except (TypeError, ImportError, OSError):  # old PIL, or PIL without FreeType
            fonts.append(ImageFont.load_default())
    return tuple(fonts)


@dataclass(frozen=True)
class TextStyle:
    """The fonts of one pixel size; ``runs`` splits a text among them."""

    files: tuple[str, ...]
    size: int

    @property
    def fonts(self) -> tuple[ImageFont.ImageFont, ...]:
        return _fonts(self.files, self.size)

    def runs(self, text: str) -> list[tuple[ImageFont.ImageFont, str]]:
        """``text`` (NFC-normalised, control characters dropped) as (font, piece) pairs, each
        character with the first font that has it, or as ``MISSING_GLYPH`` in the first."""
        fonts = self.fonts
        pieces: list[tuple[int, str]] = []
        for char in unicodedata.normalize("NFC", text):
            if unicodedata.category(char) == "Cc":
                continue
            index = next((i for i, path in enumerate(self.files) if _has_glyph(path, char)), None)
            if index is None:
                # no font file has it, or there is none and PIL's own font draws ASCII only
                covered = not self.files and char.isascii()
                index, char = 0, (char if covered else MISSING_GLYPH)
            if pieces and pieces[-1][0] == index:
                pieces[-1] = (index, pieces[-1][1] + char)
            else:
                pieces.append((index, char))
        return [(fonts[index], piece) for index, piece in pieces]

    def width(self, text: str) -> int:
        """Width in pixels of ``text`` drawn by :meth:`draw`."""
        return int(np.ceil(sum(font.getlength(piece) for font, piece in self.runs(text))))

    @property
    def ascent_descent(self) -> tuple[int, int]:
        """Pixels above and below the baseline of the main font."""
        font = self.fonts[0]
        if isinstance(font, ImageFont.FreeTypeFont):
            return font.getmetrics()
        return self.size, 0

    def draw(self, draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str,
             color: Sequence[int]) -> None:
        """Draw ``text`` with its left end of the baseline at ``origin`` (x, y)."""
        x, y = float(origin[0]), float(origin[1])
        fill = tuple(int(c) for c in color)
        for font, piece in self.runs(text):
            if isinstance(font, ImageFont.FreeTypeFont):
                draw.text((x, y), piece, font=font, fill=fill, anchor="ls")
            else:  # a bitmap font has no baseline anchor: its top goes above the baseline
                draw.text((x, y - self.size), piece, font=font, fill=fill)
            x += font.getlength(piece)


def text_style(size: int) -> TextStyle:
    """The fonts of ``size`` pixels (em height) from :func:`font_files`."""
    return TextStyle(font_files(), max(1, int(size)))


def draw_text(
    image: np.ndarray,
    text: str,
    origin: tuple[int, int],
    color: Sequence[int],
    size: int = 14,
) -> np.ndarray:
    """``image`` with ``text`` drawn on it (any script the fonts cover, see the module doc).

    Args:
        image: (H, W, 3) uint8 RGB.
        text: one line.
        origin: (x, y) of the left end of the text's baseline, as ``cv2.putText``'s ``org``.
        color: (r, g, b) of the text.
        size: em height in pixels.

    Returns:
        (H, W, 3) uint8 RGB, a new array.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    text_style(size).draw(ImageDraw.Draw(canvas), origin, text, color)
    return np.asarray(canvas).copy()


def fonts_cover(text: str) -> bool:
    """Whether every character of ``text`` is drawn as itself (not ``MISSING_GLYPH``)."""
    files = font_files()
    text = unicodedata.normalize("NFC", text)
    if not files:
        return text.isascii()
    return all(any(_has_glyph(path, char) for path in files) for char in text
               if unicodedata.category(char) != "Cc")

