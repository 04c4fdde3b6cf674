"""Tests of image reading (modes, EXIF orientation, failures) and input listing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.data.image_io import list_images, read_image
from ovseg.errors import ImageReadError, OvsegError

EXIF_ORIENTATION = 0x0112


def _quadrant_image(height: int = 32, width: int = 48) -> np.ndarray:
    """(H, W, 3) uint8: red top-left quadrant, black elsewhere; asymmetric under rotation."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    return image


def _noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    # noise does not compress, so cutting the file in half really truncates pixel data
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("orientation", "rotate"),
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, rotate) -> None:
    stored = _quadrant_image()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    image = read_image(path)
    expected = rotate(stored)
    assert image.shape == expected.shape
    assert image.dtype == np.uint8
    # JPEG is lossy: compare the quadrant centres only
    h, w = expected.shape[:2]
    for y in (h // 4, 3 * h // 4):
        for x in (w // 4, 3 * w // 4):
            assert np.abs(image[y, x].astype(int) - expected[y, x].astype(int)).max() < 16


def test_rgb_png_is_exact(tmp_path: Path) -> None:
    rgb = _noise_rgb(7, 9)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == np.uint8 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_bilevel_image(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[0], [[0, 0, 0], [255] * 3])


def test_rgba_drops_alpha_keeping_colours(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image, rgba[:, :, :3])


def test_gray_with_alpha(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[50, 0], [90, 255]]], dtype=np.uint8), mode="LA").save(
        tmp_path / "la.png"
    )
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0], [[50] * 3, [90] * 3])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16-bit on disk
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_sixteen_bit_pgm(tmp_path: Path) -> None:
    # PIL opens 16-bit PGM in mode "I"
    values = np.array([0, 257, 65535], dtype=">u2")
    (tmp_path / "deep.pgm").write_bytes(b"P5\n3 1\n65535\n" + values.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "deep.pgm")[0, :, 1], [0, 1, 255])


def test_float_tiff(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_palette_png(tmp_path: Path) -> None:
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    colours = [(255, 0, 0), (0, 128, 0), (10, 20, 250)]
    palette_image.putpalette([c for rgb in colours for c in rgb] + [0] * (768 - 9))
    palette_image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(image, np.array(colours, dtype=np.uint8)[indices])


def test_palette_with_transparency(tmp_path: Path) -> None:
    indices = np.array([[0, 1]], dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([9, 8, 7, 1, 2, 3] + [0] * 762)
    palette_image.save(tmp_path / "t.png", transparency=0)
    with warnings.catch_warnings():
        # older PIL versions warn when a palette with transparency goes straight to RGB
        warnings.simplefilter("error")
        image = read_image(tmp_path / "t.png")
    np.testing.assert_array_equal(image[0], [[9, 8, 7], [1, 2, 3]])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.fromarray(_quadrant_image()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    image = read_image(tmp_path / "c.jpg")
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    assert image[4, 4, 0] > 200 and image[4, 4, 1] < 50


def test_corrupt_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken\.jpg: ") as info:
        read_image(path)
    assert isinstance(info.value, OvsegError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(_noise_rgb(64, 64)).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=rf"cannot read image .*cut\{suffix}: "):
        read_image(cut)


def test_missing_file_and_directory_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_text_file_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(tmp_path / "notes.png")


# ---------------------------------------------------------------------------- list_images


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    for name in ("b.png", "a.JPG", "c.webp", "d.tiff"):
        Image.fromarray(_quadrant_image(4, 4)).save(
            tmp_path / name, format="JPEG" if name.endswith("JPG") else None
        )
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_quadrant_image(4, 4)).save(tmp_path / "sub" / "e.png")
    return tmp_path


def test_list_directory_sorted_non_recursive(image_tree: Path) -> None:
    names = [p.name for p in list_images([str(image_tree)])]
    assert names == ["a.JPG", "b.png", "c.webp", "d.tiff"]


def test_list_file_glob_and_order(image_tree: Path) -> None:
    found = list_images(
        [str(image_tree / "readme.txt"), str(image_tree / "*.png"), str(image_tree / "sub")]
    )
    # an explicit file is taken whatever its extension; read_image judges it later
    assert [p.name for p in found] == ["readme.txt", "b.png", "e.png"]


def test_list_recursive_glob_and_duplicates(image_tree: Path) -> None:
    found = list_images([str(image_tree / "**" / "*.png"), str(image_tree / "b.png")])
    assert sorted(p.name for p in found) == ["b.png", "e.png"]
    assert len(found) == 2  # b.png reached twice, listed once


def test_list_single_string_input(image_tree: Path) -> None:
    assert [p.name for p in list_images(str(image_tree / "b.png"))] == ["b.png"]


@pytest.mark.parametrize("pattern", ["*.gif", "nothing_here.png", "empty"])
def test_list_no_match_names_input(image_tree: Path, pattern: str) -> None:
    (image_tree / "empty").mkdir()
    with pytest.raises(ImageReadError, match=pattern.replace("*", r"\*")):
        list_images([str(image_tree / pattern)])


def test_list_glob_matching_only_non_images(image_tree: Path) -> None:
    with pytest.raises(ImageReadError, match="matches no image files"):
        list_images([str(image_tree / "*.txt")])
