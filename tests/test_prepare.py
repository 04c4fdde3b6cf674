"""Tests of the dataset converters in datasets/: exact label values, 16-bit TIFFs, idempotence,
atomic writes, safe archive extraction and the missing-input errors."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT / "datasets"
SCRIPTS = (
    "prepare_ade20k_847",
    "prepare_pascal_context",
    "prepare_coco_stuff",
    "prepare_coco_object",
    "prepare_cityscapes",
)


def _import_scripts() -> dict[str, ModuleType]:
    # the scripts import their helpers as top-level modules, as `python datasets/x.py` does
    if str(DATASETS_DIR) not in sys.path:
        sys.path.insert(0, str(DATASETS_DIR))
    return {name: importlib.import_module(name) for name in ("_prepare_common", *SCRIPTS)}


_MODULES = _import_scripts()
common = _MODULES["_prepare_common"]
ade847 = _MODULES["prepare_ade20k_847"]
pcontext = _MODULES["prepare_pascal_context"]
coco_stuff = _MODULES["prepare_coco_stuff"]
coco_object = _MODULES["prepare_coco_object"]
cityscapes = _MODULES["prepare_cityscapes"]

# the COCO category ids that have a thing class
COCO_THING_CATEGORIES = [
    c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
]


# ---------------------------------------------------------------------------------- helpers


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _read(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() or path.is_symlink())


def _temporary_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp" in path.name]


def _assert_second_run_writes_nothing(root: Path, run: Callable[[], int]) -> None:
    """Age every file, run again: the same files with the same mtimes must remain."""
    old = 1_000_000_000 * 10**9
    for path in _files(root):
        os.utime(path, ns=(old, old))
    before = {path: path.stat().st_mtime_ns for path in _files(root)}
    assert run() == 0
    after = {path: path.stat().st_mtime_ns for path in _files(root)}
    assert after == before


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------- ADE-847


def _ade_seg(class_ids: np.ndarray) -> np.ndarray:
    """RGB *_seg.png pixels encoding ADE-full class ids as R = id // 256 * 10, G = id % 256."""
    seg = np.zeros((*class_ids.shape, 3), dtype=np.uint8)
    seg[..., 0] = class_ids // 256 * 10
    seg[..., 1] = class_ids % 256
    seg[..., 2] = 7  # instance channel: must not matter
    return seg


