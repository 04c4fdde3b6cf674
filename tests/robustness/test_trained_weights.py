"""One loading path for trained weights (`model.weights`): the Python API, the demo and
tools/train_net.py load and check them alike (issue 23, "The demo ignores model.weights")."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ovseg
from ovseg.engine.checkpoint import CheckpointError, trainable_state_dict
from tests.helpers import REPO_ROOT

CONFIG = "tiny/clip_dinoiser_tiny.yaml"


def _demo():
    spec = importlib.util.spec_from_file_location("ovseg_demo_weights", REPO_ROOT / "demo" /
                                                  "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A heads file that differs from the random initial heads."""
    model = ovseg.build_model(ovseg.get_config(CONFIG))
    state = {key: value + 0.5 for key, value in trainable_state_dict(model).items()}
    path = tmp_path_factory.mktemp("weights") / "heads.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path, state


def test_build_model_loads_model_weights(trained):
    path, state = trained
    model = ovseg.build_model(ovseg.get_config(CONFIG, ["model.weights", str(path)]))
    loaded = trainable_state_dict(model)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_a_missing_weights_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as info:
        ovseg.build_model(ovseg.get_config(CONFIG, ["model.weights", str(missing)]))
    assert "nope.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_weights_of_another_model_are_one_line_listing_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"classifier.weight": torch.zeros(3, 4)}, str(path))
    with pytest.raises(CheckpointError, match="other.safetensors.*classifier.weight"):
        ovseg.build_model(ovseg.get_config(CONFIG, ["model.weights", str(path)]))


def test_the_demo_uses_model_weights(trained, tmp_path, capsys):
    demo = _demo()
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(image)
    config = str(REPO_ROOT / "configs" / CONFIG)
    # a weights file that does not exist: one error line, exit status not 0, nothing written
    out = tmp_path / "out_missing"
    code = demo.main(["--config-file", config, "--device", "cpu", "--input", str(image),
                      "--output", str(out), "--vocab", "cat, dog",
                      "model.weights", str(tmp_path / "nope.safetensors")])
    assert code != 0
    assert not out.exists() or not any(out.iterdir())  # no output of the untrained model
    assert "nope.safetensors" in capsys.readouterr().err
    # the trained heads change the demo's output against the untrained ones
    path, _ = trained
    runs = {}
    for name, extra in (("random", []), ("trained", ["model.weights", str(path)])):
        out = tmp_path / f"out_{name}"
        assert demo.main(["--config-file", config, "--device", "cpu", "--input", str(image),
                          "--output", str(out), "--vocab", "cat, dog", *extra]) == 0
        runs[name] = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert runs["random"].keys() == runs["trained"].keys()
    assert runs["random"] != runs["trained"]
