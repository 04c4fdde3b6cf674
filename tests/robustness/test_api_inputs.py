"""The Python API's image inputs: every accepted form gives the uint8 RGB result, every other
form is one clear ValueError line (issue 23, "The Python API's inputs")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.data.image_io import as_rgb_image

RGB = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml"))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (RGB, RGB),
        (RGB.transpose(2, 0, 1), RGB),  # channel-first
        (torch.from_numpy(RGB), RGB),
        (torch.from_numpy(RGB).permute(2, 0, 1), RGB),
        (np.dstack([RGB, np.full((20, 30), 7, np.uint8)]), RGB),  # RGBA: alpha dropped
        (RGB[:, :, 0], np.repeat(RGB[:, :, :1], 3, axis=2)),  # gray
        (RGB[:, :, :1], np.repeat(RGB[:, :, :1], 3, axis=2)),  # (H, W, 1)
        (Image.fromarray(RGB), RGB),
        (Image.fromarray(RGB[:, :, 0]), np.repeat(RGB[:, :, :1], 3, axis=2)),
    ],
    ids=["rgb", "chw", "tensor", "tensor-chw", "rgba", "gray", "hw1", "pil", "pil-gray"],
)
def test_accepted_forms_become_the_rgb_array(given, expected):
    out = as_rgb_image(given)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert np.array_equal(out, expected)


def test_a_path_is_read(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    assert np.array_equal(as_rgb_image(path), RGB)
    assert np.array_equal(as_rgb_image(str(path)), RGB)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (RGB / 255.0, "float images are not accepted"),
        (RGB.astype(np.float32), "float images are not accepted"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN/Inf"),
        (np.full((4, 4, 3), np.inf), "NaN/Inf"),
        (RGB.astype(np.uint16) * 257, "16-bit"),
        (RGB.astype(np.int64), "uint8"),
        (torch.rand(3, 8, 8), "float images are not accepted"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((6, 6, 5), np.uint8), "expected (H, W, 3)"),
        (np.zeros((2, 4, 4, 3), np.uint8), "expected (H, W, 3)"),
        ([[1, 2, 3]], "got list"),
        (None, "got NoneType"),
    ],
    ids=["float01", "float255", "nan", "inf", "uint16", "int64", "tensor-float", "empty",
         "5-channels", "batch", "list", "none"],
)
def test_other_forms_are_one_line_value_errors(given, message):
    with pytest.raises(ValueError) as info:
        as_rgb_image(given, "DenseClip")
    text = str(info.value)
    assert message in text and "DenseClip" in text and "\n" not in text


def test_a_missing_path_names_the_file(tmp_path):
    with pytest.raises(OSError, match="missing.png"):
        as_rgb_image(tmp_path / "missing.png")


def test_predict_takes_every_accepted_form_alike(model, tmp_path):
    reference = model.predict(RGB, "cat, dog").labels
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    for given in (RGB.transpose(2, 0, 1), torch.from_numpy(RGB), Image.fromarray(RGB), path):
        assert np.array_equal(model.predict(given, "cat, dog").labels, reference)
    with pytest.raises(ValueError, match="DenseClip got a float64 image"):
        model.predict(RGB / 255.0, "cat, dog")
