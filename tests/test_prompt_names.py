"""The references' own class-name files (``text.prompt_names``): content, order, selection."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

import ovseg
from ovseg.data import catalog
from ovseg.data.catalog import (
    DatasetError,
    class_names,
    class_vocabulary,
    get_benchmark,
    prompt_name_sets,
    register_custom_dataset,
    unregister_custom_dataset,
)
from ovseg.methods.dense_clip import DenseClip
from ovseg.text import read_vocabulary_file
from tests.fixtures.builders import build_voc
from tests.helpers import REPO_ROOT, load_script

BENCHMARKS = (
    "voc_21", "voc_20", "pcontext_60", "pcontext_59", "coco_object_81", "coco_stuff_171",
    "cityscapes_19", "ade20k_150",
)  # fmt: skip
SETS = ("sclip", "proxyclip")
# every file shipped per set: SCLIP/NACLIP's 8; ProxyCLIP's 8 plus ADE-847 and Context-459;
# MaskCLIP's own four (plain names, no background); CLIP-DINOiser's three with a background
SHIPPED_FILES = {
    "sclip": BENCHMARKS,
    "proxyclip": (*BENCHMARKS, "ade20k_847", "pcontext_459"),
    "maskclip": ("voc_20", "pcontext_59", "coco_stuff_171", "cityscapes_19"),
    # CLIP-DINOiser's: the catalog's names with the literal "background" as class 0
    "clip_dinoiser": ("voc_21", "coco_object_81", "pcontext_60"),
}
SHIPPED = [(s, b) for s, benchmarks in SHIPPED_FILES.items() for b in benchmarks]

# the references' spellings of our class names (after _squash), per benchmark family: VOC's
# "boat" is "ship" and "diningtable" "table" there; SCLIP's tv monitor line starts with
# "television monitor"
SPELLING_VARIANTS = {
    "voc": {"ship": "boat", "table": "diningtable", "televisionmonitor": "tvmonitor"},
}

SCLIP_PERSON = (
    "person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
    "person in skirt", "person in jacket",
)  # fmt: skip
SCLIP_TV = ("television monitor", "tv monitor", "monitor", "television", "screen")


def _squash(name: str) -> str:
    # SCLIP's COCO-Stuff / ADE / Cityscapes files drop spaces ("trafficlight"), ours keep them
    return re.sub(r"[\s\-]", "", name.casefold())


def _maskclip_spelling(name: str) -> str:
    """Our class name as MaskCLIP writes it: "airplane"; COCO-Stuff's "wall-other" is "wall",
    "desk-stuff" "desk", "floor-wood" "wood floor"."""
    if name == "aeroplane":
        return "airplane"
    head, _, tail = name.partition("-")
    if not tail or tail in ("other", "stuff"):
        return head
    return f"{tail} {head}"


def _prompt_file(prompt_set: str, benchmark: str) -> Path:
    return catalog.PROMPTS_DIR / prompt_set / f"{benchmark}.txt"


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    # a user's $OVSEG_DATASETS must not leak into the tests
    monkeypatch.delenv("OVSEG_DATASETS", raising=False)


# --------------------------------------------------------------------------- the files


def test_both_sets_ship_a_file_for_every_benchmark():
    assert prompt_name_sets() == sorted(SHIPPED_FILES)
    for prompt_set, benchmarks in SHIPPED_FILES.items():
        shipped = sorted(p.stem for p in (catalog.PROMPTS_DIR / prompt_set).glob("*.txt"))
        assert shipped == sorted(benchmarks)


@pytest.mark.parametrize(("prompt_set", "benchmark_name"), SHIPPED)
def test_every_file_parses_to_the_benchmark_class_count(prompt_set, benchmark_name):
    with warnings.catch_warnings():
        # a dropped class (a line whose names all appeared earlier) warns: none may
        warnings.simplefilter("error")
        vocabulary = read_vocabulary_file(_prompt_file(prompt_set, benchmark_name))
        selected = class_vocabulary(benchmark_name, prompt_set)
    assert vocabulary.num_classes == get_benchmark(benchmark_name).num_classes
    assert selected == vocabulary


@pytest.mark.parametrize(("prompt_set", "benchmark_name"), SHIPPED)
def test_no_name_is_dropped_by_the_vocabulary_rule(prompt_set, benchmark_name):
    # every name written in the file reaches the text classifier
    text = _prompt_file(prompt_set, benchmark_name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    written = [name.strip() for line in lines for name in line.split(", ")]
    assert class_vocabulary(benchmark_name, prompt_set).names == written


@pytest.mark.parametrize(("prompt_set", "benchmark_name"), SHIPPED)
def test_class_order_agrees_with_the_catalog(prompt_set, benchmark_name):
    info = get_benchmark(benchmark_name)
    ours = class_names(benchmark_name)
    theirs = class_vocabulary(benchmark_name, prompt_set).class_names
    variants = SPELLING_VARIANTS.get(benchmark_name.split("_")[0], {})
    if prompt_set == "maskclip":
        ours = [_maskclip_spelling(name) for name in ours]
    start = 0
    if info.has_background:
        # class 0 is the background line: the word itself or a list of stuff names
        assert ours[0] == "background"
        start = 1
    for index in range(start, info.num_classes):
        first = _squash(theirs[index])
        assert variants.get(first, first) == _squash(ours[index]), (index, theirs[index])


def test_voc21_background_and_person_names():
    sclip = class_vocabulary("voc_21", "sclip")
    proxy = class_vocabulary("voc_21", "proxyclip")
    person = class_names("voc_21").index("person")
    tv = class_names("voc_21").index("tvmonitor")
    for vocabulary in (sclip, proxy):
        assert len(vocabulary.classes[0]) == 26
        assert vocabulary.classes[0][:3] == ("sky", "wall", "tree")
    assert sclip.classes[person] == SCLIP_PERSON
    assert sclip.classes[tv] == SCLIP_TV
    assert proxy.classes[person] == ("person",)
    assert proxy.classes[tv] == ("tvmonitor",)
    # the 20 objects of VOC-20 are VOC-21's, in the same order
    for prompt_set in SETS:
        voc21 = class_vocabulary("voc_21", prompt_set).classes[1:]
        assert class_vocabulary("voc_20", prompt_set).classes == voc21


def test_coco_object_background_keeps_bed_with_its_class():
    bed = class_names("coco_object_81").index("bed")
    sclip = class_vocabulary("coco_object_81", "sclip")
    proxy = class_vocabulary("coco_object_81", "proxyclip")
    # the references list 26 / 17 background names, "bed" among them; it stays with the bed
    assert len(sclip.classes[0]) == 25 and len(proxy.classes[0]) == 16
    for vocabulary in (sclip, proxy):
        assert "bed" not in vocabulary.classes[0]
        assert vocabulary.classes[bed] == ("bed",)
    assert sclip.classes[1] == (*SCLIP_PERSON, "body")
    assert proxy.classes[1] == ("person",)


def test_context60_background_is_the_single_word():
    for prompt_set in SETS:
        assert class_vocabulary("pcontext_60", prompt_set).classes[0] == ("background",)


# --------------------------------------------------------------------------- selection


def test_no_set_keeps_the_catalog_vocabulary():
    assert class_vocabulary("voc_21", "") == class_vocabulary("voc_21")
    assert class_vocabulary("voc_21").classes[1:] == tuple(
        (name,) for name in class_names("voc_21")[1:]
    )


def test_unknown_set_is_an_error_listing_the_sets():
    with pytest.raises(DatasetError) as error:
        class_vocabulary("voc_21", "clipper")
    message = str(error.value)
    assert "'clipper'" in message and "'voc_21'" in message
    assert "proxyclip" in message and "sclip" in message


def test_a_path_is_not_a_set():
    with pytest.raises(DatasetError, match="not a prompt-name set"):
        class_vocabulary("voc_21", "../prompts/sclip")


def test_set_without_a_file_for_the_benchmark_is_an_error():
    with pytest.raises(DatasetError) as error:
        class_vocabulary("ade20k_847", "sclip")
    message = str(error.value)
    assert "'sclip'" in message and "'ade20k_847'" in message and "proxyclip" in message


def test_file_with_another_class_count_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "voc_20.txt").write_text("aeroplane\nbicycle\n", encoding="utf-8")
    monkeypatch.setattr(catalog, "PROMPTS_DIR", tmp_path)
    with pytest.raises(DatasetError, match="2 classes; benchmark 'voc_20' has 20"):
        class_vocabulary("voc_20", "short")


def test_custom_dataset_ignores_the_set(tmp_path):
    (tmp_path / "classes.txt").write_text("road\ncar\n", encoding="utf-8")
    register_custom_dataset("prompt_names_toy", "images", "labels", "classes.txt", root=tmp_path)
    try:
        assert class_vocabulary("prompt_names_toy", "sclip").classes == (("road",), ("car",))
    finally:
        unregister_custom_dataset("prompt_names_toy")


def test_method_configs_select_their_reference_files():
    expected = {
        "configs/dense_clip/sclip/voc_21.yaml": "sclip",
        "configs/dense_clip/naclip/voc_21.yaml": "sclip",
        "configs/dense_clip/maskclip/voc_21.yaml": "sclip",
        "configs/dense_clip/proxyclip/voc_21.yaml": "proxyclip",
        "configs/trident/voc_21.yaml": "proxyclip",
        "configs/trident/voc_21_vith14.yaml": "proxyclip",
        "configs/dense_clip/vanilla_vitb16.yaml": "",
    }
    for path, prompt_set in expected.items():
        assert ovseg.get_config(str(REPO_ROOT / path)).text.prompt_names == prompt_set, path


# --------------------------------------------------------------------------- the eval runner


def _load_train_net():
    return load_script("tools/train_net.py")


def test_eval_only_prompts_with_the_selected_set(tmp_path, monkeypatch, restore_ovseg_logging):
    root = tmp_path / "datasets"
    build_voc(root)
    seen = []
    original = DenseClip.predict

    def recording_predict(self, image, vocabulary):
        seen.append(vocabulary)
        return original(self, image, vocabulary)

    monkeypatch.setattr(DenseClip, "predict", recording_predict)
    output = tmp_path / "out"
    status = _load_train_net().main([
        "--config-file", str(REPO_ROOT / "configs" / "tiny" / "dense_clip_tiny.yaml"),
        "--eval-only", "text.prompt_names", "sclip", "datasets.test", "[voc_21]",
        "datasets.root", str(root), "output_dir", str(output),
    ])  # fmt: skip
    assert status == 0
    assert len(seen) == 3  # one process: every image here
    person = class_names("voc_21").index("person")
    for vocabulary in seen:
        assert vocabulary == class_vocabulary("voc_21", "sclip")
        assert vocabulary.classes[person] == SCLIP_PERSON
    results = json.loads((output / "voc_21" / "results.json").read_text(encoding="utf-8"))
    # the table keeps the catalog's class names, not the prompts' first names
    assert list(results["per_class"]) == class_names("voc_21")
