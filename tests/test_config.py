"""Tests of the config loader: schema defaults, `_base_` inheritance, errors, overrides, saving."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from ovseg import get_config
from ovseg.config import (
    Config,
    apply_overrides,
    config_to_yaml,
    default_config,
    save_config,
    structured_default,
)
from ovseg.errors import ConfigError
from ovseg.methods import METHODS


def dense_clip_default():
    """The default config (model.name dense_clip) with the sections dense_clip reads."""
    return structured_default("dense_clip", METHODS)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty configs directory that names resolve against."""
    root = tmp_path / "configs"
    root.mkdir()
    monkeypatch.setenv("OVSEG_CONFIGS", str(root))
    return root


def test_defaults_come_from_schema(tmp_path: Path) -> None:
    cfg = get_config(write(tmp_path / "empty.yaml", ""))
    assert isinstance(cfg, DictConfig)
    assert OmegaConf.get_type(cfg) is Config
    assert cfg == dense_clip_default()
    assert cfg.model.inference.crop == 224
    assert cfg.model.pamr.dilations == [8, 16]
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(Exception, match="mdoe"):
        cfg.model.dense_clip.mdoe = "sclip"  # struct mode: unknown keys fail from Python too


def test_file_values_override_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.yaml",
        """
        model:
          dense_clip: {mode: sclip, logit_scale: 50}
          pamr: {dilations: [1, 2, 4]}
        seed: 7
        """,
    )
    cfg = get_config(path)
    assert cfg.model.dense_clip.mode == "sclip"
    assert cfg.model.dense_clip.logit_scale == 50.0
    assert cfg.model.dense_clip.prob_thd == 0.0  # siblings keep their defaults
    assert cfg.model.pamr.dilations == [1, 2, 4]
    assert cfg.seed == 7


def test_two_levels_of_bases(tmp_path: Path) -> None:
    write(
        tmp_path / "base" / "root.yaml",
        """
        model:
          clip: {arch: ViT-L-14, weights: openai}
          inference: {crop: 336, stride: 168}
        """,
    )
    write(
        tmp_path / "base" / "mid.yaml",
        """
        _base_: root.yaml
        model:
          inference: {stride: 100}
          dense_clip: {mode: naclip}
        """,
    )
    child = write(
        tmp_path / "methods" / "child.yaml",
        """
        _base_: ../base/mid.yaml
        model:
          clip: {weights: laion2b_s32b_b79k}
        """,
    )
    cfg = get_config(child)
    assert cfg.model.clip.arch == "ViT-L-14"  # from the root base
    assert cfg.model.clip.weights == "laion2b_s32b_b79k"  # child overrides the root
    assert cfg.model.inference.crop == 336
    assert cfg.model.inference.stride == 100  # middle overrides the root
    assert cfg.model.dense_clip.mode == "naclip"
    assert cfg.model.inference.window_batch == 8  # untouched default


def test_list_of_bases_merges_in_order(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "model: {inference: {crop: 1, stride: 1}}\nseed: 1\n")
    write(tmp_path / "b.yaml", "model: {inference: {crop: 2}}\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\nseed: 3\n")
    cfg = get_config(child)
    assert cfg.model.inference.crop == 2  # the later base wins
    assert cfg.model.inference.stride == 1
    assert cfg.seed == 3


def test_shared_base_merges_once(tmp_path: Path) -> None:
    write(tmp_path / "common.yaml", "seed: 1\n")
    write(tmp_path / "a.yaml", "_base_: common.yaml\nseed: 2\n")
    write(tmp_path / "b.yaml", "_base_: common.yaml\noutput_dir: out_b\n")
    cfg = get_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert cfg.seed == 2  # b's copy of common.yaml does not reset what a set
    assert cfg.output_dir == "out_b"


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        get_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)


def test_self_base_is_a_cycle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cycle"):
        get_config(write(tmp_path / "self.yaml", "_base_: self.yaml\n"))


def test_missing_base_names_both_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.yaml") as info:
        get_config(write(tmp_path / "child.yaml", "_base_: nowhere.yaml\n"))
    assert "child.yaml" in str(info.value)


def test_misspelt_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny" / "typo.yaml", "model:\n  dense_clip:\n    mdoe: sclip\n")
    with pytest.raises(ConfigError) as info:
        get_config(path)
    message = str(info.value)
    assert "typo.yaml" in message
    assert "'model.dense_clip.mdoe'" in message
    assert "did you mean 'model.dense_clip.mode'?" in message


def test_misspelt_key_in_a_base_names_the_base(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "model: {infrence: {crop: 448}}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'model\.infrence'"):
        get_config(child)


def test_key_in_wrong_section_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'model.inference.crop'"):
        get_config(write(tmp_path / "x.yaml", "model: {crop: 448}\n"))


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad_type.yaml", "model:\n  inference:\n    crop: abc\n")
    with pytest.raises(ConfigError) as info:
        get_config(path)
    message = str(info.value)
    assert "bad_type.yaml" in message
    assert "model.inference.crop" in message
    assert "abc" in message


def test_wrong_type_in_list_names_element(tmp_path: Path) -> None:
    path = write(tmp_path / "bad_list.yaml", "model: {pamr: {dilations: [8, x]}}\n")
    with pytest.raises(ConfigError, match=r"bad_list\.yaml.*model\.pamr\.dilations\[1\]"):
        get_config(path)


