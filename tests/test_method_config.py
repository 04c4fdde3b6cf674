"""A method owns its config: a config holds the sections its method reads, and only those."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

import ovseg
from ovseg.config import save_config
from ovseg.errors import ConfigError
from ovseg.methods import METHODS
from ovseg.methods import trident as tr
from tests.fixtures.builders import build_voc
from tests.helpers import REPO_ROOT

TRIDENT_TINY = "tiny/trident_tiny.yaml"


def model_sections(cfg) -> set[str]:
    common = ("name", "device", "weights", "precision", "max_image_pixels")
    return {key for key in cfg.model if key not in common}


def test_each_method_config_holds_exactly_its_sections(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    expected = {
        "trident": {"clip", "dino", "sam", "inference", "trident", "refine"},
        "dense_clip": {"clip", "dino", "sam", "inference", "dense_clip", "pamr", "refine"},
        "linear_probe": {"clip", "inference"},
        "clip_dinoiser": {"clip", "dino", "inference", "clip_dinoiser"},
        "cloc": {"clip", "cloc"},
        "clip2scene": {"clip", "clip2scene"},
        "mask_adapted": {"clip", "inference", "mask_adapted"},
    }
    assert set(METHODS) == set(expected)
    for name, sections in expected.items():
        cfg = ovseg.get_config(empty, ["model.name", name])
        assert cfg.model.name == name
        assert model_sections(cfg) == sections, name


def test_inference_crop_changes_trident_windows(monkeypatch):
    seen: list[list[tuple[int, int, int, int]]] = []
    real = tr.trident_windows

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(tr, "trident_windows", spy)
    image = np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    for crop in (64, 96):
        model = ovseg.build_model(ovseg.get_config(
            TRIDENT_TINY, ["model.inference.crop", str(crop), "model.refine.enabled", "false"]))
        model.predict(image, ["cat", "dog"])
    small, large = seen
    assert {(y1 - y0, x1 - x0) for y0, x0, y1, x1 in small} == {(64, 64)}
    assert {(y1 - y0, x1 - x0) for y0, x0, y1, x1 in large} == {(96, 96)}
    assert len(large) < len(small)


def test_a_key_of_another_method_is_an_error_naming_key_and_method():
    with pytest.raises(ConfigError) as info:
        ovseg.get_config(TRIDENT_TINY, ["model.dense_clip.mode", "sclip"])
    message = str(info.value)
    assert "command line" in message
    assert "'model.dense_clip.mode'" in message
    assert "method 'trident'" in message
    assert "read by dense_clip" in message
    # the shared sections a method does not read are errors too
    with pytest.raises(ConfigError, match=r"'model\.sam\.arch' is not read by .*'linear_probe'"):
        ovseg.get_config("tiny/linear_probe_tiny.yaml", ["model.sam.arch", "tiny"])
    with pytest.raises(ConfigError, match=r"'model\.dino\.arch' is not read by .*'linear_probe'"):
        ovseg.get_config("tiny/linear_probe_tiny.yaml", ["model.dino.arch", "tiny-p8"])


def test_a_file_with_another_methods_section_names_the_file(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("model:\n  name: trident\n  pamr: {steps: 10}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mixed\.yaml: 'model\.pamr\.steps' is not read by "
                                          r"method 'trident'"):
        ovseg.get_config(path)


def test_unknown_method_and_late_method_change_are_errors():
    with pytest.raises(ConfigError, match="unknown method 'tridnet'"):
        ovseg.get_config(TRIDENT_TINY, ["model.name", "tridnet"])
    cfg = ovseg.get_config(TRIDENT_TINY)
    from ovseg.config import apply_overrides

    with pytest.raises(ConfigError, match="model.name cannot change"):
        apply_overrides(cfg, ["model.name", "linear_probe"], METHODS)


def test_trident_saved_config_has_only_what_it_reads(tmp_path):
    cfg = ovseg.get_config(TRIDENT_TINY)
    saved = yaml.safe_load(save_config(cfg, tmp_path / "config.yaml").read_text())
    assert set(saved["model"]) == {"name", "device", "weights", "precision", "max_image_pixels",
                                   "clip", "dino", "sam",
                                   "inference", "trident", "refine"}
    assert "crop" not in saved["model"]["trident"]  # one name per concept: model.inference.crop
    assert ovseg.get_config(tmp_path / "config.yaml") == cfg


def test_trident_run_saves_a_config_without_dense_clip_keys(tmp_path):
    root = tmp_path / "datasets"
    build_voc(root)
    output = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file",
        f"configs/{TRIDENT_TINY}", "--eval-only", "datasets.test", "[voc_21]",
        "datasets.root", str(root), "output_dir", str(output),
        "model.refine.enabled", "false",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (output / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["model"]["name"] == "trident"
    assert "dense_clip" not in saved["model"] and "pamr" not in saved["model"]
    assert "dense_clip:" not in text and "pamr:" not in text
