"""Tests of ovseg.text: templates, vocabulary rules, the text classifier and its cache."""

from __future__ import annotations

import ast
import hashlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError, VocabularyError
from ovseg.text import (
    TEMPLATE_SETS,
    Vocabulary,
    as_vocabulary,
    build_text_classifier,
    get_templates,
    max_over_synonyms,
    parse_vocabulary,
    read_vocabulary_file,
    text_cache_dir,
)

FIXTURE_VOCABULARY = (("sky", "wall"), ("cat",), ("dog",), ("car",))
_SHARED_FIXTURES = [
    parent / "shared" / "fixtures" / "dense_clip" for parent in Path(__file__).resolve().parents
]


class FakeTextEncoder:
    """Deterministic stand-in for a CLIP text tower: a prompt's embedding is seeded by its hash.

    Counts calls and records each call's batch size. Embeddings are scaled by a per-prompt
    factor so that forgetting the first normalisation changes the result.
    """

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.calls = 0
        self.batch_sizes: list[int] = []

    def embed_one(self, prompt: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        scale = 0.5 + 4.0 * torch.rand((), generator=generator)
        return scale * torch.randn(self.dim, generator=generator)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        self.batch_sizes.append(len(prompts))
        return torch.stack([self.embed_one(p) for p in prompts])


# ---------------------------------------------------------------- templates


def test_template_counts() -> None:
    assert len(get_templates("openai_imagenet")) == 80
    assert len(get_templates("vild")) == 14
    assert get_templates("single") == ["a photo of a {}."]
    assert len(get_templates("maskclip")) == 85  # the 80 plus MaskCLIP's 5 "... in the scene"
    assert get_templates("maskclip")[:80] == get_templates("openai_imagenet")
    assert set(TEMPLATE_SETS) == {"openai_imagenet", "vild", "single", "maskclip"}
    for templates in TEMPLATE_SETS.values():
        assert all(t.count("{}") == 1 for t in templates)
        assert len(set(templates)) == len(templates)


def test_openai_templates_match_open_clip() -> None:
    open_clip = pytest.importorskip("open_clip")
    expected = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert get_templates("openai_imagenet") == expected


def test_get_templates_returns_a_copy() -> None:
    templates = get_templates("single")
    templates.append("x {}")
    assert get_templates("single") == ["a photo of a {}."]


def test_unknown_template_set_names_valid_ones() -> None:
    with pytest.raises(ConfigError, match="openai_imagenet") as info:
        get_templates("openai")
    assert isinstance(info.value, ValueError)
    assert "vild" in str(info.value) and "single" in str(info.value)


# ---------------------------------------------------------------- vocabulary


def test_parse_inline_vocabulary() -> None:
    vocab = parse_vocabulary(" person ; man;woman,dog ,  sky ")
    assert vocab.classes == (("person", "man", "woman"), ("dog",), ("sky",))
    assert vocab.class_names == ["person", "dog", "sky"]
    assert vocab.names == ["person", "man", "woman", "dog", "sky"]
    assert vocab.name_to_class.dtype == torch.long
    assert vocab.name_to_class.tolist() == [0, 0, 0, 1, 2]
    assert vocab.num_classes == len(vocab) == 3


def test_vocabulary_keeps_order_and_case_of_first_occurrence() -> None:
    vocab = as_vocabulary(["Sky", "cat", "dog"])
    assert vocab.class_names == ["Sky", "cat", "dog"]


def test_duplicates_removed_stably_case_and_whitespace_insensitive() -> None:
    # "Person" repeats class 0's name; "TV monitor" repeats "tv monitor" so its class goes
    with pytest.warns(UserWarning, match="dropped"):
        vocab = as_vocabulary(
            [["person", "man"], ["dog", "Person", "tv  monitor"], [" TV monitor "], ["cat"]]
        )
    assert vocab.classes == (("person", "man"), ("dog", "tv monitor"), ("cat",))
    assert vocab.name_to_class.tolist() == [0, 0, 1, 1, 2]
    assert parse_vocabulary("cat;Cat;kitty, dog").classes == (("cat", "kitty"), ("dog",))


def test_constructor_applies_the_same_rules() -> None:
    vocab = Vocabulary((("cat",), ("Cat", "kitty")))
    assert vocab.classes == (("cat",), ("kitty",))
    assert Vocabulary((("cat",), ("dog",))) == parse_vocabulary("cat, dog")
    assert hash(Vocabulary((("cat",),))) == hash(parse_vocabulary("cat"))
    with pytest.raises(VocabularyError):
        Vocabulary(())


def test_as_vocabulary_forms() -> None:
    expected = Vocabulary((("person", "man"), ("dog",)))
    assert as_vocabulary(expected) is expected
    assert as_vocabulary("person;man, dog") == expected
    assert as_vocabulary([["person", "man"], "dog"]) == expected
    assert as_vocabulary((("person", "man"), ("dog",))) == expected
    # a list of strings is one class per string, separators are not parsed there
    assert as_vocabulary(["person;man", "dog"]).class_names == ["person;man", "dog"]
    with pytest.raises(VocabularyError):
        as_vocabulary(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("cat,,dog", "class 2"),
        ("cat, dog, ", "class 3"),
        ("person;;man, dog", "class 1, name 2"),
        ("cat, dog; ", "class 2, name 2"),
    ],
)
def test_empty_entry_names_its_position(text: str, position: str) -> None:
    with pytest.raises(VocabularyError, match=position):
        parse_vocabulary(text)


