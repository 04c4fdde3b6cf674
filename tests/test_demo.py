"""Tests of the demo command line (demo/demo.py), called through its ``main(argv)``.

Each end-to-end test runs twice: with a stand-in model (checks the command line's own logic
now) and with the tiny real model config, which skips until that config exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.methods.base import Prediction
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "dense_clip_tiny.yaml"


def _load_demo() -> ModuleType:
    return load_script("demo/demo.py")


demo = _load_demo()


class _StandInModel:
    """Predicts a fixed pattern of stripes over the vocabulary's classes; records its calls."""

    def __init__(self) -> None:
        self.images: list[tuple[int, ...]] = []

    def predict(self, image: np.ndarray, vocabulary) -> Prediction:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        self.images.append(image.shape)
        height, width = image.shape[:2]
        classes = list(vocabulary.class_names)
        labels = (np.arange(width)[None, :] * len(classes) // width).repeat(height, axis=0)
        scores = torch.zeros(len(classes), height, width)
        return Prediction(labels=labels.astype(np.int64), classes=classes, scores=scores,
                          to_probabilities=lambda band: band)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace config loading and the model build; returns what they were called with."""
    calls: dict = {"overrides": None, "model": _StandInModel()}

    def get_config(path, overrides=()):
        calls["overrides"] = list(overrides)
        return {"path": path}

    monkeypatch.setattr(ovseg, "get_config", get_config)
    monkeypatch.setattr(ovseg, "build_model", lambda cfg: calls["model"])
    return calls


@pytest.fixture(params=["stand_in", "tiny"])
def run_demo(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., int]:
    """A function running the demo with a config and device filled in; returns the exit code."""
    if request.param == "tiny":
        if not TINY_CONFIG.exists():
            pytest.skip(f"{TINY_CONFIG.relative_to(REPO)} does not exist yet")
        config = str(TINY_CONFIG)
    else:
        request.getfixturevalue("stand_in")
        config = str(tmp_path / "unused.yaml")

    def run(*args: str) -> int:
        return demo.main(["--config-file", config, "--device", "cpu", *args])

    return run


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def _rgb(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _argv(inputs, output, *rest) -> list[str]:
    """Demo arguments with a dummy config file, for runs that never load it."""
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return [
        "--config-file", "c.yaml", "--input", *map(str, inputs), "--output", str(output),
        *map(str, rest),
    ]  # fmt: skip


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _check_outputs(out: Path, stem: str, image: Path, height: int, width: int, classes: int):
    labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (height, width) and labels.dtype == np.uint8
    assert labels.max() < classes
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    assert overlay.shape[0] >= height and overlay.shape[1] > width  # legend panel
    summary = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    assert summary["image"] == str(image)
    assert len(summary["classes"]) == classes
    assert (summary["height"], summary["width"]) == (height, width)
    assert set(summary["fractions"]) <= set(summary["classes"])
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    fractions = list(summary["fractions"].values())
    assert fractions == sorted(fractions, reverse=True)


def test_good_image_writes_three_files(run_demo, tmp_path: Path, capsys) -> None:
    image = _save(tmp_path / "street.png", _rgb())
    out = tmp_path / "out" / "nested"
    code = run_demo("--input", str(image), "--output", str(out), "--vocab", "cat,dog;puppy,sky")
    assert code == 0, capsys.readouterr().err
    assert _names(out) == ["street.json", "street_labels.png", "street_overlay.png"]
    _check_outputs(out, "street", image, 40, 56, classes=3)
    assert _error_lines(capsys.readouterr().err) == []


def test_corrupt_image_reported_others_done(run_demo, tmp_path: Path, capsys) -> None:
    good = _save(tmp_path / "good.png", _rgb())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    code = run_demo("--input", str(bad), str(good), "--output", str(out), "--vocab", "a,b")
    assert code != 0
    stderr = capsys.readouterr().err
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "bad.jpg" in errors[0]
    assert "Traceback" not in stderr
    assert _names(out) == ["good.json", "good_labels.png", "good_overlay.png"]


@pytest.mark.parametrize("kind", ["16bit", "rgba", "gray"])
def test_unusual_image_modes_work(run_demo, tmp_path: Path, kind: str, capsys) -> None:
    if kind == "16bit":
        image = _save(tmp_path / "deep.png", (_rgb()[..., 0].astype(np.uint16) * 257))
    elif kind == "rgba":
        rgba = np.concatenate([_rgb(), np.full((40, 56, 1), 7, np.uint8)], axis=2)
        image = _save(tmp_path / "alpha.png", rgba, mode="RGBA")
    else:
        image = _save(tmp_path / "gray.png", _rgb()[..., 1], mode="L")
    out = tmp_path / "out"
    code = run_demo("--input", str(image), "--output", str(out), "--vocab", "a,b,c,d")
    assert code == 0, capsys.readouterr().err
    _check_outputs(out, image.stem, image, 40, 56, classes=4)


def test_same_stem_in_two_folders(run_demo, tmp_path: Path, capsys) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        _save(tmp_path / folder / "photo.png", _rgb(seed=ord(folder)))
    out = tmp_path / "out"
    inputs = [str(tmp_path / "x"), str(tmp_path / "y" / "*.png")]
    code = run_demo("--input", *inputs, "--output", str(out), "--vocab", "a,b")
    assert code == 0, capsys.readouterr().err
    summaries = [json.loads((out / f"{s}.json").read_text())["image"] for s in ("photo", "photo_1")]
    assert summaries == [str(tmp_path / "x" / "photo.png"), str(tmp_path / "y" / "photo.png")]
    assert len(list(out.iterdir())) == 6


# ------------------------------------------------------- failures before the model is built


@pytest.mark.parametrize("vocab", [",", "", " ; ", "cat,,dog"])
def test_bad_vocabulary_fails_before_model(no_model, tmp_path: Path, capsys, vocab: str) -> None:
    image = _save(tmp_path / "x.png", _rgb())
    out = tmp_path / "out"
    code = demo.main(_argv(image, out, "--vocab", vocab))
    assert code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert "vocabulary" in stderr
    assert not out.exists()


def test_missing_vocabulary_file(no_model, tmp_path: Path, capsys) -> None:
    code = demo.main(_argv("x.png", tmp_path / "o", "--vocab-file", tmp_path / "classes.txt"))
    assert code == 2
    assert _error_lines(capsys.readouterr().err)[0].endswith(
        "give a text file with one class per line"
    )


def test_input_matching_nothing_fails_before_model(no_model, tmp_path: Path, capsys) -> None:
    code = demo.main(_argv(tmp_path / "*.jpg", tmp_path / "o", "--vocab", "a,b"))
    assert code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "*.jpg" in errors[0]


def test_vocab_and_vocab_file_are_exclusive_and_one_is_required(capsys) -> None:
    base = ["--config-file", "c.yaml", "--input", "x.png", "--output", "o"]
    assert demo.main(base) == 2
    assert demo.main([*base, "--vocab", "a", "--vocab-file", "v.txt"]) == 2
    assert "usage:" in capsys.readouterr().err


# ------------------------------------------------------------------ command-line plumbing


@pytest.mark.parametrize(
    "tail",
    [
        ["--opts", "model.inference.crop", "448"],
        ["model.inference.crop", "448"],
    ],
)
def test_overrides_both_forms_and_device(stand_in, tmp_path: Path, tail: list[str]) -> None:
    image = _save(tmp_path / "x.png", _rgb())
    code = demo.main(_argv(image, tmp_path / "o", "--vocab", "a,b", "--device", "cpu", *tail))
    assert code == 0
    assert stand_in["overrides"] == ["model.device", "cpu", "model.inference.crop", "448"]


def test_default_device(stand_in, tmp_path: Path) -> None:
    image = _save(tmp_path / "x.png", _rgb())
    demo.main(_argv(image, tmp_path / "o", "--vocab", "a"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert stand_in["overrides"] == ["model.device", expected]


def test_interrupt_exits_130_without_partial_outputs(
    stand_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    first = _save(tmp_path / "a.png", _rgb())
    second = _save(tmp_path / "b.png", _rgb(seed=1))
    out = tmp_path / "out"
    original = demo.write_json

    def interrupted_on_b(path, obj):
        if Path(path).name == "b.json":
            raise KeyboardInterrupt
        original(path, obj)

    monkeypatch.setattr(demo, "write_json", interrupted_on_b)
    code = demo.main(_argv([first, second], out, "--vocab", "a,b", "--device", "cpu"))
    assert code == 130
    assert "Traceback" not in capsys.readouterr().err
    # a's outputs are complete; b's two PNGs were written but removed with the failed JSON
    assert _names(out) == ["a.json", "a_labels.png", "a_overlay.png"]


def test_unwritable_output_is_one_error(
    stand_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    image = _save(tmp_path / "x.png", _rgb())
    out = tmp_path / "out"

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "write_json", disk_full)
    code = demo.main(_argv(image, out, "--vocab", "a,b", "--device", "cpu"))
    assert code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert list(out.iterdir()) == []


def test_output_is_a_file(no_model, tmp_path: Path, capsys) -> None:
    image = _save(tmp_path / "x.png", _rgb())
    (tmp_path / "taken").write_text("")
    code = demo.main(_argv(image, tmp_path / "taken", "--vocab", "a"))
    assert code == 2
    assert "cannot create output directory" in _error_lines(capsys.readouterr().err)[0]


def test_output_stems() -> None:
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("x_1.jpg"), Path("c/X.jpg"), Path("y.png")]
    assert demo.output_stems(paths) == ["x", "x_1", "x_1_1", "X_2", "y"]