def _write_ade_image(folder: Path, stem: str, class_ids: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    height, width = class_ids.shape
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{stem}.jpg")
    Image.fromarray(_ade_seg(class_ids)).save(folder / f"{stem}_seg.png")


SMALL_ADE_IDS = np.array(
    [
        [2978, 312, 0, 3148, 1, 2155],
        [2155, 2978, 2978, 6655, 312, 312],
        [0, 0, 3148, 3148, 2420, 2420],
        [2879, 430, 444, 2978, 2978, 2978],
    ]
)
# by the built-in table: wall 2978 -> 0, building 312 -> 1, sky 2420 -> 2, roof 2155 -> 244,
# cat 430 -> 500, truck crane 2879 -> 511, cds 444 -> 512, adding machine 3148 -> 846;
# 0 (unlabeled), 1 and 6655 are not among the 847 -> 65535
SMALL_ADE_EXPECTED = np.array(
    [
        [0, 1, 65535, 846, 65535, 244],
        [244, 0, 0, 65535, 1, 1],
        [65535, 65535, 846, 846, 2, 2],
        [511, 500, 512, 0, 0, 0],
    ],
    dtype=np.uint16,
)


def _build_ade(root: Path) -> Path:
    validation = root / "ADE20K_2021_17_01" / "images" / "ADE" / "validation"
    _write_ade_image(validation / "cultural" / "apse", "ADE_val_00000001", SMALL_ADE_IDS)
    # 600 x 1000: short side 600 > 512 -> 512 x round(1000 / 600 * 512) = 512 x 853
    large = np.full((600, 1000), 2978)
    large[:, 500:] = 312
    large[:100, :100] = 5000  # not an ADE-847 class
    _write_ade_image(validation / "urban" / "street", "ADE_val_00000002", large)
    # neither a validation image nor a val file name: both must be left alone
    _write_ade_image(validation / "urban" / "street", "ADE_frame_00000001", SMALL_ADE_IDS)
    training = root / "ADE20K_2021_17_01" / "images" / "ADE" / "training"
    _write_ade_image(training / "x", "ADE_train_00000001", SMALL_ADE_IDS)
    return root / "ADE20K_2021_17_01"


def test_ade847_table_has_847_distinct_ids() -> None:
    ids = ade847.ADE_FULL_CLASS_IDS
    assert len(ids) == ade847.NUM_CLASSES == 847 == len(set(ids))
    mapping = ade847.builtin_class_map()
    assert mapping[2978] == 0 and mapping[312] == 1 and mapping[3148] == 846


def test_ade847_labels_images_and_downscaling(tmp_path: Path) -> None:
    ade = _build_ade(tmp_path)
    assert ade847.main(["--root", str(tmp_path)]) == 0

    labels_dir = ade / "annotations_detectron2" / "validation"
    images_dir = ade / "images_detectron2" / "validation"
    assert sorted(p.name for p in labels_dir.iterdir()) == [
        "ADE_val_00000001.tif",
        "ADE_val_00000002.tif",
    ]
    assert sorted(p.name for p in images_dir.iterdir()) == [
        "ADE_val_00000001.jpg",
        "ADE_val_00000002.jpg",
    ]

    small = _read(labels_dir / "ADE_val_00000001.tif")
    assert small.dtype == np.uint16
    np.testing.assert_array_equal(small, SMALL_ADE_EXPECTED)
    # PIL (the other way readers open TIFFs) sees 16 bits and the 65535 ignore value too
    with Image.open(labels_dir / "ADE_val_00000001.tif") as opened:
        assert opened.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(opened), SMALL_ADE_EXPECTED)
    assert _read(images_dir / "ADE_val_00000001.jpg").shape == (4, 6, 3)

    large = _read(labels_dir / "ADE_val_00000002.tif")
    assert large.dtype == np.uint16 and large.shape == (512, 853)
    assert set(np.unique(large).tolist()) == {0, 1, 65535}
    # the 100 x 100 block becomes ~85 x 85; halves split at x = 500 -> ~427
    assert large[10, 10] == 65535 and large[80, 80] == 65535
    assert large[300, 200] == 0 and large[10, 200] == 0
    assert large[300, 700] == 1 and large[511, 852] == 1
    assert _read(images_dir / "ADE_val_00000002.jpg").shape == (512, 853, 3)

    _assert_second_run_writes_nothing(tmp_path, lambda: ade847.main(["--root", str(tmp_path)]))
    assert not _temporary_files(tmp_path)


