"""Tests of the benchmark catalog, the class files and the readers of the real layouts."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.config import get_config
from ovseg.data.catalog import (
    BENCHMARKS,
    DatasetError,
    class_names,
    class_vocabulary,
    datasets_root,
    get_benchmark,
    list_benchmarks,
    load_dataset,
    register_custom_dataset,
    register_from_config,
    unregister_custom_dataset,
)
from ovseg.data.readers import read_label
from ovseg.errors import OvsegError
from ovseg.text import read_vocabulary_file
from tests.fixtures.builders import BUILDERS, build_benchmark, build_voc

EXPECTED_COUNTS = {
    "ade20k_150": 150,
    "ade20k_847": 847,
    "pcontext_59": 59,
    "pcontext_60": 60,
    "pcontext_459": 459,
    "voc_20": 20,
    "voc_21": 21,
    "coco_stuff_171": 171,
    "coco_object_81": 81,
    "cityscapes_19": 19,
    "scannet_20": 20,
}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    # a user's $OVSEG_DATASETS must not leak into the tests
    monkeypatch.delenv("OVSEG_DATASETS", raising=False)


@pytest.fixture
def custom_cleanup():
    names: list[str] = []
    yield names
    for name in names:
        unregister_custom_dataset(name)


# --------------------------------------------------------------------------- class lists


def test_every_benchmark_is_listed_with_its_class_count():
    assert set(EXPECTED_COUNTS) <= set(list_benchmarks())
    for name, count in EXPECTED_COUNTS.items():
        info = get_benchmark(name)
        assert info.name == name
        assert info.num_classes == count
        assert len(class_names(name)) == count
        assert class_vocabulary(name).num_classes == count


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_class_file_parses_to_the_class_count(name):
    info = get_benchmark(name)
    assert info.class_file.is_file()
    with warnings.catch_warnings():
        # a warning here means the vocabulary parser dropped a class and shifted indices
        warnings.simplefilter("error")
        vocabulary = read_vocabulary_file(info.class_file)
    assert vocabulary.num_classes == info.num_classes
    lines = info.class_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == info.num_classes and all(line.strip() for line in lines)
    # no name repeats across lines, so the parser keeps every synonym the file shows
    assert len(vocabulary.names) == sum(len(line.split(",")) for line in lines)


def test_class_orders_match_the_references():
    assert class_names("ade20k_150")[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert class_names("ade20k_150")[-1] == "flag"
    assert class_names("ade20k_847")[:4] == ["wall", "building", "sky", "tree"]
    assert class_names("ade20k_847")[-1] == "adding machine"
    pc59 = class_names("pcontext_59")
    assert pc59[:4] == ["aeroplane", "bag", "bed", "bedclothes"] and pc59[-1] == "wood"
    assert class_names("pcontext_60") == ["background", *pc59]
    pc459 = class_names("pcontext_459")
    # Context-59 is the 459-class list's subset in id order
    assert [pc459.index(c) for c in pc59] == sorted(pc459.index(c) for c in pc59)
    assert class_names("voc_21") == ["background", *class_names("voc_20")]
    stuff = class_names("coco_stuff_171")
    assert stuff[0] == "person" and stuff[79] == "toothbrush" and stuff[80] == "banner"
    assert class_names("coco_object_81") == ["background", *stuff[:80]]
    assert class_names("cityscapes_19")[-1] == "bicycle"
    assert class_names("scannet_20")[-1] == "otherfurniture"


def test_ade847_keeps_every_class_when_names_are_shared():
    names = class_names("ade20k_847")
    vocabulary = class_vocabulary("ade20k_847")
    # 'stool' and 'pot' were also synonyms of 'toilet'; each stays with its own class
    assert "stool" in names and "pot" in names and "flowerpot" in names
    toilet = vocabulary.classes[names.index("toilet")]
    assert "stool" not in toilet and "pot" not in toilet and "commode" in toilet


def test_background_words():
    voc = get_benchmark("voc_21")
    assert voc.has_background and len(voc.background_words) == 26
    assert voc.background_words[:3] == ("sky", "wall", "tree")
    assert class_vocabulary("voc_21").classes[0] == voc.background_words
    assert get_benchmark("pcontext_60").background_words == ("background",)
    assert class_vocabulary("pcontext_60").classes[0] == ("background",)
    # COCO-Object's "bed" is an object class: class 0 leaves it out so that 'bed' survives
    coco = class_vocabulary("coco_object_81")
    assert "bed" not in coco.classes[0] and "sky" in coco.classes[0]
    assert coco.class_names[1:] == class_names("coco_object_81")[1:]
    assert not get_benchmark("voc_20").has_background
    assert get_benchmark("voc_20").background_words is None


def test_unknown_benchmark_suggests_the_close_name():
    with pytest.raises(DatasetError, match="did you mean 'ade20k_150'") as caught:
        get_benchmark("ade20k150")
    assert "voc_21" in str(caught.value) and "cityscapes_19" in str(caught.value)
    assert isinstance(caught.value, OvsegError)


def test_datasets_root_precedence(monkeypatch, tmp_path):
    assert datasets_root() == Path("datasets")
    monkeypatch.setenv("OVSEG_DATASETS", str(tmp_path / "env"))
    assert datasets_root() == tmp_path / "env"
    assert datasets_root("") == tmp_path / "env"
    assert datasets_root(tmp_path / "arg") == tmp_path / "arg"


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiny_layout_reads_back_with_the_mapping(name, tmp_path):
    layout = build_benchmark(name, tmp_path)
    dataset = load_dataset(name, tmp_path)
    assert dataset.info is get_benchmark(name)
    assert len(dataset) == len(layout) == 3
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image_path"] == str(layout.image_paths[i])
        assert sample["label_path"] == str(layout.label_paths[i])
        assert dataset.sample_paths(i) == (layout.image_paths[i], layout.label_paths[i])
        assert sample["image"].dtype == np.uint8 and sample["image"].shape[2] == 3
        np.testing.assert_array_equal(sample["image"], layout.images[i])
        assert sample["label"].dtype == np.int64
        np.testing.assert_array_equal(sample["label"], layout.expected_labels[i])


def test_env_root_is_used(monkeypatch, tmp_path):
    build_benchmark("cityscapes_19", tmp_path)
    monkeypatch.setenv("OVSEG_DATASETS", str(tmp_path))
    assert len(load_dataset("cityscapes_19")) == 3


def test_ade150_reduces_zero_label(tmp_path):
    layout = build_benchmark("ade20k_150", tmp_path)
    label = load_dataset("ade20k_150", tmp_path)[0]["label"]
    stored = layout.stored_labels[0]
    assert (label[stored == 0] == 255).all()
    assert (label[stored == 1] == 0).all() and (label[stored == 150] == 149).all()
    assert label.max() == 255 and set(np.unique(label)) - {255} <= set(range(150))


def test_ade847_keeps_sixteen_bit_values(tmp_path):
    layout = build_benchmark("ade20k_847", tmp_path)
    with Image.open(layout.label_paths[0]) as img:
        assert img.mode.startswith("I;16")
    label = load_dataset("ade20k_847", tmp_path)[0]["label"]
    values = set(np.unique(label).tolist())
    assert {256, 846, 65535} <= values
    np.testing.assert_array_equal(label, layout.stored_labels[0])


def test_pcontext_459_keeps_sixteen_bit_values(tmp_path):
    build_benchmark("pcontext_459", tmp_path)
    label = load_dataset("pcontext_459", tmp_path)[0]["label"]
    assert {256, 458, 65535} <= set(np.unique(label).tolist())


def test_voc20_and_voc21_read_the_same_palette_png(tmp_path):
    layouts = build_voc(tmp_path)
    path = layouts["voc_21"].label_paths[0]
    with Image.open(path) as img:
        assert img.mode == "P"  # stored as palette indices with VOC colours
    voc21 = load_dataset("voc_21", tmp_path)[0]["label"]
    voc20 = load_dataset("voc_20", tmp_path)[0]["label"]
    stored = layouts["voc_21"].stored_labels[0]
    np.testing.assert_array_equal(voc21, stored)  # indices, not colours
    assert {0, 1, 20, 255} <= set(np.unique(voc21).tolist())
    assert (voc20[stored == 0] == 255).all() and (voc20[stored == 255] == 255).all()
    assert (voc20[stored == 20] == 19).all() and (voc20[stored == 1] == 0).all()


def test_pcontext60_shifts_background_up(tmp_path):
    layout = build_benchmark("pcontext_60", tmp_path)
    pc60 = load_dataset("pcontext_60", tmp_path)[0]["label"]
    pc59 = load_dataset("pcontext_59", tmp_path)[0]["label"]
    stored = layout.stored_labels[0]
    assert (pc59[stored == 255] == 255).all()
    assert (pc60[stored == 255] == 0).all() and (pc60[stored == 58] == 59).all()
    assert (pc60[stored == 0] == 1).all()
    assert not (pc60 == 255).any()  # Context-60 counts every pixel


def test_id_list_is_honoured_and_sorted(tmp_path):
    build_benchmark("voc_21", tmp_path)
    build_benchmark("pcontext_59", tmp_path)
    voc = load_dataset("voc_21", tmp_path)
    assert [Path(voc.sample_paths(i)[0]).stem for i in range(len(voc))] == [
        "2007_000033",
        "2007_000042",
        "2007_000061",
    ]  # 2007_000032 is in JPEGImages but not in val.txt
    pc = load_dataset("pcontext_59", tmp_path)
    stems = [Path(pc.sample_paths(i)[0]).stem for i in range(len(pc))]
    assert stems == sorted(stems) and "2008_000999" not in stems


def test_coco_builders_share_images(tmp_path):
    stuff = build_benchmark("coco_stuff_171", tmp_path)
    objects = build_benchmark("coco_object_81", tmp_path)
    assert stuff.image_paths == objects.image_paths
    for a, b in zip(stuff.images, objects.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (load_dataset("coco_object_81", tmp_path)[0]["label"] == 255).any()


def test_dataset_indexing(tmp_path):
    build_benchmark("cityscapes_19", tmp_path)
    dataset = load_dataset("cityscapes_19", tmp_path)
    assert dataset[-1]["image_path"] == dataset[2]["image_path"]
    assert "lindau" in dataset[2]["image_path"]
    with pytest.raises(IndexError):
        dataset[3]
    assert len(list(dataset)) == 3


# --------------------------------------------------------------------------- errors


def test_label_value_beyond_the_class_count_names_file_and_value(tmp_path):
    layout = build_benchmark("coco_stuff_171", tmp_path)
    bad = layout.stored_labels[1].copy()
    bad[3, 4] = 171
    Image.fromarray(bad.astype(np.uint8)).save(layout.label_paths[1])
    dataset = load_dataset("coco_stuff_171", tmp_path)
    dataset[0]
    with pytest.raises(DatasetError) as caught:
        dataset[1]
    message = str(caught.value)
    assert str(layout.label_paths[1]) in message and "171" in message


def test_sixteen_bit_value_beyond_the_class_count(tmp_path):
    path = tmp_path / "x.tif"
    Image.fromarray(np.array([[0, 847]], dtype=np.uint16)).save(path)
    with pytest.raises(DatasetError, match="847"):
        read_label(path, "none", 65535, 847)
    assert read_label(path, "none", 65535, 848).tolist() == [[0, 847]]


def test_read_label_mappings_and_checks(tmp_path):
    path = tmp_path / "raw.png"
    Image.fromarray(np.array([[0, 1, 150, 255]], dtype=np.uint8)).save(path)
    assert read_label(path, "none", 255, 151).tolist() == [[0, 1, 150, 255]]
    assert read_label(path, "reduce_zero_label", 255, 150).tolist() == [[255, 0, 149, 255]]
    with pytest.raises(DatasetError, match="150"):
        read_label(path, "none", 255, 150)
    shifted = tmp_path / "pc59.png"
    Image.fromarray(np.array([[255, 0, 58]], dtype=np.uint8)).save(shifted)
    assert read_label(shifted, "shift_up_background", 255, 60).tolist() == [[0, 1, 59]]
    with pytest.raises(ValueError, match="unknown label mapping"):
        read_label(path, "minus_one", 255, 151)


def test_read_label_refuses_colour_and_missing_files(tmp_path):
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(colour)
    with pytest.raises(DatasetError, match="colour.png"):
        read_label(colour, "none", 255, 21)
    with pytest.raises(DatasetError, match="missing.png"):
        read_label(tmp_path / "missing.png", "none", 255, 21)


def test_sixteen_bit_tiff_written_by_opencv(tmp_path):
    import cv2

    path = tmp_path / "cv.tif"
    cv2.imwrite(str(path), np.array([[0, 300, 846, 65535]], dtype=np.uint16))
    assert read_label(path, "none", 65535, 847).tolist() == [[0, 300, 846, 65535]]


def test_sixteen_bit_png(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.array([[3, 400, 65535]], dtype=np.uint16)).save(path)
    assert read_label(path, "none", 65535, 459).tolist() == [[3, 400, 65535]]


def test_missing_folder_names_the_expected_path(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_dataset("ade20k_150", tmp_path)
    expected = tmp_path / "ADEChallengeData2016" / "images" / "validation"
    assert str(expected) in str(caught.value)
    assert "datasets/README.md" in str(caught.value)


def test_missing_label_folder_and_id_list(tmp_path):
    layout = build_benchmark("pcontext_459", tmp_path)
    (tmp_path / "VOCdevkit/VOC2010/pascalcontext_val.txt").unlink()
    with pytest.raises(DatasetError, match="pascalcontext_val.txt"):
        load_dataset("pcontext_459", tmp_path)
    for path in layout.label_paths:
        path.unlink()
    path.parent.rmdir()
    with pytest.raises(DatasetError, match="pc459_val"):
        load_dataset("pcontext_459", tmp_path)


def test_image_without_label_is_named(tmp_path):
    layout = build_benchmark("ade20k_847", tmp_path)
    layout.label_paths[1].unlink()
    with pytest.raises(DatasetError) as caught:
        load_dataset("ade20k_847", tmp_path)
    assert str(layout.image_paths[1]) in str(caught.value)
    assert str(layout.label_paths[1]) in str(caught.value)


def test_point_cloud_benchmark_is_not_a_2d_dataset(tmp_path):
    assert get_benchmark("scannet_20").kind == "point_cloud"
    with pytest.raises(DatasetError, match="point-cloud"):
        load_dataset("scannet_20", tmp_path)


# --------------------------------------------------------------------------- custom datasets


def _write_custom(root: Path) -> list[np.ndarray]:
    """images/ + labels/ + classes.txt under root: two samples of 3 classes, ignore 255."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("road, street\ncar\nsky\n", encoding="utf-8")
    labels = []
    for stem in ("b", "a"):
        image = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        label = rng.choice(np.array([0, 1, 2, 255]), size=(10, 12))
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{stem}.png")
        labels.append(label)
    return labels[::-1]  # sorted by stem: a, b


