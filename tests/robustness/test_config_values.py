"""Config values out of their range are one error at load time, naming the key and the range
(issue 23, "Tracebacks that must be one line")."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ovseg
from ovseg.errors import ConfigError
from tests.helpers import REPO_ROOT

CONFIG = "tiny/dense_clip_tiny.yaml"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.inference.short_side", "-5", "a positive number of pixels"),
        ("model.inference.short_side", "0", "a positive number of pixels"),
        ("model.inference.max_long_side", "0", "a positive number of pixels"),
        ("model.inference.window_batch", "0", "at least 1 window per forward"),
        ("model.inference.stride", "0", "a positive number of pixels when windows are used"),
        ("model.inference.stride", "65", "at most the crop (64)"),
        ("model.inference.crop", "-1", "0 (the whole image) or a positive window side"),
        ("model.inference.crop", "4096", "at most model.inference.max_long_side (2048)"),
        ("model.inference.pad_multiple", "-56", "0 (no padding) or positive"),
    ],
)
def test_out_of_range_values_are_refused_at_load(key, value, message):
    with pytest.raises(ConfigError) as info:
        ovseg.get_config(CONFIG, [key, value])
    text = str(info.value)
    assert text.startswith(f"{key}: ") and message in text and "\n" not in text


def test_whole_image_mode_needs_no_stride():
    cfg = ovseg.get_config(CONFIG, ["model.inference.crop", "0", "model.inference.stride", "0"])
    assert cfg.model.inference.crop == 0


def test_the_command_line_says_it_in_one_line_with_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file",
         f"configs/{CONFIG}", "--eval-only", "model.inference.short_side", "-5",
         "output_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "model.inference.short_side: -5 is out of range" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing partial left


def test_overrides_may_be_a_mapping():
    as_list = ovseg.get_config(CONFIG, ["model.inference.crop", "96", "text.templates", "vild"])
    as_dict = ovseg.get_config(CONFIG, {"model.inference.crop": 96, "text.templates": "vild"})
    assert as_list == as_dict