def test_empty_entry_in_list_names_its_position() -> None:
    with pytest.raises(VocabularyError, match="class 2, name 1"):
        as_vocabulary([["cat"], ["  ", "dog"]])
    with pytest.raises(VocabularyError, match="class 3"):
        as_vocabulary(["cat", "dog", ""])
    with pytest.raises(VocabularyError, match="class 1"):
        as_vocabulary([[]])


@pytest.mark.parametrize("empty", ["", "   ", [], ()])
def test_empty_vocabulary_is_an_error(empty) -> None:
    with pytest.raises(VocabularyError, match="empty"):
        as_vocabulary(empty)


def test_vocabulary_files_in_both_syntaxes(tmp_path: Path) -> None:
    comma = tmp_path / "names_comma.txt"
    semicolon = tmp_path / "names_semicolon.txt"
    comma.write_text("sky, wall\ncat\ndog\ncar\n")
    semicolon.write_text("sky; wall\ncat\ndog\ncar\n")
    assert read_vocabulary_file(comma).classes == FIXTURE_VOCABULARY
    assert read_vocabulary_file(semicolon) == read_vocabulary_file(comma)
    assert as_vocabulary(comma) == read_vocabulary_file(comma)


def test_shared_fixture_files_parse_equal() -> None:
    folder = next((f for f in _SHARED_FIXTURES if (f / "names_comma.txt").is_file()), None)
    if folder is None:
        pytest.skip("shared/fixtures/dense_clip is not in this checkout")
    comma = read_vocabulary_file(folder / "names_comma.txt")
    semicolon = read_vocabulary_file(folder / "names_semicolon.txt")
    assert comma == semicolon
    assert comma.classes == FIXTURE_VOCABULARY


def test_vocabulary_file_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\r\n\r\nsky, wall\r\n\n  # indented comment\ncat\n\n\n")
    assert read_vocabulary_file(path).classes == (("sky", "wall"), ("cat",))


def test_vocabulary_file_empty_name_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("sky\n\ncat,,dog\n")
    with pytest.raises(VocabularyError, match=r"class 2 \(file .*classes\.txt, line 3\), name 2"):
        read_vocabulary_file(path)
    path.write_text("sky, \ncat\n")
    with pytest.raises(VocabularyError, match="line 1"):
        read_vocabulary_file(path)


def test_vocabulary_file_errors(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="does not exist"):
        read_vocabulary_file(tmp_path / "missing.txt")
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n")
    with pytest.raises(VocabularyError, match="no class names"):
        read_vocabulary_file(path)


# ---------------------------------------------------------------- max over synonyms


def test_max_over_synonyms_hand_computed() -> None:
    scores = torch.tensor([[0.1, 0.7], [0.5, 0.2], [0.3, 0.05], [0.1, 0.05]])
    name_to_class = torch.tensor([0, 0, 1, 2])
    out = max_over_synonyms(scores, name_to_class, 3)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0.5, 0.7], [0.3, 0.05], [0.1, 0.05]]))


def test_max_over_synonyms_any_trailing_shape() -> None:
    vocab = parse_vocabulary("a;b;c, d, e;f")
    scores = torch.randn(len(vocab.names), 2, 3, 5)
    out = max_over_synonyms(scores, vocab.name_to_class, vocab.num_classes)
    assert out.shape == (3, 2, 3, 5)
    expected = torch.stack([scores[0:3].amax(0), scores[3], scores[4:6].amax(0)])
    assert torch.equal(out, expected)
    assert max_over_synonyms(scores[:, 0, 0, 0], vocab.name_to_class, 3).shape == (3,)
    with pytest.raises(ValueError, match="name_to_class"):
        max_over_synonyms(scores, vocab.name_to_class[:-1], 3)