@pytest.mark.parametrize("form", ["csv", "json_object", "json_list"])
def test_ade847_class_map_file(tmp_path: Path, form: str) -> None:
    ade = _build_ade(tmp_path)
    if form == "csv":
        class_map = tmp_path / "map.csv"
        class_map.write_text("ade_full_id,trainId\n2978,5\n312,7\n", encoding="utf-8")
    elif form == "json_object":
        class_map = tmp_path / "map.json"
        class_map.write_text(json.dumps({"2978": 5, "312": 7}), encoding="utf-8")
    else:
        class_map = tmp_path / "map.json"
        entries = [{"name": "wall", "id": 2978, "trainId": 5}, {"id": 312, "trainId": 7}]
        class_map.write_text(json.dumps(entries), encoding="utf-8")
    assert ade847.main(["--root", str(tmp_path), "--class-map", str(class_map)]) == 0
    labels = _read(ade / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif")
    expected = np.full(SMALL_ADE_IDS.shape, 65535, dtype=np.uint16)
    expected[SMALL_ADE_IDS == 2978] = 5
    expected[SMALL_ADE_IDS == 312] = 7
    np.testing.assert_array_equal(labels, expected)


def test_ade847_bad_class_map_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _build_ade(tmp_path)
    class_map = tmp_path / "map.csv"
    class_map.write_text("2978,900\n", encoding="utf-8")
    assert ade847.main(["--root", str(tmp_path), "--class-map", str(class_map)]) == 2
    assert "[0, 846]" in _error_line(capsys)


def test_ade847_missing_seg_stops_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ade = _build_ade(tmp_path)
    missing = next(ade.rglob("ADE_val_00000002_seg.png"))
    missing.unlink()
    assert ade847.main(["--root", str(tmp_path)]) == 2
    assert str(missing) in _error_line(capsys)
    assert not (ade / "annotations_detectron2").exists()


def test_ade847_downscaled_size() -> None:
    assert ade847.downscaled_size(600, 1000) == (512, 853)
    assert ade847.downscaled_size(1000, 600) == (853, 512)
    assert ade847.downscaled_size(512, 4000) == (512, 4000)  # short side 512: unchanged
    assert ade847.downscaled_size(300, 200) == (300, 200)
    assert ade847.downscaled_size(1024, 1024) == (512, 512)


# ---------------------------------------------------------------------------------- Pascal Context


LABEL_MAP = np.array(
    [[0, 2, 9, 459, 1], [458, 415, 284, 3, 2]],
    dtype=np.uint16,
)
# 59: aeroplane 2 -> 0, bag 9 -> 1, person 284 -> 36, track 415 -> 50, wood 458 -> 58;
# unlabeled 0, accordion 1, air conditioner 3 and wool 459 are not among the 59 -> 255
PC59_EXPECTED = np.array([[255, 0, 1, 255, 255], [58, 50, 36, 255, 0]], dtype=np.uint8)
PC459_EXPECTED = np.array([[65535, 1, 8, 458, 0], [457, 414, 283, 2, 1]], dtype=np.uint16)


def _build_pascal_context(root: Path) -> Path:
    voc2010 = root / "VOCdevkit" / "VOC2010"
    (voc2010 / "trainval").mkdir(parents=True)
    scipy.io.savemat(voc2010 / "trainval" / "2008_000002.mat", {"LabelMap": LABEL_MAP})
    scipy.io.savemat(voc2010 / "trainval" / "2008_000003.mat", {"LabelMap": LABEL_MAP[:, ::-1]})
    # a training image: not in the val list, so not converted
    scipy.io.savemat(voc2010 / "trainval" / "2008_000004.mat", {"LabelMap": LABEL_MAP})
    (voc2010 / "pascalcontext_val.txt").write_text("2008_000002\n2008_000003\n\n", "utf-8")
    return voc2010


def test_pascal_context_59_and_459(tmp_path: Path) -> None:
    voc2010 = _build_pascal_context(tmp_path)
    assert pcontext.main(["--root", str(tmp_path)]) == 0

    pc59_dir = voc2010 / "annotations_detectron2" / "pc59_val"
    pc459_dir = voc2010 / "annotations_detectron2" / "pc459_val"
    assert sorted(p.name for p in pc59_dir.iterdir()) == ["2008_000002.png", "2008_000003.png"]
    assert sorted(p.name for p in pc459_dir.iterdir()) == ["2008_000002.tif", "2008_000003.tif"]

    pc59 = _read(pc59_dir / "2008_000002.png")
    assert pc59.dtype == np.uint8
    np.testing.assert_array_equal(pc59, PC59_EXPECTED)
    np.testing.assert_array_equal(_read(pc59_dir / "2008_000003.png"), PC59_EXPECTED[:, ::-1])

    pc459 = _read(pc459_dir / "2008_000002.tif")
    assert pc459.dtype == np.uint16
    np.testing.assert_array_equal(pc459, PC459_EXPECTED)
    with Image.open(pc459_dir / "2008_000002.tif") as opened:
        assert opened.mode == "I;16"
        assert np.asarray(opened).max() == 65535

    _assert_second_run_writes_nothing(tmp_path, lambda: pcontext.main(["--root", str(tmp_path)]))


def test_pascal_context_class_order_is_sorted_ids() -> None:
    ids = [full_id for _, full_id in pcontext.PC59_CLASSES]
    assert len(ids) == 59 and ids == sorted(ids)
    names = [name for name, _ in pcontext.PC59_CLASSES]
    assert names[:5] == ["aeroplane", "bag", "bed", "bedclothes", "bench"]
    assert names[-3:] == ["water", "window", "wood"]


def test_pascal_context_labels_txt_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc2010 = _build_pascal_context(tmp_path)
    lines = ["1: accordion", "2: aeroplane", "3: air conditioner"]
    lines += [f"{full_id}: {name}" for name, full_id in pcontext.PC59_CLASSES[1:]]
    (voc2010 / "labels.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert pcontext.main(["--root", str(tmp_path)]) == 0

    # a label list that names id 9 differently must stop the run, not scramble PC-59
    (voc2010 / "labels.txt").write_text("2: aeroplane\n9: bottle\n", encoding="utf-8")
    assert pcontext.main(["--root", str(tmp_path), "--overwrite"]) == 2
    assert "labels.txt" in _error_line(capsys)


def test_pascal_context_rejects_out_of_range_label_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc2010 = _build_pascal_context(tmp_path)
    bad = np.array([[1, 460]], dtype=np.uint16)
    scipy.io.savemat(voc2010 / "trainval" / "2008_000002.mat", {"LabelMap": bad})
    assert pcontext.main(["--root", str(tmp_path)]) == 2
    assert "2008_000002.mat" in _error_line(capsys)


def test_pascal_context_unreadable_mat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    voc2010 = _build_pascal_context(tmp_path)
    (voc2010 / "trainval" / "2008_000003.mat").write_bytes(b"not a mat file")
    assert pcontext.main(["--root", str(tmp_path)]) == 2
    assert "2008_000003.mat" in _error_line(capsys)


def test_pascal_context_missing_mat_stops_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc2010 = _build_pascal_context(tmp_path)
    (voc2010 / "trainval" / "2008_000003.mat").unlink()
    assert pcontext.main(["--root", str(tmp_path)]) == 2
    assert str(voc2010 / "trainval" / "2008_000003.mat") in _error_line(capsys)
    assert not (voc2010 / "annotations_detectron2").exists()


# ---------------------------------------------------------------------------------- COCO

STUFFTHINGMAP = np.array(
    [[0, 11, 12, 24, 26, 89], [90, 91, 181, 255, 1, 10]],
    dtype=np.uint8,
)
# 171: unused ids 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90 are skipped, so 12 -> 11,
# 24 -> 23, 26 -> 24, 89 -> 79 (10 unused below), 91 -> 80 (first stuff), 181 -> 170
STUFF_EXPECTED = np.array(
    [[0, 255, 11, 23, 24, 79], [255, 80, 170, 255, 1, 10]],
    dtype=np.uint8,
)
# 81: things 1..80 (the 171 trainId + 1), stuff, unused ids and unlabeled 255 -> 0
OBJECT_EXPECTED = np.array(
    [[1, 0, 12, 24, 25, 80], [0, 0, 0, 0, 2, 11]],
    dtype=np.uint8,
)


def _build_stuffthingmaps(root: Path) -> Path:
    folder = root / "coco" / "stuffthingmaps_trainval2017" / "val2017"
    _write_png(folder / "000000000139.png", STUFFTHINGMAP)
    _write_png(folder / "000000000285.png", STUFFTHINGMAP[::-1])
    return folder


def test_coco_stuff_171(tmp_path: Path) -> None:
    _build_stuffthingmaps(tmp_path)
    assert coco_stuff.main(["--root", str(tmp_path)]) == 0
    out_dir = tmp_path / "coco" / "stuffthingmaps_detectron2" / "val2017"
    assert sorted(p.name for p in out_dir.iterdir()) == ["000000000139.png", "000000000285.png"]
    labels = _read(out_dir / "000000000139.png")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, STUFF_EXPECTED)
    np.testing.assert_array_equal(_read(out_dir / "000000000285.png"), STUFF_EXPECTED[::-1])
    assert len(coco_stuff.THING_IDS) == 80 and len(coco_stuff.STUFF_IDS) == 91
    _assert_second_run_writes_nothing(tmp_path, lambda: coco_stuff.main(["--root", str(tmp_path)]))


def test_coco_object_from_stuffthingmaps(tmp_path: Path) -> None:
    _build_stuffthingmaps(tmp_path)
    assert coco_object.main(["--root", str(tmp_path)]) == 0
    out_dir = tmp_path / "coco" / "object_detectron2" / "val2017"
    labels = _read(out_dir / "000000000139_instanceTrainIds.png")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, OBJECT_EXPECTED)
    np.testing.assert_array_equal(
        _read(out_dir / "000000000285_instanceTrainIds.png"), OBJECT_EXPECTED[::-1]
    )
    _assert_second_run_writes_nothing(tmp_path, lambda: coco_object.main(["--root", str(tmp_path)]))