def test_scalar_for_a_section_names_key(tmp_path: Path) -> None:
    path = write(tmp_path / "scalar.yaml", "model:\n  inference: 448\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: 'model\.inference' is a section"):
        get_config(path)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*duplicate key 'seed'"):
        get_config(path)


def test_yaml_1_2_scalars(tmp_path: Path) -> None:
    path = write(
        tmp_path / "scalars.yaml",
        """
        model:
          dense_clip: {mode: no, prob_thd: 1e-2}
          clip: {arch: '017'}
        """,
    )
    cfg = get_config(path)
    assert cfg.model.dense_clip.mode == "no"  # not the YAML 1.1 boolean
    assert cfg.model.dense_clip.prob_thd == pytest.approx(0.01)
    assert cfg.model.clip.arch == "017"


def test_overrides_parse_ints_floats_lists_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "model: {dense_clip: {mode: maskclip}}\n")
    overrides = [
        "model.dense_clip.mode", "sclip",
        "model.inference.crop", "448",
        "model.dense_clip.logit_scale", "1e2",
        "model.pamr.dilations", "[4,8,16]",
        "datasets.test", "[ade20k_150, voc_21]",
        "model.clip.weights", "1e-4",
    ]  # fmt: skip
    cfg = get_config(path, overrides)
    assert cfg.model.dense_clip.mode == "sclip"
    assert cfg.model.inference.crop == 448
    assert isinstance(cfg.model.inference.crop, int)
    assert cfg.model.dense_clip.logit_scale == 100.0
    assert cfg.model.pamr.dilations == [4, 8, 16]
    assert cfg.datasets.test == ["ade20k_150", "voc_21"]
    assert cfg.model.clip.weights == "1e-4"  # a string field keeps the text as typed


def test_overrides_apply_left_to_right_and_merge_sections() -> None:
    base = dense_clip_default()
    cfg = apply_overrides(
        base, ["seed", "1", "seed", "2", "model.inference", "{crop: 448, stride: 224}"]
    )
    assert cfg.seed == 2
    assert (cfg.model.inference.crop, cfg.model.inference.stride) == (448, 224)
    assert cfg.model.inference.window_batch == 8
    assert base.seed == 0  # the input is not changed
    assert OmegaConf.is_struct(cfg)


def test_odd_override_count_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "")
    with pytest.raises(ConfigError, match="command line.*model.inference.stride"):
        get_config(path, ["model.inference.crop", "448", "model.inference.stride"])


def test_unknown_override_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "")
    with pytest.raises(ConfigError) as info:
        get_config(path, ["model.dense_clip.mdoe", "sclip"])
    message = str(info.value)
    assert "command line" in message
    assert "model.dense_clip.mdoe" in message
    assert "did you mean 'model.dense_clip.mode'" in message


def test_wrong_type_override_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "")
    with pytest.raises(ConfigError, match="command line.*model.inference.crop"):
        get_config(path, ["model.inference.crop", "big"])


def test_override_key_below_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="command line.*model.inference.crop.size"):
        apply_overrides(dense_clip_default(), ["model.inference.crop.size", "3"])


def test_overrides_as_one_string_is_an_error() -> None:
    with pytest.raises(ConfigError, match="command line"):
        apply_overrides(OmegaConf.structured(Config), "seed 3")  # type: ignore[arg-type]


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.yaml",
        """
        model:
          dense_clip: {mode: "no", logit_scale: 1e-3}
          clip: {weights: "1e-4", arch: "true"}
          pamr: {dilations: [2, 4]}
        text: {cache_dir: ""}
        datasets: {test: [ade20k_150]}
        output_dir: "${model.name}/run"
        """,
    )
    cfg = get_config(path, ["seed", "5"])
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert saved.is_file()
    assert not [p for p in saved.parent.iterdir() if p != saved]  # no temp file left behind
    reloaded = get_config(saved)
    assert reloaded == cfg
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(cfg)
    assert reloaded.output_dir == "dense_clip/run"
    assert config_to_yaml(reloaded) == saved.read_text(encoding="utf-8")


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    target = write(tmp_path / "config.yaml", "old contents\n")
    save_config(dense_clip_default(), target)
    assert get_config(target) == dense_clip_default()


def test_config_to_yaml_accepts_dataclass() -> None:
    text = config_to_yaml(default_config("dense_clip", METHODS))
    assert "dense_clip:" in text and "crop: 224" in text


def test_name_relative_to_configs_dir(configs: Path, tmp_path: Path, monkeypatch) -> None:
    write(configs / "dense_clip" / "base.yaml", "model: {dense_clip: {mode: naclip}}\n")
    write(configs / "dense_clip" / "x.yaml", "_base_: base.yaml\nseed: 9\n")
    monkeypatch.chdir(tmp_path)  # a name that is not a path from here
    cfg = get_config("dense_clip/x.yaml")
    assert cfg.seed == 9
    assert cfg.model.dense_clip.mode == "naclip"


def test_missing_config_names_where_it_looked(configs: Path) -> None:
    with pytest.raises(ConfigError) as info:
        get_config("dense_clip/missing.yaml")
    message = str(info.value)
    assert "dense_clip/missing.yaml" in message
    assert str(configs.resolve()) in message