def test_synonym_max_of_probabilities_matches_per_class_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = parse_vocabulary("background;sky;wall;floor, person;man;woman, cat, tv;monitor")
    logits = 40.0 * torch.randn(len(vocab.names), 7, 9, generator=generator)
    probs = logits.softmax(dim=0)
    class_probs = max_over_synonyms(probs, vocab.name_to_class, vocab.num_classes)
    assert torch.equal(class_probs.argmax(0), vocab.name_to_class[probs.argmax(0)])


def test_max_over_synonyms_keeps_gradients() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0], requires_grad=True)
    max_over_synonyms(scores, torch.tensor([0, 0, 1]), 2).sum().backward()
    assert scores.grad.tolist() == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------- text classifier


def _direct_classifier(
    encoder: FakeTextEncoder, names: list[str], templates: list[str]
) -> torch.Tensor:
    rows = []
    for name in names:
        embeddings = torch.stack([encoder.embed_one(t.format(name)) for t in templates])
        rows.append(F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def test_classifier_equals_direct_computation(tmp_path: Path) -> None:
    encoder = FakeTextEncoder()
    names = ["sky", "wall", "cat"]
    templates = get_templates("vild")
    out = build_text_classifier(encoder, names, templates, model_id="fake", use_cache=False)
    assert out.shape == (3, encoder.dim) and out.dtype == torch.float32
    assert out.device.type == "cpu" and not out.requires_grad
    torch.testing.assert_close(out, _direct_classifier(encoder, names, templates))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_classifier_batches_across_names_and_ignores_batch_size() -> None:
    names = ["sky", "wall", "cat", "dog", "car"]
    templates = get_templates("vild")  # 5 x 14 = 70 prompts
    results = {}
    for batch_size in (1, 3, 14, 32, 1000):
        encoder = FakeTextEncoder()
        results[batch_size] = build_text_classifier(
            encoder, names, templates, model_id="fake", batch_size=batch_size, use_cache=False
        )
        assert max(encoder.batch_sizes) <= batch_size
        assert sum(encoder.batch_sizes) == 70
        assert encoder.calls == -(-70 // batch_size)
    for out in results.values():
        torch.testing.assert_close(out, results[1], rtol=0, atol=1e-6)


def test_classifier_keeps_synonyms_as_rows() -> None:
    vocab = parse_vocabulary("person;man, dog")
    out = build_text_classifier(
        FakeTextEncoder(), vocab.names, ["a {}."], model_id="fake", use_cache=False
    )
    assert out.shape[0] == len(vocab.names) == 3


def test_classifier_input_errors() -> None:
    encoder = FakeTextEncoder()
    with pytest.raises(VocabularyError):
        build_text_classifier(encoder, [], ["a {}."], model_id="fake", use_cache=False)
    with pytest.raises(ConfigError):
        build_text_classifier(encoder, ["cat"], [], model_id="fake", use_cache=False)
    with pytest.raises(ConfigError, match="exactly once"):
        build_text_classifier(encoder, ["cat"], ["a photo"], model_id="fake", use_cache=False)
    with pytest.raises(ConfigError, match="batch_size"):
        build_text_classifier(
            encoder, ["cat"], ["a {}."], model_id="fake", batch_size=0, use_cache=False
        )
    assert encoder.calls == 0


def test_classifier_output_is_usable_in_autograd() -> None:
    out = build_text_classifier(
        FakeTextEncoder(), ["cat", "dog"], ["a {}."], model_id="fake", use_cache=False
    )
    features = torch.randn(4, out.shape[1], requires_grad=True)
    (features @ out.T).sum().backward()
    assert features.grad is not None


# ---------------------------------------------------------------- cache


def _cached_files(cache_root: Path) -> list[Path]:
    return sorted((cache_root / "text").glob("*.safetensors"))


def test_cache_hit_skips_encoder_and_returns_identical_tensor(tmp_path: Path) -> None:
    names, templates = ["sky", "cat"], get_templates("single")
    first_encoder, second_encoder = FakeTextEncoder(), FakeTextEncoder()
    first = build_text_classifier(
        first_encoder, names, templates, model_id="fake", cache_dir=tmp_path
    )
    assert first_encoder.calls == 1 and len(_cached_files(tmp_path)) == 1
    second = build_text_classifier(
        second_encoder, names, templates, model_id="fake", cache_dir=tmp_path
    )
    assert second_encoder.calls == 0
    assert torch.equal(first, second) and second.dtype == torch.float32
    # no temp files are left behind
    assert [p.name for p in (tmp_path / "text").iterdir()] == [_cached_files(tmp_path)[0].name]


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "fake-other-weights"},
        {"templates": ["a photo of the {}."]},
        {"names": ["sky", "dog"]},
        {"names": ["cat", "sky"]},
    ],
)
def test_cache_misses_on_a_different_key(tmp_path: Path, change: dict) -> None:
    base = {"names": ["sky", "cat"], "templates": ["a photo of a {}."], "model_id": "fake"}
    build_text_classifier(FakeTextEncoder(), cache_dir=tmp_path, **base)
    encoder = FakeTextEncoder()
    build_text_classifier(encoder, cache_dir=tmp_path, **{**base, **change})
    assert encoder.calls == 1
    assert len(_cached_files(tmp_path)) == 2