def _write_instances(path: Path) -> None:
    """Two images: the first with two overlapping polygons and a crowd RLE, the second empty."""
    annotations = [
        # small toothbrush (category 90 -> 80), listed first: painted last, so it stays on top
        {
            "id": 1,
            "image_id": 1,
            "category_id": 90,
            "segmentation": [[4, 3, 7, 3, 7, 5, 4, 5]],  # x 4..6, y 3..4
            "area": 6.0,
            "bbox": [4, 3, 3, 2],
            "iscrowd": 0,
        },
        # large person (category 1 -> 1) under the toothbrush
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]],  # x 2..7, y 2..5
            "area": 24.0,
            "bbox": [2, 2, 6, 4],
            "iscrowd": 0,
        },
        # crowd of cars (category 3 -> 3) as an uncompressed column-major RLE: columns 10, 11
        {
            "id": 3,
            "image_id": 1,
            "category_id": 3,
            "segmentation": {"counts": [100, 20], "size": [10, 12]},
            "area": 20.0,
            "bbox": [10, 0, 2, 10],
            "iscrowd": 1,
        },
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "height": 10, "width": 12},
            {"id": 2, "file_name": "000000000002.jpg", "height": 5, "width": 4},
        ],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in COCO_THING_CATEGORIES],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
def test_coco_object_from_instances(tmp_path: Path) -> None:
    instances = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    _write_instances(instances)
    assert coco_object.main(["--root", str(tmp_path), "--instances", str(instances)]) == 0
    out_dir = tmp_path / "coco" / "object_detectron2" / "val2017"

    expected = np.zeros((10, 12), dtype=np.uint8)
    expected[2:6, 2:8] = 1  # person
    expected[3:5, 4:7] = 80  # toothbrush on top of the person
    expected[:, 10:12] = 3  # crowd of cars
    np.testing.assert_array_equal(_read(out_dir / "000000000001_instanceTrainIds.png"), expected)
    np.testing.assert_array_equal(
        _read(out_dir / "000000000002_instanceTrainIds.png"), np.zeros((5, 4), np.uint8)
    )
    _assert_second_run_writes_nothing(
        tmp_path,
        lambda: coco_object.main(["--root", str(tmp_path), "--instances", str(instances)]),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
def test_coco_object_refuses_to_mix_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _build_stuffthingmaps(tmp_path)
    instances = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    _write_instances(instances)
    assert coco_object.main(["--root", str(tmp_path)]) == 0
    from_instances = ["--root", str(tmp_path), "--instances", str(instances)]
    assert coco_object.main(from_instances) == 2
    assert "--overwrite" in _error_line(capsys)
    assert coco_object.main([*from_instances, "--overwrite"]) == 0
    marker = tmp_path / "coco" / "object_detectron2" / "val2017" / ".ovseg_source"
    assert marker.read_text(encoding="utf-8").strip() == "instances instances_val2017.json"


def test_coco_object_needs_80_categories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    instances = tmp_path / "instances.json"
    _write_instances(instances)
    data = json.loads(instances.read_text(encoding="utf-8"))
    data["categories"] = data["categories"][:79]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 90]
    instances.write_text(json.dumps(data), encoding="utf-8")
    assert coco_object.main(["--root", str(tmp_path), "--instances", str(instances)]) == 2
    assert "79 categories" in _error_line(capsys)


