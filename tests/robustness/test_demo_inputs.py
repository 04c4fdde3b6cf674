"""The demo's bad inputs and what it prints (issue 23): each mistake is one ``error:`` line and
a documented exit status, nothing is left behind by a run that stops, an unreadable image among
good ones is skipped with a line (exit 1, the good ones written), and a run says what it writes
and when it builds text classifiers.

Decisions: an input that names nothing (a glob matching no image, a folder without images, a
missing file) stops the run before the model is built (exit 2): it is a typo, and finding it
after a minute of model loading would waste the minute. An image that cannot be decoded is only
known when it is read, so it is skipped and reported, and the run goes on.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.methods.base import Prediction
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny" / "dense_clip_tiny.yaml"


def _load_demo():
    return load_script("demo/demo.py")


demo = _load_demo()


class _StripesModel:
    def predict(self, image: np.ndarray, vocabulary) -> Prediction:
        height, width = image.shape[:2]
        classes = list(vocabulary.class_names)
        labels = (np.arange(width)[None, :] * len(classes) // width).repeat(height, axis=0)
        return Prediction(labels=labels.astype(np.int64), classes=classes,
                          scores=torch.zeros(len(classes), height, width),
                          to_probabilities=lambda band: band)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ovseg, "get_config", lambda path, overrides=(): {"path": path})
    monkeypatch.setattr(ovseg, "build_model", lambda cfg: _StripesModel())


def _image(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)).save(path)
    return path


def _run(*inputs, output: Path, vocab: str = "cat,dog", extra=()) -> int:
    return demo.main(["--config-file", str(TINY), "--device", "cpu", "--input",
                      *map(str, inputs), "--output", str(output), "--vocab", vocab, *extra])


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _one_error(capsys) -> str:
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------- mistakes that stop before the model build


def _make_input(tmp_path: Path, kind: str) -> list[str]:
    good = str(_image(tmp_path / "good.png"))
    if kind == "glob-matching-nothing":
        return [str(tmp_path / "photos" / "*.jpg")]
    if kind == "glob-matching-nothing-beside-a-good-image":
        return [good, str(tmp_path / "*.jpeg")]
    if kind == "folder-without-images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        return [str(tmp_path / "empty")]
    if kind == "missing-file":
        return [good, str(tmp_path / "missing.png")]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["glob-matching-nothing",
                                  "glob-matching-nothing-beside-a-good-image",
                                  "folder-without-images", "missing-file"])
def test_an_input_naming_nothing_is_one_line(no_model, tmp_path, capsys, kind: str) -> None:
    inputs = _make_input(tmp_path, kind)
    out = tmp_path / "out"
    assert _run(*inputs, output=out) == 2
    line = _one_error(capsys)
    assert inputs[-1] in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ("", "the vocabulary is empty"),
        ("   ", "the vocabulary is empty"),
        (",", "has separators but no class names"),
        (" ; , ;", "has separators but no class names"),
        ("cat,,dog", "class 2 of the vocabulary is empty"),
    ],
    ids=["empty", "blank", "comma-only", "separators-only", "empty-entry"],
)
def test_bad_vocabulary_is_one_line(no_model, tmp_path, capsys, vocab: str, message: str) -> None:
    out = tmp_path / "out"
    assert _run(_image(tmp_path / "x.png"), output=out, vocab=vocab) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("content", "message"),
                         [("", "has no class names"), ("# a comment\n\n", "has no class names"),
                          (",\n;\n", "of the vocabulary is empty")],
                         ids=["empty-file", "comments-only", "separators-only"])
def test_bad_vocabulary_file_is_one_line(no_model, tmp_path, capsys, content, message) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text(content)
    out = tmp_path / "out"
    code = demo.main(["--config-file", str(TINY), "--input", str(_image(tmp_path / "x.png")),
                      "--output", str(out), "--vocab-file", str(classes)])
    assert code == 2
    line = _one_error(capsys)
    assert message in line and str(classes) in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["output-is-a-file", "output-inside-a-file"])
def test_output_that_cannot_be_a_folder_is_one_line(no_model, tmp_path, capsys, kind) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    out = taken if kind == "output-is-a-file" else taken / "sub"
    assert _run(_image(tmp_path / "x.png"), output=out) == 2
    line = _one_error(capsys)
    assert "cannot create output directory" in line and str(taken) in line
    assert taken.read_text() == ""


def test_bad_prompts_stop_before_the_model(no_model, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert _run(_image(tmp_path / "x.png"), output=out, extra=["--boxes", "1,2,3"]) == 2
    assert "each needs 4 numbers" in _one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("override", [["model.clip.weights", "/nonexistent/clip.pt"],
                                      ["model.inference.crops", "64"]],
                         ids=["missing-weights", "misspelt-key"])
def test_failed_model_build_leaves_no_output_folder(tmp_path, capsys, override) -> None:
    out = tmp_path / "out" / "nested"
    assert _run(_image(tmp_path / "x.png"), output=out, extra=override) == 2
    _one_error(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------- images that fail among good ones


def test_unreadable_images_are_skipped_and_reported(stand_in, tmp_path, capsys) -> None:
    first, last = _image(tmp_path / "a.png"), _image(tmp_path / "d.png", seed=1)
    (tmp_path / "b.png").write_bytes(b"")  # empty
    (tmp_path / "c.png").write_text("not a picture")
    out = tmp_path / "out"
    assert _run(tmp_path / "*.png", output=out) == 1
    captured = capsys.readouterr()
    assert _lines(captured.out) == [
        f"{first} -> {out / 'a_labels.png'}, {out / 'a_overlay.png'}, {out / 'a.json'}",
        f"{last} -> {out / 'd_labels.png'}, {out / 'd_overlay.png'}, {out / 'd.json'}",
    ]
    err = _lines(captured.err)
    assert [line.split(":")[0] for line in err] == ["error", "error", "2 of 4 images failed"]
    assert "b.png" in err[0] and "c.png" in err[1]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a_labels.png", "a_overlay.png", "d.json", "d_labels.png", "d_overlay.png"]


def test_a_folder_input_takes_its_images_not_its_subfolders(stand_in, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    (folder / "inner").mkdir(parents=True)
    _image(folder / "x.png")
    _image(folder / "inner" / "y.png")
    (folder / "readme.txt").write_text("skipped: no image extension")
    out = tmp_path / "out"
    assert _run(folder, output=out) == 0
    assert _lines(capsys.readouterr().out) == [
        f"{folder / 'x.png'} -> {out / 'x_labels.png'}, {out / 'x_overlay.png'}, "
        f"{out / 'x.json'}"]


# ------------------------------------------------------------------------ what it prints


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("count", [1, 3])
def test_progress_bar_only_for_several_images_on_a_terminal(
    stand_in, tmp_path, monkeypatch, count: int
) -> None:
    images = [_image(tmp_path / f"{i}.png", seed=i) for i in range(count)]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert _run(*images, output=tmp_path / "out") == 0
    bar = terminal.getvalue()
    assert ("segmenting" in bar and f"{count}/{count}" in bar) == (count > 1)


def test_the_real_model_says_when_it_builds_text_classifiers(tmp_path, capsys) -> None:
    images = [_image(tmp_path / "a.png"), _image(tmp_path / "b.png", seed=1)]
    cache = ["text.cache_dir", str(tmp_path / "text")]
    out = tmp_path / "out"
    assert _run(*images, output=out, vocab="cat,dog;puppy,sky", extra=cache) == 0
    captured = capsys.readouterr()
    assert _lines(captured.err) == [
        "building the text classifier: 4 names x 1 prompt template = 4 prompts; cached for "
        "the next run",
        _lines(captured.err)[1],
    ]
    assert re.fullmatch(r"built the text classifier in \d+\.\d s", _lines(captured.err)[1])
    assert [line.split(" -> ")[0] for line in _lines(captured.out)] == list(map(str, images))
    # a second run finds the classifier in the cache: nothing to say but the images
    assert _run(images[0], output=out, vocab="cat,dog;puppy,sky", extra=cache) == 0
    captured = capsys.readouterr()
    assert _lines(captured.err) == [] and len(_lines(captured.out)) == 1
