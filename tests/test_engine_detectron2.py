"""Tests of ovseg.integrations.detectron2: with detectron2 (requires_d2), with a stand-in of its
documented catalog/evaluator API (always), and without it (import works, use says how to
install)."""

from __future__ import annotations

import sys
import types
from collections import UserDict

import cv2
import numpy as np
import pytest
import torch

from ovseg.data.catalog import register_custom_dataset, unregister_custom_dataset
from ovseg.integrations import detectron2 as d2_integration
from tests.test_engine_train import make_toy_dataset


@pytest.fixture
def toy_dataset(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", count=3)
    register_custom_dataset("toy_d2", "images", "labels", "classes.txt", image_ext=".png",
                            root=root)
    yield root
    unregister_custom_dataset("toy_d2")


def perfect_outputs(dicts):
    """(C, H, W) scores whose argmax is the label (ignore pixels: class 0)."""
    outputs = []
    for sample in dicts:
        label = cv2.imread(sample["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64)
        label[label == 255] = 0
        scores = torch.nn.functional.one_hot(torch.from_numpy(label), 3).permute(2, 0, 1)
        outputs.append({"sem_seg": scores.float()})
    return outputs


class _FakeCatalog(UserDict):
    """detectron2's documented DatasetCatalog: register (once per name), get, list."""

    def register(self, name, func):
        assert name not in self, f"Dataset '{name}' is already registered!"
        self[name] = func

    def get(self, name):
        return self.data[name]()

    def list(self):
        return list(self.keys())


class _FakeMetadata(types.SimpleNamespace):
    def set(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)
        return self


class _FakeMetadataCatalog(dict):
    def get(self, name):
        return self.setdefault(name, _FakeMetadata(name=name))


@pytest.fixture
def fake_detectron2(monkeypatch):
    package = types.ModuleType("detectron2")
    data = types.ModuleType("detectron2.data")
    data.DatasetCatalog = _FakeCatalog()
    data.MetadataCatalog = _FakeMetadataCatalog()
    evaluation = types.ModuleType("detectron2.evaluation")
    evaluation.DatasetEvaluator = type("DatasetEvaluator", (), {})
    for name, module in (("detectron2", package), ("detectron2.data", data),
                         ("detectron2.evaluation", evaluation)):
        monkeypatch.setitem(sys.modules, name, module)
    d2_integration._evaluator_class.cache_clear()
    yield data, evaluation
    d2_integration._evaluator_class.cache_clear()


def check_registration_and_evaluator(data, evaluator_base, tmp_path):
    registered = d2_integration.register_all(names=["ade20k_150", "scannet_20", "toy_d2"])
    assert registered == ["ade20k_150", "toy_d2"]  # the point-cloud benchmark is not 2D
    assert d2_integration.register_all(names=["toy_d2"]) == []  # already there: left alone
    metadata = data.MetadataCatalog.get("ade20k_150")
    assert len(metadata.stuff_classes) == 150 and metadata.ignore_label == 255
    assert metadata.evaluator_type == "sem_seg"
    assert metadata.label_mapping == "reduce_zero_label"
    dicts = data.DatasetCatalog.get("toy_d2")
    assert [d["image_id"] for d in dicts] == ["000", "001", "002"]
    assert dicts[0]["file_name"].endswith("images/000.png")

    evaluator = d2_integration.OvsegSemSegEvaluator("toy_d2", output_dir=str(tmp_path / "out"))
    assert isinstance(evaluator, evaluator_base)
    evaluator.reset()
    outputs = perfect_outputs(dicts)
    # the label is found from sem_seg_file_name, or from file_name alone
    evaluator.process(dicts[:2], outputs[:2])
    evaluator.process([{"file_name": dicts[2]["file_name"]}], outputs[2:])
    results = evaluator.evaluate()["sem_seg"]
    assert results["mIoU"] == pytest.approx(100.0)
    assert results["IoU-red"] == pytest.approx(100.0)
    assert (tmp_path / "out" / "toy_d2" / "results.json").is_file()


@pytest.mark.usefixtures("toy_dataset")
def test_with_detectron2_api_stand_in(fake_detectron2, tmp_path):
    data, evaluation = fake_detectron2
    check_registration_and_evaluator(data, evaluation.DatasetEvaluator, tmp_path)


@pytest.mark.requires_d2
@pytest.mark.usefixtures("toy_dataset")
def test_with_detectron2(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2 import data
    from detectron2.evaluation import DatasetEvaluator

    for name in ("ade20k_150", "toy_d2"):
        if name in data.DatasetCatalog.list():
            data.DatasetCatalog.remove(name)
            data.MetadataCatalog.remove(name)
    check_registration_and_evaluator(data, DatasetEvaluator, tmp_path)


def test_without_detectron2_import_works_and_use_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import detectron2 -> ImportError
    d2_integration._evaluator_class.cache_clear()
    assert not d2_integration.detectron2_available()
    with pytest.raises(ImportError, match="install.*from source"):
        d2_integration.register_all()
    with pytest.raises(ImportError, match="facebookresearch/detectron2 repository"):
        d2_integration.OvsegSemSegEvaluator  # noqa: B018
    d2_integration._evaluator_class.cache_clear()