# ---------------------------------------------------------------------------------- Cityscapes

LABEL_IDS = np.array([[0, 7, 8, 26], [33, 34, 9, 24]], dtype=np.uint8)
# road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, bicycle 33 -> 18, person 24 -> 11;
# unlabeled 0, parking 9 and the unknown 34 -> 255
TRAIN_IDS_EXPECTED = np.array([[255, 0, 1, 13], [18, 255, 255, 11]], dtype=np.uint8)


def _build_cityscapes(root: Path) -> list[Path]:
    val = root / "cityscapes" / "gtFine" / "val"
    sources = [
        val / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png",
        val / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
    ]
    for source in sources:
        _write_png(source, LABEL_IDS)
    # the other annotation files of gtFine stay untouched
    _write_png(val / "lindau" / "lindau_000000_000019_gtFine_instanceIds.png", LABEL_IDS)
    return [
        source.with_name(source.name.replace("_labelIds", "_labelTrainIds")) for source in sources
    ]


def test_cityscapes_train_ids(tmp_path: Path) -> None:
    outputs = _build_cityscapes(tmp_path)
    assert cityscapes.main(["--root", str(tmp_path)]) == 0
    for output in outputs:
        labels = _read(output)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, TRAIN_IDS_EXPECTED)
    assert len(list((tmp_path / "cityscapes").rglob("*_labelTrainIds.png"))) == 2
    _assert_second_run_writes_nothing(tmp_path, lambda: cityscapes.main(["--root", str(tmp_path)]))


