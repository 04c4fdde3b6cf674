"""Image reading: any file PIL decodes becomes an upright (H, W, 3) uint8 RGB array.

Conversions, so that every method sees the same kind of input:
- EXIF orientation is applied, so a phone photo comes back the way it is displayed;
- grayscale (``1``, ``L``, ``P`` with a gray palette, ...) is repeated into three channels;
- alpha is dropped (``RGBA``/``LA``/``PA`` -> their colour channels, not composited), because
  the stored colours are the scene; compositing on a background would invent colours;
- 16-bit integer data (``I;16*``, and ``I``, which PIL uses for 16-bit PGM/PNG/TIFF) is scaled
  to 8 bit by /257 (65535 -> 255), not clipped; ``I`` values outside [0, 65535] are clipped;
- float data (``F``) in [0, 1] is scaled by 255, other ranges are stretched min-max;
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and palettes are converted by PIL.

Every failure (missing, unreadable, truncated, not an image) is an ``ImageReadError`` whose
message names the file.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ovseg.errors import ImageReadError

# what a directory input lists; a file named explicitly is read whatever its extension
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# the largest image predict takes by default (model.max_image_pixels): PIL's own
# decompression-bomb limit, so that a file and the same image as an array meet one rule
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485


def _reason(error: BaseException) -> str:
    """A short, path-free description of why PIL could not read a file."""
    if isinstance(error, FileNotFoundError):
        return "the file does not exist"
    if isinstance(error, IsADirectoryError):
        return "it is a directory, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):
        return "not an image, or a format PIL does not know"
    text = str(error).strip() or type(error).__name__
    # one line: the command lines print errors as a single line
    return " ".join(text.split())


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """(H, W) integer data in [0, 65535] -> (H, W) uint8, rounded /257."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide + 128) // 257).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """(H, W) float data -> (H, W) uint8: [0, 1] scaled by 255, other ranges min-max."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.rint(values * 255.0).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        gray = _sixteen_bit_to_uint8(np.asarray(img))
    elif mode == "F":
        gray = _float_to_uint8(np.asarray(img))
    else:
        if mode == "RGB":
            rgb = img
        elif mode == "PA" or (mode == "P" and "transparency" in img.info):
            # via RGBA: older PIL versions warn when a palette with transparency goes
            # straight to RGB
            rgb = img.convert("RGBA").convert("RGB")
        elif mode == "LA":
            rgb = img.convert("L").convert("RGB")
        else:
            rgb = img.convert("RGB")
        array = np.asarray(rgb, dtype=np.uint8)
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as it is displayed: EXIF-rotated, RGB, 8 bit.

    Args:
        path: any file PIL can decode (JPEG, PNG, BMP, TIFF, WebP, GIF (first frame), ...).

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous; see the module docstring for the conversions.

    Raises:
        ImageReadError: "cannot read image <path>: <reason>" when the file is missing, not
            an image, corrupt or truncated, or in a mode that cannot be converted to RGB.
    """
    try:
        with Image.open(path) as img:
            # PIL decodes lazily: force it here so truncated or corrupt data fails inside
            # this try and not later, far from the file name
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except ImageReadError:
        raise
    except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, ...)
        raise ImageReadError(f"cannot read image {path}: {_reason(error)}") from error


def as_rgb_image(
    image, who: str = "predict", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """What every method's ``encode``/``predict`` accepts, as an (H, W, 3) uint8 RGB array.

    Accepted and converted:
    - an (H, W, 3) uint8 numpy array: returned as it is (RGB order assumed), or a C-contiguous
      copy when it is a strided view (``image[:, ::-1]``, a crop);
    - (H, W) or (H, W, 1) uint8 gray: repeated into three channels;
    - (H, W, 4) uint8 RGBA: alpha dropped (the stored colours are the scene);
    - (3, H, W) / (4, H, W) / (1, H, W) uint8 channel-first arrays: moved to channel-last;
    - bool arrays of those shapes: False -> 0, True -> 255, as PIL reads a bilevel image;
    - a torch tensor of any of those shapes (uint8 or bool): taken to the CPU as numpy;
    - a PIL image of any mode: converted to RGB (:func:`read_image`'s conversions);
    - a path (str or os.PathLike): read with :func:`read_image` (a missing file, a folder or
      a file that is no image: ``ImageReadError``, an ``OSError``, naming the file).

    Refused with one ``ValueError`` line naming ``who``: float images (convert them yourself:
    ``np.rint(image * 255).astype(np.uint8)`` for [0, 1] data; the range of a float image cannot
    be told from its values), NaN/Inf, other integer types (e.g. 16-bit), empty images and any
    other shape or type; images of more than ``max_pixels`` pixels (0 = no limit), with the
    key that raises the limit.
    """
    return _as_rgb(image, who, max_pixels)


def _check_size(height: int, width: int, who: str, max_pixels: int) -> None:
    """Refuse more than ``max_pixels`` before any conversion allocates an image's size."""
    if max_pixels and height * width > max_pixels:
        raise ValueError(
            f"{who} got a {height}x{width} image ({height * width / 1e6:.0f} megapixels), more "
            f"than model.max_image_pixels ({max_pixels / 1e6:.0f} megapixels); downscale it or "
            "raise model.max_image_pixels (0 = no limit)"
        )


def _as_rgb(image, who: str, max_pixels: int) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)  # PIL refuses a decompression bomb before decoding it
        _check_size(*image.shape[:2], who, max_pixels)
        return image
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, who, max_pixels)
        return _check_not_empty(_pil_to_rgb(image, who), f"{who} got a PIL {image.mode} image")
    if type(image).__module__.startswith("torch"):
        if image.is_floating_point():
            image = image.float()  # numpy has no bfloat16: refused below as any float image
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{who} expects an (H, W, 3) uint8 RGB image (numpy array, torch "
                         f"tensor, PIL image or file path), got {type(image).__name__}")
    where = f"{who} got a {image.dtype} image of shape {image.shape}"
    if np.issubdtype(image.dtype, np.floating):
        bad = "NaN/Inf values; " if not np.isfinite(image).all() else ""
        raise ValueError(f"{where}: {bad}float images are not accepted, give uint8 0-255 RGB "
                         "(e.g. np.rint(image * 255).astype(np.uint8) for [0, 1] data)")
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * np.uint8(255)
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: give uint8 0-255 RGB (16-bit and other integer images "
                         "have no single 8-bit reading; convert them first)")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # channel-first
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim in (2, 3):
        _check_size(image.shape[0], image.shape[1], who, max_pixels)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected (H, W, 3) RGB, (H, W) gray, (H, W, 4) RGBA or "
                         "(3, H, W)")
    return _check_not_empty(np.ascontiguousarray(image), where)


