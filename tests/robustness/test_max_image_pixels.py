"""Very large inputs: every 2D method refuses an image above ``model.max_image_pixels`` with one
line naming the key (issue 23, "very large images: bounded memory or a clear refusal")."""

from __future__ import annotations

import numpy as np
import pytest

import ovseg
from ovseg.config.schema import ModelConfig
from ovseg.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, as_rgb_image
from ovseg.errors import ConfigError
from ovseg.methods import METHODS

TINY_2D = {
    "dense_clip": "tiny/dense_clip_tiny.yaml",
    "trident": "tiny/trident_tiny.yaml",
    "clip_dinoiser": "tiny/clip_dinoiser_tiny.yaml",
    "mask_adapted": "tiny/mask_adapted_tiny.yaml",
    "cloc": "tiny/cloc_tiny.yaml",
}
LIMIT = 40 * 40


def test_the_default_limit_is_pils_decompression_bomb_limit():
    from PIL import Image

    assert ModelConfig.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    assert 12000 * 12000 < DEFAULT_MAX_IMAGE_PIXELS < 14000 * 14000


def test_every_2d_method_has_a_tiny_config_here():
    assert set(TINY_2D) | {"linear_probe", "clip2scene"} == set(METHODS)


@pytest.mark.parametrize("method", sorted(TINY_2D))
def test_each_2d_method_refuses_an_image_above_the_limit(method):
    cfg = ovseg.get_config(TINY_2D[method], {"model.max_image_pixels": LIMIT})
    model = ovseg.build_model(cfg)
    assert model.max_image_pixels == LIMIT
    over = np.zeros((41, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=r"41x40 image .*model\.max_image_pixels") as error:
        model.predict(over, "cat, dog")
    assert "\n" not in str(error.value)
    # at the limit: a label for every pixel
    assert model.predict(np.zeros((40, 40, 3), np.uint8), "cat, dog").labels.shape == (40, 40)


def test_zero_means_no_limit_and_negative_is_a_config_error():
    image = np.zeros((50, 60, 3), np.uint8)
    assert as_rgb_image(image, "predict", 0) is image  # no copy of an accepted array
    with pytest.raises(ValueError, match="3000 megapixels"):
        as_rgb_image(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (50_000, 60_000, 3)),
                     "predict", 10**9)
    with pytest.raises(ConfigError, match="model.max_image_pixels"):
        ovseg.get_config("tiny/dense_clip_tiny.yaml", ["model.max_image_pixels", "-1"])
