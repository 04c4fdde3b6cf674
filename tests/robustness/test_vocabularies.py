"""Vocabularies users write: class files that are not UTF-8, empty names, duplicates, entries
that are not names, and very long vocabularies (issue 23, reliability).

The rules are ``ovseg/text/vocabulary.py``'s: an empty name or an empty vocabulary is one
VocabularyError line saying where; a name repeated (case-insensitively) is dropped, and a class
left without names is dropped with a warning (the class indices after it shift); UTF-8 with or
without a byte-order mark and UTF-16 with one are read.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.errors import VocabularyError
from ovseg.text.vocabulary import as_vocabulary, read_vocabulary_file
from tests.helpers import load_script
from tests.robustness.scripts import one_error_line

BAD_FILES = {
    # name: (file bytes, text the message holds)
    "file-latin1": ("cat\ncafé table\n".encode("latin-1"),
                    "is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
    "file-binary": (b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8 text (byte 0x89 on line 1)"),
    "file-empty": (b"", "has no class names"),
    "file-only-comments": (b"# classes\n\n   \n# none yet\n", "has no class names"),
    "file-empty-synonym": (b"cat\ndog,,puppy\n", "class 2 (file {path}, line 2), name 2 of the "
                           "vocabulary is empty"),
}


@pytest.mark.parametrize("fault", list(BAD_FILES), ids=list(BAD_FILES))
def test_a_bad_class_file_is_one_line(tmp_path, fault):
    data, expected = BAD_FILES[fault]
    path = tmp_path / "classes.txt"
    path.write_bytes(data)
    with pytest.raises(VocabularyError) as info:
        read_vocabulary_file(path)
    message = str(info.value)
    assert expected.format(path=path) in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "encoding", ["utf-8-sig", "utf-16"], ids=["utf8-with-bom", "utf16-with-bom"]
)
def test_class_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "classes.txt"
    path.write_bytes("café table\nsky;heaven\n".encode(encoding))
    assert read_vocabulary_file(path).classes == (("café table",), ("sky", "heaven"))


BAD_VOCABULARIES = {
    "inline-empty": ("", "the vocabulary is empty"),
    "inline-blank": ("  \t ", "the vocabulary is empty"),
    "inline-double-comma": ("cat,,dog", "class 2 of the vocabulary is empty"),
    "inline-trailing-comma": ("cat, dog,", "class 3 of the vocabulary is empty"),
    "inline-empty-synonym": ("cat; ;kitty, dog", "class 1, name 2 of the vocabulary is empty"),
    "list-empty": ([], "the vocabulary is empty"),
    "list-blank-name": (["cat", "  "], "class 2 of the vocabulary is empty"),
    "list-class-without-names": ([["cat"], []], "class 2 of the vocabulary has no names"),
    "list-none": (["cat", None], "class 2 of the vocabulary is NoneType None"),
    "list-number": ([3], "class 1 of the vocabulary is int 3"),
    "list-bytes": ([b"cat"], "class 1 of the vocabulary is bytes b'cat'"),
    "list-number-synonym": ([["cat", 7]], "class 1, name 2 of the vocabulary is int 7"),
}


@pytest.mark.parametrize("fault", list(BAD_VOCABULARIES), ids=list(BAD_VOCABULARIES))
def test_a_bad_vocabulary_is_one_line_saying_where(fault):
    given, expected = BAD_VOCABULARIES[fault]
    with pytest.raises(VocabularyError) as info:
        as_vocabulary(given)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "classes", "dropped"),
    [
        ("cat, dog, Cat", (("cat",), ("dog",)), "class 3 of the vocabulary (Cat)"),
        ("cat;kitty, kitty, dog", (("cat", "kitty"), ("dog",)), "class 2 of the vocabulary"),
        ("cat;Cat;kitty, dog", (("cat", "kitty"), ("dog",)), None),
        (["sky", " sky ", "SKY"], (("sky",),), "class 2 of the vocabulary (sky)"),
    ],
    ids=["repeated-class", "repeated-synonym-as-class", "repeated-synonym", "repeated-spaced"],
)
def test_duplicate_names_are_dropped_and_a_dropped_class_warns(given, classes, dropped):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vocabulary = as_vocabulary(given)
    assert vocabulary.classes == classes
    messages = [str(w.message) for w in caught]
    if dropped is None:
        assert messages == []
    else:
        assert any(dropped in m and "indices of the classes after it shift" in m
                   for m in messages)


def test_the_demo_says_a_bad_class_file_in_one_line(tmp_path, capsys):
    demo = load_script("demo/demo.py")
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    vocab = tmp_path / "classes.txt"
    vocab.write_bytes("cat\ncafé\n".encode("latin-1"))
    out = tmp_path / "out"
    code = demo.main(["--config-file", "configs/tiny/dense_clip_tiny.yaml", "--input",
                      str(image), "--output", str(out), "--vocab-file", str(vocab)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"vocabulary file {vocab} is not UTF-8 text (byte 0xe9 on line 2)" in line
    assert not out.exists()  # checked before anything is built or written


def test_a_vocabulary_of_5000_classes_works_in_bounded_batches(monkeypatch):
    # whole-image inference at a small size: the cost under test is the vocabulary's
    model = ovseg.build_model(ovseg.get_config("tiny/dense_clip_tiny.yaml", [
        "model.inference.short_side", "32", "model.inference.crop", "0"]))
    clip = model.text_classifier.clip
    batches: list[int] = []
    width = clip.encode_text(["a cat"]).shape[1]
    generator = torch.Generator().manual_seed(0)

    def encode_text(prompts):
        # a stand-in for the text tower (5000 real forwards take minutes on a busy CPU)
        batches.append(len(prompts))
        return torch.randn(len(prompts), width, generator=generator)

    monkeypatch.setattr(clip, "encode_text", encode_text)
    names = [f"object number {index}" for index in range(5000)]
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
    prediction = model.predict(image, names)
    assert len(prediction.classes) == 5000 and prediction.labels.shape == (24, 32)
    assert 0 <= prediction.labels.min() and prediction.labels.max() < 5000
    # the text encoder sees a bounded batch at a time, never all 5000 prompts at once
    assert sum(batches) == 5000 and max(batches) <= 256