def test_register_custom_dataset(tmp_path, custom_cleanup):
    labels = _write_custom(tmp_path / "mine")
    custom_cleanup.append("my_streets")
    info = register_custom_dataset(
        "my_streets",
        "mine/images",
        "mine/labels",
        "mine/classes.txt",
        image_ext=".png",
        root=tmp_path,
    )
    assert info.num_classes == 3 and info.custom and info.ignore_value == 255
    assert "my_streets" in list_benchmarks()
    assert class_names("my_streets") == ["road", "car", "sky"]
    dataset = load_dataset("my_streets")  # paths were resolved at registration
    assert len(dataset) == 2
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(dataset[i]["label"], label)
    with pytest.raises(DatasetError, match="my_streets"):
        get_benchmark("my_street")


def test_register_custom_dataset_errors(tmp_path, custom_cleanup):
    _write_custom(tmp_path)
    with pytest.raises(DatasetError, match="built-in"):
        register_custom_dataset("voc_21", "images", "labels", "classes.txt", root=tmp_path)
    assert get_benchmark("voc_21") is BENCHMARKS["voc_21"]
    with pytest.raises(DatasetError, match="nope.txt"):
        register_custom_dataset("x", "images", "labels", "nope.txt", root=tmp_path)
    custom_cleanup.append("jpgs")
    register_custom_dataset("jpgs", "images", "labels", "classes.txt", root=tmp_path)
    with pytest.raises(DatasetError, match=r"\*\.jpg"):
        load_dataset("jpgs")


def test_register_from_config(tmp_path, custom_cleanup):
    labels = _write_custom(tmp_path / "data" / "mine")
    config = tmp_path / "custom.yaml"
    config.write_text(
        "datasets:\n"
        f"  root: {tmp_path / 'data'}\n"
        "  test: [from_config]\n"
        "  custom:\n"
        "    - name: from_config\n"
        "      image_dir: mine/images\n"
        "      label_dir: mine/labels\n"
        "      class_file: mine/classes.txt\n"
        "      image_ext: .png\n",
        encoding="utf-8",
    )
    cfg = get_config(config)
    custom_cleanup.append("from_config")
    (info,) = register_from_config(cfg)
    assert info.name == "from_config" and info.num_classes == 3
    dataset = load_dataset("from_config", cfg.datasets.root)
    np.testing.assert_array_equal(dataset[1]["label"], labels[1])