def _pil_to_rgb(image: Image.Image, who: str) -> np.ndarray:
    try:
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    except Exception as error:  # a mode PIL cannot convert to RGB (e.g. "La")
        raise ValueError(f"{who} got a PIL {image.mode} image of size {image.size}: "
                         f"{_reason(error)}; convert it to RGB first") from error


def _check_not_empty(image: np.ndarray, where: str) -> np.ndarray:
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: the image is empty")
    return image


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _has_glob_chars(text: str) -> bool:
    return any(char in text for char in "*?[")


def list_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand inputs into image files, in the order given, each file once.

    Each input is one of:
    - an existing file: taken as is, whatever its extension (``read_image`` judges it);
    - an existing directory: its files with an image extension (``IMAGE_EXTENSIONS``, any
      case), sorted by name, not recursive;
    - a glob pattern (``photos/*.jpg``, ``**`` recurses): the matching files with an image
      extension, sorted; matching directories are not entered.

    Returns:
        the image paths; a file reached by two inputs is listed once, at its first place.

    Raises:
        ImageReadError: an input matches no image file; the message names the input.
    """
    if isinstance(inputs, str | os.PathLike):
        # one path string would otherwise be read as one input per character
        inputs = [inputs]
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        text = os.path.expanduser(os.fspath(raw))
        candidate = Path(text)
        if candidate.is_file():
            matches = [candidate]
        elif candidate.is_dir():
            matches = sorted(p for p in candidate.iterdir() if _is_image_file(p))
            if not matches:
                extensions = " ".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
                raise ImageReadError(
                    f"input directory {raw} has no image files (looked for: {extensions})"
                )
        elif _has_glob_chars(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in matches if _is_image_file(p)]
            if not matches:
                raise ImageReadError(f"input pattern {raw} matches no image files")
        else:
            raise ImageReadError(f"input {raw} does not exist; give a file, directory or glob")
        for path in matches:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    if not found:
        raise ImageReadError("no input images given")
    return found
