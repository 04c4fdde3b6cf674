"""The dense_clip method end to end on tiny encoders: predict, synonyms, thresholds, text cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovseg
from ovseg.data.catalog import class_vocabulary
from ovseg.errors import ConfigError, VocabularyError
from ovseg.layers.labels import labels_from_probabilities, suppress_small_classes

MODES = ["vanilla", "maskclip", "sclip", "naclip"]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(70, 110, 3), dtype=np.uint8)


def tiny_model(*overrides):
    return ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml", list(overrides)))


@pytest.mark.parametrize("mode", MODES)
def test_predict_gives_labels_and_probabilities_at_input_size(image, mode):
    model = tiny_model("model.dense_clip.mode", mode)
    result = model.predict(image, "cat, dog, sky")
    assert result.classes == ["cat", "dog", "sky"]
    assert result.labels.shape == (70, 110) and result.labels.dtype == np.uint8
    assert result.logits.shape == (3, 70, 110)
    assert torch.allclose(result.logits.sum(0), torch.ones(70, 110), atol=1e-5)
    assert np.array_equal(result.labels, result.logits.argmax(0).numpy())


def test_proxy_mode_runs_with_tiny_dino(image):
    model = ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny_proxy.yaml"))
    result = model.predict(image, ["cat", "dog"])
    assert result.labels.shape == (70, 110)
    assert set(np.unique(result.labels)) <= {0, 1}


def test_pamr_refinement_runs_and_changes_the_probabilities(image):
    plain = tiny_model("model.dense_clip.mode", "naclip").predict(image, "cat, dog, sky")
    refined = tiny_model("model.dense_clip.mode", "naclip", "model.pamr.steps", "2")
    result = refined.predict(image, "cat, dog, sky")
    assert result.logits.shape == plain.logits.shape
    assert not torch.allclose(result.logits, plain.logits)


def test_banded_resize_equals_one_shot_resize(image):
    model = tiny_model()
    vocabulary = ovseg.text.as_vocabulary("cat, dog, sky")
    text = model.text_classifier(vocabulary.names)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = model.clip.normalize(torch.nn.functional.interpolate(x, size=(48, 75)))
    cosine = model.dense_cosine(x, text)[0]
    banded = model._class_probabilities_in_bands(cosine, (70, 110), vocabulary)
    full = torch.nn.functional.interpolate(cosine[None], size=(70, 110), mode="bilinear")[0]
    assert torch.allclose(banded, model.class_probabilities(full, vocabulary), atol=1e-5)


def test_synonym_class_takes_the_max_of_its_names(image):
    model = tiny_model()
    split = model.predict(image, "cat, kitten, dog")
    merged = model.predict(image, "cat; kitten, dog")
    assert merged.classes == ["cat", "dog"]
    # softmax is over all names in both cases: the merged class is the max of the two rows
    assert torch.allclose(merged.logits[0], torch.maximum(split.logits[0], split.logits[1]))
    assert torch.allclose(merged.logits[1], split.logits[2])


def test_probability_threshold_sends_unsure_pixels_to_class_zero():
    probs = torch.tensor([[[0.2, 0.5]], [[0.7, 0.45]], [[0.1, 0.05]]])
    assert labels_from_probabilities(probs, 0.0).tolist() == [[1, 0]]
    assert labels_from_probabilities(probs, 0.6).tolist() == [[1, 0]]
    assert labels_from_probabilities(probs, 0.8).tolist() == [[0, 0]]


def test_area_rule_zeroes_small_foreground_classes():
    # class 1 wins 9 pixels, class 2 wins 1: 1 / 10 is not above 0.1 of the foreground
    probs = torch.zeros(3, 1, 12)
    probs[0, 0, :2] = 0.9
    probs[1, 0, 2:11] = 0.8
    probs[2, 0, 11] = 0.6
    probs[1, 0, 11] = 0.3
    suppress_small_classes(probs, 0.1)
    assert probs[2].sum() == 0
    assert labels_from_probabilities(probs, 0.0)[0, 11].item() == 1


def test_text_cache_spares_the_text_encoder_on_the_second_build(tmp_path, image, monkeypatch):
    from ovseg.encoders.clip import ClipEncoder
    from ovseg.encoders.weights import save_state_dict_file

    weights = tmp_path / "clip.safetensors"
    save_state_dict_file(tiny_model().clip.model.state_dict(), weights)
    calls = []
    original = ClipEncoder.encode_text

    def counting(self, prompts):
        calls.append(len(prompts))
        return original(self, prompts)

    monkeypatch.setattr(ClipEncoder, "encode_text", counting)
    overrides = ("model.clip.weights", str(weights), "text.cache_dir", str(tmp_path / "cache"))
    first = tiny_model(*overrides).predict(image, "cat, dog")
    assert calls, "the first build must run the text encoder"
    calls.clear()
    second = tiny_model(*overrides).predict(image, "cat, dog")
    assert calls == []
    assert torch.equal(first.logits, second.logits)
    tiny_model(*overrides).predict(image, "cat, dog, sky")
    assert calls, "a new vocabulary is a cache miss"


def test_bad_configuration_and_vocabulary_are_clear_errors(image):
    with pytest.raises(ConfigError, match="unknown mode"):
        tiny_model("model.dense_clip.mode", "sclipp")
    with pytest.raises(ConfigError, match="unknown method"):
        tiny_model("model.name", "tridentt")
    with pytest.raises(VocabularyError):
        tiny_model().predict(image, "cat,,dog")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            tiny_model("model.device", "cuda")


def test_memory_is_bounded_by_the_window_batch(image, monkeypatch):
    model = tiny_model("model.inference.window_batch", "2")
    seen = []
    original = model.window_features

    def spy(windows):
        seen.append(windows.shape[0])
        return original(windows)

    monkeypatch.setattr(model, "window_features", spy)
    model.predict(image, "cat, dog")
    assert max(seen) <= 2 and sum(seen) > 2


def test_whole_image_mode_resizes_patch_logits_straight_to_the_input(image):
    model = tiny_model("model.inference.crop", "0", "model.inference.stride", "0")
    vocabulary = ovseg.text.as_vocabulary("cat, dog")
    result = model.predict(image, vocabulary)
    size = ovseg.layers.rescale_size(70, 110, 96, 2048)
    pixels = torch.from_numpy(ovseg.layers.resize_image(image, size)).permute(2, 0, 1)[None]
    patch_cosine = model.window_cosine(model.clip.normalize(pixels), model.text_classifier(
        vocabulary.names))[0]
    assert patch_cosine.shape[1:] == (size[0] // 16, size[1] // 16)
    direct = torch.nn.functional.interpolate(patch_cosine[None], size=(70, 110), mode="bilinear")
    expected = model.class_probabilities(direct[0], vocabulary)
    assert torch.allclose(result.logits, expected, atol=1e-5)


def test_naclip_thresholds_before_it_renormalises():
    """NACLIP's reference takes the argmax and applies prob_thd to the class probabilities
    before renormalising them; the renormalised ones are only the returned scores."""
    image = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    vocabulary = class_vocabulary("voc_21", "sclip")  # 26 background words
    model = tiny_model("model.dense_clip.mode", "naclip", "model.dense_clip.renormalize", "true",
                       "model.dense_clip.prob_thd", "0.1", "model.dense_clip.logit_scale", "40")
    state = model.encode(image)
    result = model.predict(state, vocabulary)
    text = model.text_classifier(vocabulary.names)
    cosine = model.stitched_cosine(state.windows, state.resized, text)
    cosine = torch.nn.functional.interpolate(cosine[None], size=(64, 64), mode="bilinear")[0]
    # the reference's order, transcribed: softmax over names, max over each class's names,
    # argmax, threshold; renormalise afterwards for the scores
    probs = (40 * cosine).softmax(0)
    per_class = torch.stack([probs[vocabulary.name_to_class == c].amax(0)
                             for c in range(vocabulary.num_classes)])
    best, expected = per_class.max(0)
    expected[best < 0.1] = 0
    assert np.array_equal(result.labels, expected.numpy())
    renormalised = per_class / per_class.sum(0, keepdim=True)
    assert torch.allclose(result.probabilities(), renormalised, atol=1e-5)
    # the order matters on this image: thresholding the renormalised scores sends fewer pixels
    # to background
    sent_before, sent_after = int((best < 0.1).sum()), int((renormalised.amax(0) < 0.1).sum())
    assert sent_before > sent_after


def test_argmax_classes_equals_argmax_with_ties_and_nan():
    from ovseg.layers.labels import argmax_classes

    scores = torch.randint(0, 3, (7, 40, 50), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(argmax_classes(scores), scores.argmax(0))  # many ties: the first wins
    scores[2, 3, 4] = scores[5, 3, 4] = float("nan")
    assert torch.equal(argmax_classes(scores), scores.argmax(0))  # NaN counts as the max
    probs = torch.rand(150, 9, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(argmax_classes(probs), probs.argmax(0))
