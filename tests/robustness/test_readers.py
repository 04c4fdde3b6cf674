"""Image and label files that are corrupt, truncated, empty, of the wrong kind or hold labels out
of range: each is one DatasetError / ImageReadError line naming the file (issue 23,
reliability)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovseg.data.catalog import SemSegDataset, get_benchmark
from ovseg.data.image_io import read_image
from ovseg.data.readers import read_label
from ovseg.errors import DatasetError, ImageReadError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 5, (24, 32), dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _damaged_png(array: np.ndarray) -> bytes:
    data = bytearray(_encoded(array, "PNG"))
    start = data.find(b"IDAT") + 20  # inside the compressed pixel data
    data[start : start + 40] = bytes(40)
    return bytes(data)


def _write(path: Path, make) -> Path:
    """``make`` gives the file's bytes, or writes ``path`` itself and gives None."""
    data = make(path)
    if data is not None:
        path.write_bytes(data)
    return path


def _palette_png(path: Path) -> None:
    image = Image.fromarray(np.full((4, 4), 200, np.uint8), mode="P")
    image.putpalette([0] * 768)
    image.save(path)


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(path)


def _uint16_png(path: Path) -> None:
    assert cv2.imwrite(str(path), np.full((4, 4), 300, np.uint16))


@pytest.mark.parametrize(
    ("name", "make", "mapping", "expected"),
    [
        ("cut.png", lambda p: _encoded(LABELS, "PNG")[:60], "none", "image file is truncated"),
        ("empty.png", lambda p: b"", "none", "is empty (0 bytes)"),
        ("text.png", lambda p: b"labels as text\n", "none", "cannot read label file"),
        ("damaged.png", lambda p: _damaged_png(LABELS), "none", "cannot read label file"),
        ("folder.png", lambda p: p.mkdir(), "none", "is a folder, not a file"),
        ("missing.png", lambda p: None, "none", "does not exist"),
        ("colour.png", lambda p: _encoded(RGB, "PNG"), "none", "is a RGB image"),
        ("float.tif", _float_tiff, "none", "is a F image"),
        ("wide.png", _uint16_png, "none", "holds value(s) 300 outside the 150 classes"),
        ("shifted.png", lambda p: _encoded(np.full((4, 4), 151, np.uint8), "PNG"),
         "reduce_zero_label", "150 (after the reduce_zero_label mapping) outside"),
        ("palette.png", _palette_png, "none", "holds value(s) 200 outside the 150 classes"),
    ],
    ids=["label-truncated", "label-empty", "label-text", "label-damaged-data", "label-folder",
         "label-missing", "label-rgb", "label-float-nan", "label-out-of-range",
         "label-out-of-range-after-mapping", "label-palette-out-of-range"],
)
def test_a_bad_label_file_is_one_line_naming_it(tmp_path, name, make, mapping, expected):
    path = tmp_path / name
    if name != "missing.png":
        _write(path, make)
    with pytest.raises(DatasetError) as info:
        read_label(path, mapping, 255, 150)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("cut.jpg", lambda p: _encoded(RGB, "JPEG")[:300], "Truncated"),
        ("cut.png", lambda p: _encoded(RGB, "PNG")[:100], "truncated"),
        ("empty.jpg", lambda p: b"", "not an image"),
        ("text.jpg", lambda p: b"a photo, honestly\n", "not an image"),
        ("damaged.png", lambda p: _damaged_png(RGB), "cannot read image"),
        ("folder.jpg", lambda p: p.mkdir(), "it is a directory"),
    ],
    ids=["image-truncated-jpeg", "image-truncated-png", "image-empty", "image-text",
         "image-damaged-data", "image-folder"],
)
def test_a_bad_image_file_is_one_line_naming_it(tmp_path, name, make, expected):
    path = _write(tmp_path / name, make)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_an_image_and_label_of_different_sizes(tmp_path):
    image, label = tmp_path / "a.jpg", tmp_path / "a.png"
    image.write_bytes(_encoded(RGB, "JPEG"))
    label.write_bytes(_encoded(LABELS[:10], "PNG"))
    dataset = SemSegDataset(get_benchmark("ade20k_150"), [(image, label)])
    with pytest.raises(DatasetError, match="the files do not belong together") as info:
        dataset[0]
    assert str(image) in str(info.value) and str(label) in str(info.value)


def test_a_bad_file_read_in_a_loader_worker_is_still_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from ovseg.engine.trainer import _next_batch

    image, label = tmp_path / "a.jpg", tmp_path / "a.png"
    image.write_bytes(_encoded(RGB, "JPEG"))
    label.write_bytes(b"")
    dataset = SemSegDataset(get_benchmark("ade20k_150"), [(image, label)])
    batches = iter(DataLoader(dataset, num_workers=1, collate_fn=lambda samples: samples))
    with pytest.raises(DatasetError) as info:
        _next_batch(batches)
    assert str(info.value) == f"label file {label} is empty (0 bytes); write it again"
