"""``model.precision`` (fp32 | fp16 | bf16): half-precision encoders on the tiny pipelines.

Random weights give flat class probabilities, so a tiny rounding difference can flip a pixel's
argmax: agreement is measured over blocky images (where the labels follow the blocks) and pooled
over two of them.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import ovseg
from ovseg.errors import ConfigError

DENSE = "tiny/dense_clip_tiny.yaml"
PROXY = "tiny/dense_clip_tiny_proxy.yaml"
TRIDENT = "tiny/trident_tiny.yaml"
VOCABULARY = "cat, dog, grass, sky, road"
# (config, overrides, least bf16 agreement with fp32). Measured on a CPU, pooled over the two
# images: maskclip 0.995, sclip 0.996, naclip 0.978, vanilla 0.997, proxy 0.997, trident 0.973
# (its SAM refinement spreads a flipped pixel over a component). fp16 on the same CPU: 0.997
# (naclip) to 0.9999 (maskclip), trident 0.997.
CASES = {
    "maskclip": (DENSE, ["model.dense_clip.mode", "maskclip"], 0.98),
    "sclip": (DENSE, ["model.dense_clip.mode", "sclip"], 0.98),
    "naclip": (DENSE, ["model.dense_clip.mode", "naclip"], 0.95),
    "vanilla": (DENSE, ["model.dense_clip.mode", "vanilla"], 0.98),
    "proxy": (PROXY, [], 0.98),
    "trident": (TRIDENT, [], 0.95),
}


def blocky_image(seed: int, height: int = 96, width: int = 128, side: int = 32) -> np.ndarray:
    """(H, W, 3) uint8: squares of random colours with a little noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(-(-height // side), -(-width // side), 3))
    image = colours.repeat(side, axis=0).repeat(side, axis=1)[:height, :width]
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


IMAGES = [blocky_image(0), blocky_image(1)]


def build(config: str, *overrides: str):
    return ovseg.build_model(ovseg.get_config(config, list(overrides)))


@functools.cache
def labels(config: str, overrides: tuple[str, ...], precision: str, device: str) -> np.ndarray:
    """(len(IMAGES), H, W) labels of ``IMAGES``; cached, so fp32 runs once per case."""
    model = build(config, *overrides, "model.device", device, "model.precision", precision)
    return np.stack([model.predict(image, VOCABULARY).labels for image in IMAGES])


def agreement(config: str, overrides: list[str], precision: str, device: str = "cpu") -> float:
    """Fraction of pixels, over ``IMAGES``, where ``precision`` gives fp32's label."""
    reference = labels(config, tuple(overrides), "fp32", device)
    return float((labels(config, tuple(overrides), precision, device) == reference).mean())


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {parameter.dtype for parameter in module.parameters()}


@pytest.mark.parametrize("config", [DENSE, PROXY])
def test_fp32_is_the_default_and_changes_nothing(config):
    assert ovseg.get_config(config).model.precision == "fp32"
    image = IMAGES[0]
    default = build(config).predict(image, VOCABULARY)
    fp32 = build(config, "model.precision", "fp32").predict(image, VOCABULARY)
    np.testing.assert_array_equal(fp32.labels, default.labels)
    assert torch.equal(fp32.scores, default.scores)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_cpu_agrees_with_fp32(case):
    config, overrides, least = CASES[case]
    assert agreement(config, overrides, "bf16") >= least


def test_fp16_on_cpu_agrees_with_fp32():
    # fp16 runs on a CPU with the pinned torch (about as fast as fp32 there); measured 0.9992
    # (proxy) and 0.9968 (trident)
    assert agreement(PROXY, [], "fp16") >= 0.99
    assert agreement(TRIDENT, [], "fp16") >= 0.99


def test_bf16_casts_the_image_encoders_only():
    model = build(TRIDENT, "model.precision", "bf16")
    clip, sam = model.clip.model, model.sam.sam
    assert dtypes(clip.visual) == {torch.bfloat16}
    assert dtypes(model.dino) == {torch.bfloat16}
    assert dtypes(sam.image_encoder) == {torch.bfloat16}
    # as in the references: SAM's prompt encoder and mask decoder stay fp32; CLIP's text tower
    # too, so text classifiers (and their disk cache) do not depend on the precision
    assert dtypes(sam.prompt_encoder) == dtypes(sam.mask_decoder) == {torch.float32}
    assert dtypes(clip.transformer) == dtypes(clip.token_embedding) == {torch.float32}
    assert model.clip.mean.dtype == model.dino.mean.dtype == sam.pixel_mean.dtype == torch.float32

    decoded: list[torch.dtype] = []
    sam.mask_decoder.register_forward_pre_hook(
        lambda _, args, kwargs: decoded.append(kwargs["image_embeddings"].dtype),
        with_kwargs=True,
    )
    result = model.predict(IMAGES[0], VOCABULARY)
    assert decoded and set(decoded) == {torch.float32}  # the refinement ran, in fp32
    assert result.scores.dtype == torch.float32


def test_clip_encode_image_casts_its_input():
    model = build(DENSE, "model.precision", "bf16")
    side = model.clip.model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    embedding = model.clip.encode_image(torch.zeros(1, 3, side, side))
    assert embedding.dtype == torch.bfloat16 and embedding.shape == (1, model.clip.embed_dim)


@pytest.mark.parametrize("value", ["fp64", "half", "FP16"])
def test_an_unknown_precision_is_a_one_line_config_error(value):
    cfg = ovseg.get_config(DENSE, ["model.precision", value])
    with pytest.raises(ConfigError) as error:
        ovseg.build_model(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert "model.precision" in message and repr(value) in message
    assert all(allowed in message for allowed in ("fp32", "fp16", "bf16"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_fp16_on_gpu_agrees_with_fp32(case):
    config, overrides, _ = CASES[case]
    assert agreement(config, overrides, "fp16", device="cuda") >= 0.99