def test_root_defaults_to_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = _build_cityscapes(tmp_path)
    monkeypatch.setenv("OVSEG_DATASETS", str(tmp_path))
    assert cityscapes.main([]) == 0
    assert all(output.is_file() for output in outputs)


# ---------------------------------------------------------------------------------- atomicity


def _failing_imwrite(real: Callable[..., bool], fail_after: int) -> Callable[..., bool]:
    """cv2.imwrite that succeeds ``fail_after`` times, then writes half a file and raises."""
    calls = {"count": 0}

    def imwrite(path: str, array: np.ndarray, *args: object) -> bool:
        calls["count"] += 1
        if calls["count"] <= fail_after:
            return real(path, array, *args)
        Path(path).write_bytes(b"\x89PNG half a file")
        raise OSError("No space left on device")

    return imwrite


def test_failed_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = _build_cityscapes(tmp_path)
    assert cityscapes.main(["--root", str(tmp_path)]) == 0
    before = {output: output.read_bytes() for output in outputs}

    monkeypatch.setattr(cv2, "imwrite", _failing_imwrite(cv2.imwrite, fail_after=0))
    assert cityscapes.main(["--root", str(tmp_path), "--overwrite"]) == 1
    assert "No space left" in _error_line(capsys)
    assert {output: output.read_bytes() for output in outputs} == before
    assert not _temporary_files(tmp_path)


def test_interrupted_run_leaves_whole_files_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = _build_cityscapes(tmp_path)
    real_imwrite = cv2.imwrite
    monkeypatch.setattr(cv2, "imwrite", _failing_imwrite(real_imwrite, fail_after=1))
    assert cityscapes.main(["--root", str(tmp_path)]) == 1
    # the first file is complete, the second absent: never a half file under a final name
    np.testing.assert_array_equal(_read(outputs[0]), TRAIN_IDS_EXPECTED)
    assert not outputs[1].exists()
    assert not _temporary_files(tmp_path)

    old = 1_000_000_000 * 10**9
    os.utime(outputs[0], ns=(old, old))
    monkeypatch.setattr(cv2, "imwrite", real_imwrite)
    assert cityscapes.main(["--root", str(tmp_path)]) == 0
    assert outputs[0].stat().st_mtime_ns == old  # finished file skipped
    np.testing.assert_array_equal(_read(outputs[1]), TRAIN_IDS_EXPECTED)


