"""Weights files that are not what they claim: a pickle that runs code, empty or truncated files,
text, non-tensor entries, another model's keys or shapes. Both loading paths - an encoder's
weights spec (``model.clip.weights``) and trained weights (``model.weights``,
``load_trained_weights``) - refuse each in one line naming the file, without torch's
paragraphs, and never run the pickled code (issue 23, reliability)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ovseg
from ovseg.encoders.clip import build_clip
from ovseg.engine.checkpoint import load_trained_weights, trainable_state_dict
from ovseg.errors import OvsegError

ENCODER_CONFIG = "tiny/dense_clip_tiny.yaml"
TRAINED_CONFIG = "tiny/clip_dinoiser_tiny.yaml"
# what torch.load(weights_only=True) says at length, none of which belongs in one line
TORCH_PARAGRAPHS = ("Weights only load failed", "WeightsUnpickler", "Check the documentation",
                    "arbitrary code execution")


class RunsCode:
    """Unpickling this runs a shell command: the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained_model():
    # a failed load changes nothing, so one model serves every case
    return ovseg.build_model(ovseg.get_config(TRAINED_CONFIG))


@pytest.fixture(scope="module")
def states(trained_model):
    """A real state dict for each loader: the tiny CLIP's, and trained CLIP-DINOiser heads."""
    clip = build_clip(ovseg.get_config(ENCODER_CONFIG).model.clip)
    return {"encoder": clip.model.state_dict(), "trained": trainable_state_dict(trained_model)}


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _safetensors_bytes(state, path: Path) -> bytes:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path.read_bytes()


def _wrong_shape(state):
    key = sorted(state)[0]
    return {**state, key: torch.zeros(*[size + 1 for size in state[key].shape])}, key


FAULTS = {
    # name: (file name, make(state, path, marker) -> bytes, text the message holds)
    "pickle-runs-code": ("w.pt", lambda s, p, m: _torch_bytes({"w": RunsCode(m)}),
                         "holds pickled code or objects other than tensors (posix.system)"),
    "plain-pickle-runs-code": ("w.pth", lambda s, p, m: pickle.dumps(RunsCode(m)),
                               "is a pickle that torch.load(weights_only=True) cannot read"),
    "empty-pt": ("w.pt", lambda s, p, m: b"", "the file is empty (0 bytes)"),
    "empty-safetensors": ("w.safetensors", lambda s, p, m: b"", "the file is empty (0 bytes)"),
    "truncated-pt": ("w.pt", lambda s, p, m: _torch_bytes(s)[:2000],
                     "is truncated, damaged or not a torch weights file"),
    "truncated-safetensors": ("w.safetensors",
                              lambda s, p, m: _safetensors_bytes(s, p)[:3000],
                              "is truncated, damaged or not a safetensors weights file"),
    "text-pt": ("w.pt", lambda s, p, m: b"these are weights, trust me\n",
                "is truncated, damaged or not a torch weights file"),
    "not-tensors": ("w.pt", lambda s, p, m: _torch_bytes({"epoch": 3, "lr": [0.1]}),
                    "does not hold a state dict of tensors"),
    "other-model-keys": ("w.safetensors",
                         lambda s, p, m: _safetensors_bytes({"classifier.weight":
                                                             torch.zeros(3, 4)}, p),
                         "unexpected keys: classifier.weight"),
    "wrong-shape": ("w.safetensors", lambda s, p, m: _safetensors_bytes(_wrong_shape(s)[0], p),
                    "shape mismatches: "),
}


def _load(loader: str, path: Path, trained_model) -> None:
    if loader == "encoder":
        build_clip(ovseg.get_config(ENCODER_CONFIG, ["model.clip.weights", str(path)]).model.clip)
    else:
        load_trained_weights(trained_model, path)


@pytest.mark.parametrize("loader", ["encoder", "trained"])
@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_a_bad_weights_file_is_one_line(states, trained_model, tmp_path, loader, fault):
    file_name, make, expected = FAULTS[fault]
    path, marker = tmp_path / file_name, tmp_path / "code-ran"
    path.write_bytes(make(states[loader], path, marker))
    with pytest.raises(OvsegError) as info:
        _load(loader, path, trained_model)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert not any(paragraph in message for paragraph in TORCH_PARAGRAPHS), message
    assert len(message) < 600
    assert not marker.exists()  # the pickled command never ran
    if fault == "other-model-keys" and loader == "encoder":  # a few keys, then how many more
        assert "missing keys: " in message and " more" in message