def test_use_cache_false_neither_reads_nor_writes(tmp_path: Path) -> None:
    kwargs = {"names": ["sky"], "templates": ["a {}."], "model_id": "fake", "cache_dir": tmp_path}
    build_text_classifier(FakeTextEncoder(), use_cache=False, **kwargs)
    assert not _cached_files(tmp_path)
    build_text_classifier(FakeTextEncoder(), **kwargs)
    encoder = FakeTextEncoder()
    build_text_classifier(encoder, use_cache=False, **kwargs)
    assert encoder.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_file_is_recomputed_and_rewritten(tmp_path: Path, damage: str) -> None:
    kwargs = {"names": ["sky", "cat"], "templates": ["a {}."], "model_id": "fake"}
    expected = build_text_classifier(FakeTextEncoder(), cache_dir=tmp_path, **kwargs)
    (path,) = _cached_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * len(data))
    else:
        path.write_bytes(b"")
    encoder = FakeTextEncoder()
    out = build_text_classifier(encoder, cache_dir=tmp_path, **kwargs)
    assert encoder.calls == 1
    assert torch.equal(out, expected)
    # rewritten: the next call is a hit again
    encoder = FakeTextEncoder()
    build_text_classifier(encoder, cache_dir=tmp_path, **kwargs)
    assert encoder.calls == 0


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path / "env"))
    assert text_cache_dir() == tmp_path / "env" / "text"
    assert text_cache_dir(tmp_path / "arg") == tmp_path / "arg" / "text"
    build_text_classifier(FakeTextEncoder(), ["sky"], ["a {}."], model_id="fake")
    assert len(_cached_files(tmp_path / "env")) == 1
    monkeypatch.delenv("OVSEG_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert text_cache_dir() == tmp_path / "home" / ".cache" / "ovseg" / "text"


def test_unwritable_cache_dir_warns_once_and_returns(tmp_path: Path) -> None:
    # a file where the cache folder should be: mkdir fails even when running as root
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    kwargs = {"names": ["sky"], "templates": ["a {}."], "model_id": "fake", "cache_dir": blocked}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = build_text_classifier(FakeTextEncoder(), **kwargs)
        second = build_text_classifier(FakeTextEncoder(), **kwargs)
    messages = [str(w.message) for w in caught if "text-classifier cache" in str(w.message)]
    assert len(messages) == 1 and "OVSEG_CACHE" in messages[0]
    assert torch.equal(first, second)


def test_text_package_does_not_import_model_libraries() -> None:
    package = Path(__file__).resolve().parents[1] / "ovseg" / "text"
    forbidden = {"open_clip", "timm", "segment_anything"}
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not {m.split(".")[0] for m in modules} & forbidden, source


def test_building_a_classifier_is_logged_a_cache_hit_is_not(tmp_path: Path, caplog) -> None:
    # the demos and applications show these lines: 80 templates take a minute on a CPU
    names, templates = ["sky", "cat", "dog"], get_templates("openai_imagenet")
    with caplog.at_level("INFO", logger="ovseg.text.classifier"):
        build_text_classifier(FakeTextEncoder(), names, templates, model_id="fake",
                              cache_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "ovseg.text.classifier"]
    assert lines[0] == (f"building the text classifier: 3 names x {len(templates)} prompt "
                        f"templates = {3 * len(templates)} prompts; cached for the next run")
    assert lines[1].startswith("built the text classifier in ") and lines[1].endswith(" s")
    caplog.clear()
    with caplog.at_level("INFO", logger="ovseg.text.classifier"):
        build_text_classifier(FakeTextEncoder(), names, templates, model_id="fake",
                              cache_dir=tmp_path)
    assert [r for r in caplog.records if r.name == "ovseg.text.classifier"] == []
