"""Tests of the region-data tools: the noun-phrase extractor's fallback, tools/make_region_labels.py
(CLOC's VESL labels) and tools/mine_region_nouns.py (mask-adapted CLIP's region/noun pairs)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.text.noun_phrases import (
    extract_noun_phrases,
    noun_phrase_backend,
    nouns,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny" / "mask_adapted_tiny.yaml")
STORED_FILL = (124, 116, 103)


def _tool(name: str):
    if str(REPO_ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "tools"))
    return importlib.import_module(name)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _write_captions(path: Path, captions: dict[int, list[str]], size=(64, 80)) -> None:
    images = [{"id": i, "file_name": f"{i:03d}.png", "height": size[0], "width": size[1]}
              for i in captions]
    annotations = [{"id": 100 * i + k, "image_id": i, "caption": c}
                   for i, texts in captions.items() for k, c in enumerate(texts)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


# ---------------------------------------------------------------------------- noun phrases


def _fallback(text: str, **kwargs) -> list[str]:
    return extract_noun_phrases(text, backend="vocabulary", **kwargs)


def test_fallback_phrases_on_hand_captions() -> None:
    assert _fallback("A man riding a horse next to two traffic lights on a busy street.") == \
        ["man", "horse", "traffic light", "street"]
    # multi-word names win over their last word; plurals map to the vocabulary's singular;
    # a possessive is dropped; repeats are kept once
    assert _fallback("The woman's dogs eat a hot dog; a dog and a wine glass on the dining "
                     "table.") == ["woman", "dog", "hot dog", "wine glass", "dining table"]
    # generic web words and stop words are never phrases
    assert _fallback("A close up photo of the background with some things in it.") == []
    assert _fallback("Boxes and puppies", vocabulary=["box", "puppy"]) == ["box", "puppy"]
    assert nouns("Two cats on a sofa.", backend="vocabulary") == ["cat", "sofa"]


def test_fallback_caps_at_twenty_in_order() -> None:
    names = ["cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
             "bird", "car", "bus", "train", "truck", "boat", "bicycle", "airplane", "bench",
             "chair", "sofa", "bed", "toilet"]
    caption = "A " + ", a ".join(names) + "."
    assert _fallback(caption) == names[:20]
    assert _fallback(caption, max_phrases=3) == names[:3]
    assert nouns(caption, backend="vocabulary") == names  # nouns are not capped


def test_backend_choice() -> None:
    assert noun_phrase_backend("vocabulary") == "vocabulary"
    assert noun_phrase_backend() in ("nltk", "vocabulary")
    with pytest.raises(ValueError, match="unknown noun-phrase backend"):
        noun_phrase_backend("spacy")


def test_nltk_chunker_when_installed() -> None:
    if noun_phrase_backend() != "nltk":
        pytest.skip("nltk or its POS tagger data is not installed")
    phrases = extract_noun_phrases("A red car parked next to a tall tree.", backend="nltk")
    assert "red car" in phrases and "tall tree" in phrases


# ---------------------------------------------------------------------------- make_region_labels


def _region_inputs(tmp_path: Path) -> tuple[Path, Path]:
    captions = tmp_path / "captions.json"
    _write_captions(captions, {1: ["A dog and a cat on a sofa."],
                               2: ["A red car by a tree.", "A car parked near a tree."],
                               3: ["A bird."]})
    detections = [
        # one box, three phrases: captioned by its best (category_id 1 = image 1's "cat")
        {"image_id": 1, "bbox": [1, 2, 10, 20], "score": 0.3, "category_id": 0},
        {"image_id": 1, "bbox": [1, 2, 10, 20], "score": 0.6, "category_id": 1},
        {"image_id": 1, "bbox": [1, 2, 10, 20], "score": 0.5, "phrase": "sofa"},
        {"image_id": 1, "bbox": [30, 5, 8, 8], "score": 0.1, "category_id": 2},  # = 0.1: out
        {"image_id": 1, "bbox": [40, 5, 8, 8], "score": 0.1001, "category_id": 2},  # kept
        {"image_id": 2, "bbox": [0, 0, 0, 9], "score": 0.9, "category_id": 0},  # zero width
        {"image_id": 2, "bbox": [5, 6, 7, 8], "score": 0.8, "phrase": "red  car"},
    ]
    detections_path = tmp_path / "detections.json"
    detections_path.write_text(json.dumps(detections))
    return captions, detections_path


def test_make_region_labels_boxes_captions_and_threshold(tmp_path: Path) -> None:
    tool = _tool("make_region_labels")
    captions, detections = _region_inputs(tmp_path)
    out, queries = tmp_path / "regions.json", tmp_path / "queries.json"
    assert tool.main(["--captions", str(captions), "--detections", str(detections),
                      "--output", str(out), "--queries-out", str(queries),
                      "--backend", "vocabulary"]) == 0
    assert json.loads(queries.read_text())["images"][0] == \
        {"image_id": 1, "file_name": "001.png", "phrases": ["dog", "cat", "sofa"]}
    regions = json.loads(out.read_text())
    assert regions["info"]["noun_phrases"] == "vocabulary"
    assert [i["id"] for i in regions["images"]] == [1, 2, 3]
    got = [(a["image_id"], a["bbox"], a["caption"], a["category_id"], a["score"])
           for a in regions["annotations"]]
    # the box at exactly 0.1 is dropped (cloc.md: confidence > 0.1); 0.1001 is kept
    assert got == [(1, [1.0, 2.0, 10.0, 20.0], "cat", 1, 0.6),
                   (1, [40.0, 5.0, 8.0, 8.0], "sofa", 2, 0.1001),
                   (2, [5.0, 6.0, 7.0, 8.0], "red car", 3, 0.8)]
    assert regions["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "sofa"},
                                     {"id": 3, "name": "red car"}]
    assert [a["id"] for a in regions["annotations"]] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_make_region_labels_output_loads_in_cloc(tmp_path: Path) -> None:
    from ovseg.methods.cloc.data import RegionSet, RegionTrainSet

    tool = _tool("make_region_labels")
    captions, detections = _region_inputs(tmp_path)
    out = tmp_path / "regions.json"
    assert tool.main(["--captions", str(captions), "--detections", str(detections),
                      "--output", str(out), "--backend", "vocabulary"]) == 0
    for i in (1, 2, 3):
        Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / f"{i:03d}.png")
    data = RegionTrainSet([RegionSet("vesl", out, tmp_path, captions, "recognition")],
                          image_size=32, regions_per_image=4, text_mode="caption")
    assert len(data) == 3  # image 3 has no box but a caption
    sample = data[0]
    valid = sample["region_valid"]
    assert int(valid.sum()) == 2
    assert sorted(t for t in sample["region_text"] if t) == ["cat", "sofa"]
    boxes = {t: b for t, b in zip(sample["region_text"], sample["boxes"], strict=True) if t}
    # x1, y1, x2, y2 over the long side (80)
    assert torch.allclose(boxes["cat"], torch.tensor([1, 2, 11, 22]) / 80.0)
    assert sample["caption"] == "A dog and a cat on a sofa."


@pytest.mark.parametrize("case", ["bad_json", "not_coco", "unknown_image", "bad_category",
                                  "missing"])
def test_make_region_labels_bad_inputs_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    tool = _tool("make_region_labels")
    captions, detections = _region_inputs(tmp_path)
    if case == "bad_json":
        captions.write_text("{not json")
    elif case == "not_coco":
        captions.write_text(json.dumps([1, 2]))
    elif case == "unknown_image":
        detections.write_text(json.dumps([{"image_id": 9, "bbox": [0, 0, 1, 1], "score": 1,
                                           "phrase": "x"}]))
    elif case == "bad_category":
        detections.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1,
                                           "category_id": 3}]))
    else:
        detections = tmp_path / "nope.json"
    out = tmp_path / "regions.json"
    assert tool.main(["--captions", str(captions), "--detections", str(detections),
                      "--output", str(out), "--backend", "vocabulary"]) == 2
    line = _error_line(capsys)
    expected = {"bad_json": "not valid JSON", "not_coco": "not a COCO captions file",
                "unknown_image": "image_id 9", "bad_category": "category_id",
                "missing": "does not exist"}[case]
    assert expected in line
    assert not out.exists()


# ---------------------------------------------------------------------------- mine_region_nouns


def _mining_inputs(tmp_path: Path) -> tuple[Path, Path, dict[int, np.ndarray]]:
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = {}
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        # colours that never equal the fill, so a fill pixel can only come from the mask
        image = rng.integers(0, 100, (64, 80, 3), dtype=np.uint8)
        image[10:50, 20:60] = (200, 30, 30 * i)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        pixels[i] = image
    captions = tmp_path / "captions.json"
    _write_captions(captions, {1: ["A dog next to a cat.", "A cow."],
                               2: ["A red car near a tree."],
                               3: ["A photo of nothing."]})  # no noun: no pairs
    return captions, folder, pixels


def test_mine_region_nouns_end_to_end(tmp_path: Path) -> None:
    from ovseg.layers.masked_crops import binary_masks
    from ovseg.methods.mask_adapted.training import STORED_FILL as READER_FILL
    from ovseg.methods.mask_adapted.training import RegionNounPairs

    assert READER_FILL == STORED_FILL
    tool = _tool("mine_region_nouns")
    captions, folder, pixels = _mining_inputs(tmp_path)
    out = tmp_path / "pairs"
    assert tool.main(["--config-file", TINY_CONFIG, "--captions", str(captions),
                      "--images", str(folder), "--output", str(out), "--limit", "3",
                      "--backend", "vocabulary"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["noun_extractor"] == "vocabulary"
    assert summary["images_without_nouns"] == 1
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {p["image_id"] for p in pairs} <= {1, 2}
    # one caption per image by default: image 1's nouns are those of its first caption
    assert {p["noun"] for p in pairs if p["image_id"] == 1} <= {"dog", "cat"}
    assert {p["noun"] for p in pairs if p["image_id"] == 2} <= {"car", "tree"}

    # each crop is the resized image's box (here the image itself: 64 x 80 stays) with the
    # pixels outside the proposal's mask exactly the stored fill
    model = tool.build_miner(TINY_CONFIG, [])
    fill = np.array(STORED_FILL, np.uint8)
    saw_fill = False
    for image_id in (1, 2):
        with torch.inference_mode():
            _, probs = model.propose(torch.from_numpy(pixels[image_id]).permute(2, 0, 1)[None])
        for pair in (p for p in pairs if p["image_id"] == image_id):
            x1, y1, x2, y2 = pair["box"]
            mask = binary_masks(probs[pair["query"]], model.settings.mask_threshold).numpy()
            crop = np.array(Image.open(out / pair["image"]))
            inside = mask[y1:y2, x1:x2]
            expected = np.where(inside[..., None], pixels[image_id][y1:y2, x1:x2], fill)
            np.testing.assert_array_equal(crop, expected)
            # stage (c) reads the mask back as "not the fill colour"
            np.testing.assert_array_equal((crop != fill).any(-1), inside)
            saw_fill |= bool((~inside).any())
    assert saw_fill

    data = RegionNounPairs(str(out / "pairs.jsonl"), with_masks=True)
    assert len(data) == len(pairs)
    sample = data[0]
    assert sample["image"].shape == (3, 224, 224) and sample["image"].dtype == torch.float32
    assert sample["noun"] == pairs[0]["noun"]
    assert sample["mask"].shape == (224, 224)
    assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}


def test_mine_region_nouns_noun_assignment(tmp_path: Path) -> None:
    tool = _tool("mine_region_nouns")
    captions, folder, pixels = _mining_inputs(tmp_path)
    model = tool.build_miner(TINY_CONFIG, [])
    pairs, stored = tool.mine_image(model, pixels[2], ["car", "tree"], assign="noun")
    # one pair per noun, each with its best region; the crops of the paired queries only
    assert [p["noun"] for p in pairs] == ["car", "tree"]
    assert set(stored) == {p["query"] for p in pairs}


@pytest.mark.parametrize("case", ["bad_json", "missing_folder", "missing_image"])
def test_mine_region_nouns_bad_inputs_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    tool = _tool("mine_region_nouns")
    captions, folder, _ = _mining_inputs(tmp_path)
    if case == "bad_json":
        captions.write_text("[")
    elif case == "missing_folder":
        folder = tmp_path / "nope"
    else:
        (folder / "002.png").unlink()
    out = tmp_path / "pairs"
    assert tool.main(["--config-file", TINY_CONFIG, "--captions", str(captions),
                      "--images", str(folder), "--output", str(out)]) == 2
    line = _error_line(capsys)
    expected = {"bad_json": "not valid JSON", "missing_folder": "does not exist",
                "missing_image": "002.png"}[case]
    assert expected in line
    assert not (out / "pairs.jsonl").exists()
