"""Config files that cannot be used: unknown keys, bytes that are not UTF-8, YAML syntax errors,
no mapping, missing or cyclic bases. ``ovseg.get_config`` raises one ConfigError line naming
the file; tools/train_net.py prints it as one ``error:`` line, exits 2 and creates nothing
(issue 23, reliability)."""

from __future__ import annotations

from pathlib import Path

import pytest

import ovseg
from ovseg.errors import ConfigError
from tests.helpers import REPO_ROOT, load_script
from tests.robustness.scripts import one_error_line

BASE = REPO_ROOT / "configs" / "tiny" / "dense_clip_tiny.yaml"

FAULTS = {
    # name: (file contents, text the message holds)
    "unknown-key": (f"_base_: {BASE}\nmodel:\n  inferance:\n    crop: 64\n",
                    "unknown key 'model.inferance'"),
    "unknown-section": (f"_base_: {BASE}\nsolvr:\n  max_iter: 10\n", "unknown key 'solvr'"),
    "not-utf8": (f"_base_: {BASE}\nmodel:\n  name: dense_clip\n".encode() + b"# caf\xe9\n",
                 "not UTF-8 text (byte 0xe9 on line 4); save the config as UTF-8"),
    "utf16": ("model:\n  name: dense_clip\n".encode("utf-16"), "not UTF-8 text (byte 0xff on "
              "line 1)"),
    "yaml-unclosed-bracket": ("datasets:\n  test: [ade20k_150\n",
                              "invalid YAML at line 3, column 1: expected ',' or ']'"),
    "yaml-tab-indent": ("model:\n\tname: dense_clip\n",
                        "invalid YAML at line 2, column 1: found character '\\t'"),
    "yaml-bad-indent": ("model:\n  name: dense_clip\n   clip: x\n", "invalid YAML at line 3"),
    "duplicate-key": ("seed: 1\nseed: 2\n", "line 2, column 1: duplicate key 'seed'"),
    "not-a-mapping": ("- model\n- solver\n", "a config file must be a mapping of keys, not a "
                      "list"),
    "missing-base": ("_base_: nowhere.yaml\n", "base config 'nowhere.yaml' not found"),
    "wrong-type": (f"_base_: {BASE}\nsolver:\n  max_iter: many\n", "solver.max_iter"),
}


def _write(tmp_path: Path, contents) -> Path:
    path = tmp_path / "my config.yaml"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    return path


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_a_bad_config_file_is_one_line(tmp_path, fault):
    contents, expected = FAULTS[fault]
    with pytest.raises(ConfigError) as info:
        ovseg.get_config(_write(tmp_path, contents))
    message = str(info.value)
    assert "my config.yaml" in message and expected in message and "\n" not in message


@pytest.fixture(scope="module")
def train_net():
    return load_script("tools/train_net.py")


@pytest.mark.parametrize("fault", ["not-utf8", "yaml-unclosed-bracket", "unknown-key"])
def test_the_command_line_prints_it_as_one_error_line(train_net, tmp_path, capsys, fault):
    contents, expected = FAULTS[fault]
    output = tmp_path / "run"
    code = train_net.main(["--config-file", str(_write(tmp_path, contents)), "--eval-only",
                           "output_dir", str(output)])
    assert code == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not output.exists()


def test_a_bom_is_not_an_error(tmp_path):
    cfg = ovseg.get_config(_write(tmp_path, f"\ufeff_base_: {BASE}\nseed: 7\n".encode()))
    assert cfg.seed == 7
