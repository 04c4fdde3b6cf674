"""CLOC region retrieval (issue 21): recall@k region -> text and text -> region on a tiny
grounding JSON, the embeddings scripted so that every rank is known, through the shipped
config ``configs/cloc/retrieval_grounding.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ovseg
from ovseg.methods.cloc.evaluation import evaluate_region_set, recall_at_k

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cloc" / "retrieval_grounding.yaml"
TINY = REPO / "configs" / "tiny" / "cloc_tiny.yaml"
# 12 regions on 3 images; regions 4 and 9 share a caption (11 distinct captions, so recall@10
# is not trivially 100)
CAPTIONS = ["a red car", "the tall tree", "a small dog", "two people", "a blue sign",
            "a wooden bench", "the white cloud", "a blue sign", "an open door", "a green lamp",
            "a striped cat", "a stone wall"]
DISTINCT = sorted(set(CAPTIONS))


def test_recall_at_k_on_a_hand_made_matrix():
    similarity = np.array([[0.9, 0.1, 0.5],   # positive 0: rank 1
                           [0.8, 0.2, 0.7],   # positive 1: rank 3
                           [0.1, 0.6, 0.3]])  # positives {0, 2}: best rank 2
    recalls = recall_at_k(similarity, [{0}, {1}, {0, 2}], ks=(1, 2, 3))
    assert recalls == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def _scores() -> np.ndarray:
    """(12 regions, 11 distinct captions) similarities without ties."""
    rng = np.random.default_rng(0)
    scores = rng.permutation(12 * len(DISTINCT)).reshape(12, len(DISTINCT)) / 200.0
    return scores.astype(np.float32)


def _write_grounding_set(root: Path) -> list[list[int]]:
    """Three grey images and a COCO JSON of 12 captioned boxes (plus one crowd box, which
    retrieval skips); the boxes of each region, in annotation order."""
    (root / "images").mkdir(parents=True)
    images, annotations, boxes = [], [], []
    for index in range(3):
        cv2.imwrite(str(root / "images" / f"{index}.png"), np.full((48, 64, 3), 90, np.uint8))
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": 48, "width": 64})
    for region, caption in enumerate(CAPTIONS):
        box = [2 + 3 * region, 4 + region, 10 + region, 8]  # x, y, w, h: distinct per region
        boxes.append(box)
        annotations.append({"id": region + 1, "image_id": region // 4 + 1, "category_id": 1,
                            "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                            "caption": caption})
    annotations.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
                        "area": 25, "iscrowd": 1, "caption": "a crowd"})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "regions.json").write_text(json.dumps(data), encoding="utf-8")
    return boxes


def _rank(scores: np.ndarray, positives: set[int]) -> int:
    """1 + how many entries score above the best positive (no ties by construction)."""
    best = max(scores[j] for j in positives)
    return 1 + int((scores > best).sum())


def test_retrieval_recall_equals_a_hand_count(tmp_path, monkeypatch):
    boxes = _write_grounding_set(tmp_path / "grounding")
    cfg = ovseg.get_config(CONFIG, ["datasets.root", str(tmp_path)])
    model = ovseg.build_model(ovseg.get_config(TINY))
    scores = _scores()
    region_of_box = {tuple(box): region for region, box in enumerate(boxes)}
    # scripted embeddings: a region is its row of scores, a caption the one-hot of its column,
    # so region . caption = scores[region, column]
    monkeypatch.setattr(model, "class_text", lambda names: torch.eye(len(DISTINCT))[
        [DISTINCT.index(name) for name in names]])

    def embed_regions(state, boxes=None, **_):
        rows = []
        for x1, y1, x2, y2 in torch.as_tensor(boxes).tolist():
            rows.append(scores[region_of_box[(round(x1), round(y1), round(x2 - x1),
                                              round(y2 - y1))]])
        return torch.from_numpy(np.stack(rows))

    monkeypatch.setattr(model, "embed_regions", embed_regions)
    results = evaluate_region_set(model, "grounding_regions", cfg, tmp_path / "out")

    column = [DISTINCT.index(caption) for caption in CAPTIONS]
    r2t_ranks = [_rank(scores[region], {column[region]}) for region in range(12)]
    t2r_ranks = [_rank(scores[:, j], {r for r in range(12) if column[r] == j})
                 for j in range(len(DISTINCT))]
    # the hand count, pinned
    assert r2t_ranks == [8, 10, 8, 10, 1, 7, 1, 1, 1, 11, 9, 2]
    assert t2r_ranks == [1, 10, 9, 7, 2, 11, 6, 1, 9, 1, 12]
    # r2t: 4, 5 and 11 of 12 regions within 1, 5, 10; t2r: 3, 4 and 9 of 11 captions
    expected = {"r2t_R@1": 4 / 12, "r2t_R@5": 5 / 12, "r2t_R@10": 11 / 12,
                "t2r_R@1": 3 / 11, "t2r_R@5": 4 / 11, "t2r_R@10": 9 / 11}
    for key, fraction in expected.items():
        assert results[key] == pytest.approx(100 * fraction), key
    assert results["regions"] == 12 and results["captions"] == len(DISTINCT) == 11
    assert results["protocol"]["task"] == "retrieval"
    written = json.loads((tmp_path / "out" / "grounding_regions" / "results.json").read_text())
    assert written["r2t_R@10"] == pytest.approx(results["r2t_R@10"])
