"""Encode once, ask many vocabularies; outputs bounded by construction (``Prediction``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovseg
from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.dino import DinoEncoder
from ovseg.encoders.sam import SamEncoder
from ovseg.methods.base import Prediction, label_dtype, labels_in_bands

CONFIGS = {
    "dense_clip": ("tiny/dense_clip_tiny.yaml", ()),
    "proxy": ("tiny/dense_clip_tiny_proxy.yaml", ()),
    "naclip_pamr_area": ("tiny/dense_clip_tiny.yaml", (
        "model.dense_clip.mode", "naclip", "model.pamr.steps", "3",
        "model.dense_clip.area_thd", "0.1", "model.dense_clip.prob_thd", "0.3",
        "model.dense_clip.renormalize", "true")),
    "trident": ("tiny/trident_tiny.yaml", ()),
    "trident_cityscapes": ("tiny/trident_tiny.yaml", ("model.trident.cityscapes_halves", "true")),
}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (70, 110, 3), dtype=np.uint8)


def count_image_forwards(monkeypatch) -> list[str]:
    """Every forward of a CLIP, DINO or SAM image encoder appends its name."""
    calls: list[str] = []
    for cls in (ClipEncoder, DinoEncoder, SamEncoder):
        original = cls.forward

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_second_vocabulary_runs_no_encoder_and_equals_a_fresh_predict(name, image,
                                                                      monkeypatch):
    path, overrides = CONFIGS[name]
    model = ovseg.build_model(ovseg.get_config(path, list(overrides)))
    vocabulary_a, vocabulary_b = "cat, dog", "sky; air, road, tree, person"
    fresh = model.predict(image, vocabulary_b)
    calls = count_image_forwards(monkeypatch)
    state = model.encode(image)
    assert calls, "encode must run the image encoders"
    model.predict(state, vocabulary_a)
    calls.clear()
    again = model.predict(state, vocabulary_b)
    assert calls == [], f"predict(state, ...) ran {calls}"
    assert again.classes == fresh.classes == ["sky", "road", "tree", "person"]
    assert np.array_equal(again.labels, fresh.labels)
    assert torch.equal(again.scores, fresh.scores)
    assert torch.equal(again.probabilities(), fresh.probabilities())


def test_a_precomputed_classifier_runs_no_text_encoder(image, monkeypatch):
    model = ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml"))
    vocabulary = ovseg.text.as_vocabulary("cat, dog")
    classifier = model.text_classifier(vocabulary.names)
    expected = model.predict(image, vocabulary)
    calls = []
    monkeypatch.setattr(ClipEncoder, "encode_text", lambda *a: calls.append(1))
    result = model.predict(model.encode(image), vocabulary, classifier=classifier)
    assert calls == []
    assert np.array_equal(result.labels, expected.labels)


def test_prediction_bands_equal_the_whole_map_and_the_labels(image):
    model = ovseg.build_model(ovseg.get_config("tiny/trident_tiny.yaml",
                                               ["model.refine.enabled", "false"]))
    result = model.predict(image, "cat, dog, sky")
    assert isinstance(result.labels, np.ndarray) and result.labels.shape == (70, 110)
    assert result.scores.shape[1:] != (70, 110)  # scores stay at the working resolution
    whole = result.probabilities()
    assert whole.shape == (3, 70, 110)
    for rows, band in result.bands(band_rows=16):
        assert torch.equal(band, whole[:, rows])
    # any band: the same numbers up to float rounding of the resize's matrix products
    torch.testing.assert_close(result.band(slice(10, 37)), whole[:, 10:37], rtol=0, atol=1e-6)
    assert np.array_equal(result.labels, whole.argmax(0).numpy())


@pytest.mark.parametrize("config", ["tiny/dense_clip_tiny.yaml", "tiny/trident_tiny.yaml"])
def test_predict_never_builds_a_full_resolution_class_map(config, image, monkeypatch):
    # with 40 classes a (C, H, W) float map at 700 x 1100 is 31M floats; a band is far smaller
    big = np.repeat(np.repeat(image, 10, axis=0), 10, axis=1)
    vocabulary = [f"class {i}" for i in range(40)]
    overrides = ["model.refine.enabled", "false"] if "trident" in config else []
    model = ovseg.build_model(ovseg.get_config(config, overrides))
    largest = [0]
    for factory in ("empty", "zeros"):
        original = getattr(torch, factory)

        def watched(*size, _original=original, **kwargs):
            out = _original(*size, **kwargs)
            largest[0] = max(largest[0], out.numel())
            return out

        monkeypatch.setattr(torch, factory, watched)
    result = model.predict(big, vocabulary)
    monkeypatch.undo()
    assert result.labels.shape == (700, 1100)
    assert 700 * 1100 <= largest[0] < 40 * 700 * 1100 // 4  # the labels, never the class map


@pytest.mark.parametrize(("num_classes", "dtype"), [
    (1, torch.uint8), (255, torch.uint8), (256, torch.int16), (32767, torch.int16),
    (32768, torch.int32),
])
def test_label_dtype_is_the_smallest_that_holds_every_index(num_classes, dtype):
    assert label_dtype(num_classes) == dtype
    assert torch.iinfo(dtype).max >= num_classes - 1


def test_prediction_labels_keep_their_values_in_the_small_dtype():
    scores = torch.randn(300, 3, 5)
    labels = labels_in_bands(scores, (7, 11), lambda band: band.argmax(0))
    wide = labels_in_bands(scores, (7, 11), lambda band: band.argmax(0), num_classes=10**6)
    assert labels.dtype == torch.int16 and wide.dtype == torch.int32
    assert torch.equal(labels.long(), wide.long()) and int(labels.max()) > 255
    names = [f"c{i}" for i in range(300)]
    prediction = Prediction(wide.numpy(), names, scores, lambda band: band)
    assert prediction.labels.dtype == np.int16
    np.testing.assert_array_equal(prediction.labels, wide.numpy())
