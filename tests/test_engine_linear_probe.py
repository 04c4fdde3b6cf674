"""Tests of the linear probe (ovseg/methods/linear_probe.py), the engine's tiny trainable method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovseg
from ovseg.errors import ConfigError, VocabularyError
from ovseg.methods import METHODS
from ovseg.methods.linear_probe import IGNORE_LABEL, LinearProbe
from tests.test_engine_train import TINY_CONFIG, make_toy_dataset

TOY_CUSTOM = ("[{name: toy_probe, image_dir: images, label_dir: labels, class_file: classes.txt,"
              " image_ext: .png}]")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = make_toy_dataset(tmp_path_factory.mktemp("probe_data"), count=4)
    return ovseg.get_config(TINY_CONFIG, ["datasets.root", str(root), "datasets.custom",
                                          TOY_CUSTOM, "datasets.train", "[toy_probe]"])


@pytest.fixture(scope="module")
def probe(cfg) -> LinearProbe:
    return ovseg.build_model(cfg)


def test_registered_and_trains_only_the_classifier(probe):
    assert "linear_probe" in METHODS
    assert probe.class_names == ["red", "green", "blue"]
    trainable = probe.trainable_parameters()
    assert [tuple(p.shape) for p in trainable] == [(3, probe.clip.embed_dim, 1, 1), (3,)]
    assert not any(p.requires_grad for p in probe.clip.parameters())


def test_train_dataset_is_fixed_crops_with_ignore_mapped(cfg, probe):
    dataset = probe.train_dataset(cfg)
    assert len(dataset) == 4
    sample = dataset[0]
    assert sample["image"].shape == (64, 64, 3) and sample["image"].dtype == np.uint8
    assert sample["label"].dtype == np.int64
    assert (sample["label"][:2] == IGNORE_LABEL).all()  # the stored 255 rows
    assert set(np.unique(sample["label"][2:])) <= {0, 1, 2}


def test_loss_leaves_ignore_pixels_out_and_averages_per_image(probe):
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2, 64, 64))
    full = probe.loss({"image": images, "label": labels})["loss_ce"]
    ignored = labels.clone()
    ignored[1] = IGNORE_LABEL  # image 1 has no labelled pixel: it adds 0 to the mean
    half = probe.loss({"image": images, "label": ignored})["loss_ce"]
    first_only = probe.loss({"image": images[:1], "label": labels[:1]})["loss_ce"]
    torch.testing.assert_close(half, first_only / 2)
    assert full > 0
    nothing = probe.loss({"image": images, "label": torch.full_like(labels, IGNORE_LABEL)})
    assert nothing["loss_ce"].item() == 0.0


def test_predict_the_trained_classes_only(probe):
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    prediction = probe.predict(image, ["red", "green", "blue"])
    assert prediction.labels.shape == (50, 70) and prediction.labels.dtype == np.uint8
    assert prediction.logits.shape == (3, 50, 70)
    torch.testing.assert_close(prediction.logits.sum(0), torch.ones(50, 70))
    with pytest.raises(VocabularyError, match="predicts only the 3 classes it was trained on"):
        probe.predict(image, "cat, dog")


def test_needs_a_training_set_to_know_its_classes():
    cfg = ovseg.get_config(TINY_CONFIG)
    with pytest.raises(ConfigError, match="linear_probe needs datasets.train"):
        ovseg.build_model(cfg)