def test_uint16_tif_that_reads_back_8bit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_imread = cv2.imread

    def imread_8bit(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
        return real_imread(path, flags).astype(np.uint8)

    monkeypatch.setattr(cv2, "imread", imread_8bit)
    target = tmp_path / "labels.tif"
    with pytest.raises(OSError, match="uint16"):
        common.write_uint16_tif(target, np.array([[0, 300, 65535]], dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- archives


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (name, kind "file" | "symlink" | "hardlink", data or link target)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                assert isinstance(payload, str)
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = payload
                archive.addfile(info)
    return path


@pytest.mark.parametrize(
    "members",
    [
        {"gtFine/ok.txt": b"ok", "../evil.txt": b"evil"},
        {"gtFine/ok.txt": b"ok", "gtFine/../../evil.txt": b"evil"},
        {"gtFine/ok.txt": b"ok", "..\\evil.txt": b"evil"},
        {"gtFine/ok.txt": b"ok", "/tmp/ovseg-test-absolute-evil.txt": b"evil"},
    ],
    ids=["dotdot", "nested-dotdot", "backslash-dotdot", "absolute"],
)
def test_zip_escape_is_refused_and_nothing_extracted(
    tmp_path: Path, members: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _zip(tmp_path / "evil.zip", members)
    root = tmp_path / "root"
    assert cityscapes.main(["--root", str(root), "--archive", str(archive)]) == 2
    assert "refusing archive member" in _error_line(capsys)
    assert _files(root) == []
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not Path("/tmp/ovseg-test-absolute-evil.txt").exists()


@pytest.mark.parametrize(
    "members",
    [
        [("ok.txt", "file", b"ok"), ("../evil.txt", "file", b"evil")],
        [("ok.txt", "file", b"ok"), ("/tmp/ovseg-test-absolute-evil.txt", "file", b"evil")],
        [("ok.txt", "file", b"ok"), ("link", "symlink", "../")],
        [("ok.txt", "file", b"ok"), ("link", "symlink", "/etc")],
        [("ok.txt", "file", b"ok"), ("sub/link", "symlink", "../../outside")],
        # d -> . stays inside, but d/../evil.txt would resolve through it to the parent
        [("d", "symlink", "."), ("d/x.txt", "file", b"evil")],
        [("d", "symlink", "."), ("e", "symlink", "d/../..")],
        [("ok.txt", "file", b"ok"), ("hard", "hardlink", "../outside")],
        [("ok.txt", "file", b"ok"), ("hard", "hardlink", "/etc/passwd")],
    ],
    ids=[
        "dotdot",
        "absolute",
        "symlink-parent",
        "symlink-absolute",
        "symlink-nested",
        "through-own-link",
        "link-through-link",
        "hardlink-parent",
        "hardlink-absolute",
    ],
)
def test_tar_escape_is_refused_and_nothing_extracted(
    tmp_path: Path, members: list[tuple[str, str, bytes | str]]
) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", members)
    target = tmp_path / "root" / "cityscapes"
    with pytest.raises(common.PrepareError, match="refusing archive member"):
        common.extract_archive(archive, target)
    # nothing at all is created: not even the target folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]


def test_existing_link_on_disk_cannot_redirect_extraction(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "redirect").symlink_to(outside)
    archive = _zip(tmp_path / "a.zip", {"redirect/x.txt": b"x"})
    with pytest.raises(common.PrepareError, match="existing link"):
        common.extract_archive(archive, target)
    assert list(outside.iterdir()) == []


def test_safe_archives_extract_and_resume(tmp_path: Path) -> None:
    target = tmp_path / "target"
    tar = _tar(
        tmp_path / "good.tar.gz",
        [
            ("top/a.txt", "file", b"alpha"),
            ("top/sub/b.txt", "file", b"beta"),
            ("top/latest", "symlink", "sub"),
            ("top/copy.txt", "hardlink", "top/a.txt"),
        ],
    )
    assert common.extract_archive(tar, target) == 4
    assert (target / "top" / "a.txt").read_bytes() == b"alpha"
    assert (target / "top" / "latest" / "b.txt").read_bytes() == b"beta"
    assert os.readlink(target / "top" / "latest") == "sub"
    assert (target / "top" / "copy.txt").read_bytes() == b"alpha"
    zip_path = _zip(tmp_path / "good.zip", {"z/c.txt": b"gamma", "z/empty/": b""})
    common.extract_archive(zip_path, target)
    assert (target / "z" / "c.txt").read_bytes() == b"gamma" and (target / "z" / "empty").is_dir()

    _assert_second_run_writes_nothing(target, lambda: common.extract_archive(tar, target) * 0)
    assert not _temporary_files(target)


def test_converter_extracts_official_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    assert Image.fromarray(LABEL_IDS).save(buffer, format="PNG") is None
    archive = _zip(
        tmp_path / "gtFine_trainvaltest.zip",
        {
            "README": b"readme",
            "gtFine/val/bonn/bonn_000000_000019_gtFine_labelIds.png": buffer.getvalue(),
        },
    )
    root = tmp_path / "root"
    assert cityscapes.main(["--root", str(root), "--archive", str(archive)]) == 0
    output = (
        root
        / "cityscapes"
        / "gtFine"
        / "val"
        / "bonn"
        / "bonn_000000_000019_gtFine_labelTrainIds.png"
    )
    np.testing.assert_array_equal(_read(output), TRAIN_IDS_EXPECTED)


def test_unknown_archive_type_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "data.rar"
    archive.write_bytes(b"x")
    with pytest.raises(common.PrepareError, match=r"\.zip"):
        common.extract_archive(archive, tmp_path / "target")


# ---------------------------------------------------------------------------------- missing input


@pytest.mark.parametrize(
    ("module_name", "extra", "expected"),
    [
        ("prepare_ade20k_847", [], "ADE20K_2021_17_01/images/ADE/validation"),
        ("prepare_pascal_context", [], "VOCdevkit/VOC2010/pascalcontext_val.txt"),
        ("prepare_coco_stuff", [], "coco/stuffthingmaps_trainval2017/val2017"),
        ("prepare_coco_object", [], "coco/stuffthingmaps_trainval2017/val2017"),
        (
            "prepare_coco_object",
            ["--instances", "{root}/coco/annotations/instances_val2017.json"],
            "coco/annotations/instances_val2017.json",
        ),
        ("prepare_cityscapes", [], "cityscapes/gtFine/val"),
        ("prepare_cityscapes", ["--split", "train"], "cityscapes/gtFine/train"),
    ],
)
def test_missing_input_is_one_line_naming_the_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    module_name: str,
    extra: list[str],
    expected: str,
) -> None:
    module = _MODULES[module_name]
    argv = ["--root", str(tmp_path), *(arg.format(root=tmp_path) for arg in extra)]
    assert module.main(argv) == 2
    assert str(tmp_path / expected) in _error_line(capsys)


def test_pascal_context_missing_annotations_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    voc2010 = tmp_path / "VOCdevkit" / "VOC2010"
    voc2010.mkdir(parents=True)
    (voc2010 / "pascalcontext_val.txt").write_text("2008_000002\n", encoding="utf-8")
    assert pcontext.main(["--root", str(tmp_path)]) == 2
    assert str(voc2010 / "trainval") in _error_line(capsys)


def test_empty_input_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cityscapes" / "gtFine" / "val").mkdir(parents=True)
    assert cityscapes.main(["--root", str(tmp_path)]) == 2
    assert "no *_gtFine_labelIds.png files" in _error_line(capsys)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_from_the_command_line(tmp_path: Path, script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DATASETS_DIR / f"{script}.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: ") and "\n" not in result.stderr.strip()
