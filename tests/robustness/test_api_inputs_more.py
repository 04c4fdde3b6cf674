"""More of the Python API's image inputs (issue 23): strided views, bool, PIL modes, empty
images, odd dtypes, bad paths, and 1-pixel and 1x4000 images through every 2D method's
``predict``; each accepted form gives the right uint8 RGB image, each other one a one-line
error naming the method (or, for a path, the file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.data.image_io import as_rgb_image
from ovseg.errors import ImageReadError

RGB = np.random.default_rng(1).integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
GRAY = RGB[:, :, 0]
MASK = GRAY > 127


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _read_only(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False
    return array


def _pil(mode: str) -> Image.Image:
    return Image.fromarray(RGB).convert(mode)


def _pil_with_transparency() -> Image.Image:
    image = Image.fromarray(RGB).convert("P")
    image.info["transparency"] = 0
    return image


# --------------------------------------------------------------------------- accepted forms

ACCEPTED = {
    # numpy layouts: every view gives the same pixels as its contiguous copy
    "flipped-view": (RGB[:, ::-1], RGB[:, ::-1].copy()),
    "upside-down-view": (RGB[::-1], RGB[::-1].copy()),
    "strided-crop": (RGB[1::2, 2::3], RGB[1::2, 2::3].copy()),
    "bgr-to-rgb-view": (RGB[:, :, ::-1], RGB[:, :, ::-1].copy()),
    "fortran-order": (np.asfortranarray(RGB), RGB),
    "read-only": (_read_only(RGB), RGB),
    "chw-flipped-view": (RGB.transpose(2, 0, 1)[:, :, ::-1], RGB[:, ::-1].copy()),
    # bool: 0 / 255, as PIL reads a bilevel image
    "bool-gray": (MASK, _gray3(MASK.astype(np.uint8) * 255)),
    "bool-rgb": (RGB > 127, (RGB > 127).astype(np.uint8) * 255),
    "torch-bool": (torch.from_numpy(MASK), _gray3(MASK.astype(np.uint8) * 255)),
    "torch-strided": (torch.from_numpy(RGB)[::2, 1::2], RGB[::2, 1::2].copy()),
    "torch-requires-grad-free": (torch.from_numpy(RGB).clone(), RGB),
    # sizes
    "one-pixel": (RGB[:1, :1], RGB[:1, :1].copy()),
    "one-pixel-gray": (GRAY[:1, :1], _gray3(GRAY[:1, :1])),
    "one-row": (RGB[:1], RGB[:1].copy()),
    "one-column": (RGB[:, :1], RGB[:, :1].copy()),
    # PIL modes (read_image's conversions)
    "pil-1": (Image.fromarray(MASK), _gray3(MASK.astype(np.uint8) * 255)),
    "pil-L": (_pil("L"), _gray3(np.asarray(_pil("L")))),
    "pil-LA": (_pil("LA"), _gray3(np.asarray(_pil("L")))),
    "pil-P": (_pil("P"), np.asarray(_pil("P").convert("RGB"))),
    "pil-P-transparency": (_pil_with_transparency(), np.asarray(_pil("P").convert("RGB"))),
    "pil-RGBA": (Image.fromarray(np.dstack([RGB, GRAY])), RGB),
    "pil-CMYK": (_pil("CMYK"), np.asarray(_pil("CMYK").convert("RGB"))),
    "pil-YCbCr": (_pil("YCbCr"), np.asarray(_pil("YCbCr").convert("RGB"))),
    "pil-I;16": (Image.fromarray(GRAY.astype(np.uint16) * 257), _gray3(GRAY)),
    "pil-F-unit-range": (Image.fromarray(GRAY.astype(np.float32) / 255), _gray3(GRAY)),
}


@pytest.mark.parametrize(("given", "expected"), list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_accepted_form_gives_the_rgb_image(given, expected) -> None:
    out = as_rgb_image(given)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)


def test_a_path_as_str_and_as_path(tmp_path) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    np.testing.assert_array_equal(as_rgb_image(path), RGB)
    np.testing.assert_array_equal(as_rgb_image(str(path)), RGB)


# --------------------------------------------------------------------------- refused forms

REFUSED = {
    "empty-0x0x3": (np.zeros((0, 0, 3), np.uint8), "empty"),
    "empty-0x0": (np.zeros((0, 0), np.uint8), "empty"),
    "empty-0x5-bool": (np.zeros((0, 5), bool), "empty"),
    "empty-torch": (torch.zeros(0, 0, 3, dtype=torch.uint8), "empty"),
    "empty-pil": (Image.new("RGB", (0, 0)), "empty"),
    "float16": (RGB.astype(np.float16), "float images are not accepted"),
    "float-0-1-with-nan": (np.where(RGB > 250, np.nan, RGB / 255.0), "NaN/Inf"),
    "float-minus-inf": (np.full((3, 3), -np.inf), "NaN/Inf"),
    "torch-bfloat16": (torch.zeros(4, 4, 3, dtype=torch.bfloat16), "float images"),
    "torch-float-chw": (torch.rand(3, 5, 5), "float images"),
    "int16": (RGB.astype(np.int16), "16-bit"),
    "uint16-gray": (GRAY.astype(np.uint16) * 257, "16-bit"),
    "int8": (RGB.astype(np.int8), "uint8"),
    "uint32": (RGB.astype(np.uint32), "uint8"),
    "complex": (RGB.astype(np.complex64), "uint8"),
    "object": (RGB.astype(object), "uint8"),
    "two-channels": (RGB[:, :, :2], "expected (H, W, 3)"),
    "1-d": (RGB.ravel(), "expected (H, W, 3)"),
    "0-d": (np.uint8(7), "got uint8"),
    "bytes": (b"\x89PNG", "got bytes"),
    "nested-list": (RGB.tolist(), "got list"),
    "pil-La": (Image.new("La", (3, 2)), "PIL La image"),
}


@pytest.mark.parametrize(("given", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_refused_form_is_one_value_error_line(given, message: str) -> None:
    with pytest.raises(ValueError) as info:
        as_rgb_image(given, "Trident")
    text = str(info.value)
    assert message in text and "Trident" in text and "\n" not in text


@pytest.mark.parametrize("kind", ["missing", "directory", "not-an-image", "empty-file",
                                  "truncated-png"])
def test_a_bad_path_is_an_image_read_error_naming_it(tmp_path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-an-image":
        path.write_text("cat, dog\n")
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "truncated-png":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
            path)
        path.write_bytes(path.read_bytes()[:300])
    for given in (path, str(path)):
        with pytest.raises(ImageReadError) as info:
            as_rgb_image(given)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, OSError)


# --------------------------------------------------------------------------- every method

TINY_2D = ["dense_clip_tiny", "trident_tiny", "clip_dinoiser_tiny", "mask_adapted_tiny",
           "cloc_tiny"]
METHOD_NAMES = {"dense_clip_tiny": "DenseClip", "trident_tiny": "Trident",
                "clip_dinoiser_tiny": "ClipDinoiser", "mask_adapted_tiny": "MaskAdapted",
                "cloc_tiny": "Cloc"}
VOCABULARY = "cat, dog, sky"


@pytest.fixture(scope="module", params=TINY_2D)
def tiny_model(request):
    cfg = ovseg.get_config(f"tiny/{request.param}.yaml", ["model.device", "cpu"])
    return request.param, ovseg.build_model(cfg)


# 1 x 4000 with a 2048 bound on the long side resizes to 1 x 2048, thinner than a ViT patch:
# the methods stretch it to a patch (rescale_size's min_side) instead of failing
SHAPES = [
    pytest.param((1, 1, 3), id="1x1"),
    pytest.param((1, 2, 3), id="1x2"),
    pytest.param((1, 4000, 3), id="1x4000"),
    pytest.param((4000, 1, 3), id="4000x1", marks=pytest.mark.slow),
    pytest.param((2, 3000), id="2x3000-gray", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_and_extreme_images_get_a_full_label_map(tiny_model, shape) -> None:
    _, model = tiny_model
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    prediction = model.predict(image, VOCABULARY)
    assert prediction.labels.shape == shape[:2]
    assert prediction.labels.min() >= 0 and prediction.labels.max() < 3


def test_every_method_checks_its_input_alike(tiny_model, tmp_path) -> None:
    config, model = tiny_model
    image = np.random.default_rng(2).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    reference = model.predict(image, VOCABULARY).labels
    flipped = image[:, ::-1]
    np.testing.assert_array_equal(model.predict(flipped, VOCABULARY).labels,
                                  model.predict(flipped.copy(), VOCABULARY).labels)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    np.testing.assert_array_equal(model.predict(path, VOCABULARY).labels, reference)
    np.testing.assert_array_equal(model.predict(Image.open(path), VOCABULARY).labels, reference)
    for bad, message in ((image / 255.0, "float images"), (image.astype(np.uint16), "16-bit"),
                         (np.zeros((0, 0, 3), np.uint8), "empty")):
        with pytest.raises(ValueError, match=message) as info:
            model.predict(bad, VOCABULARY)
        assert METHOD_NAMES[config] in str(info.value)
