"""Tests of CLOC (specs/cloc.md "Tests to pin"): the Prompter's box encoding and prompt
independence, the region and grounding losses, the RoIAlign baseline, region mAcc on a tiny
COCO JSON, and end to end through tools/train_net.py and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg.errors import OvsegError
from ovseg.methods.cloc.evaluation import RegionRecognitionEvaluator, evaluate_region_set
from ovseg.methods.cloc.model import roi_pool
from ovseg.methods.cloc.training import (
    contrastive_loss,
    grounding_loss,
    near_duplicate_negatives,
)
from ovseg.modeling.prompter import Prompter, PrompterConfig, PromptError, normalize_boxes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "cloc_tiny.yaml"
TRAIN_TINY = REPO / "configs" / "tiny" / "cloc_train_tiny.yaml"


@pytest.fixture(scope="module")
def model():
    return ovseg.build_model(ovseg.get_config(TINY))


def _image(height: int = 50, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- the Prompter


def test_box_in_pixels_encodes_exactly_like_the_same_box_normalised(model):
    image = _image()
    pixels = [[8.0, 5.0, 60.0, 45.0], [0.0, 0.0, 80.0, 50.0], [33.0, 7.0, 41.0, 19.0]]
    normalised = [[x1 / 80, y1 / 50, x2 / 80, y2 / 50] for x1, y1, x2, y2 in pixels]
    assert torch.equal(normalize_boxes(pixels, (50, 80)),
                       normalize_boxes(normalised, (50, 80), normalized=True))
    state = model.encode(image)
    assert torch.equal(model.embed_regions(state, boxes=pixels),
                       model.embed_regions(state, boxes=normalised, normalized=True))
    # the long side is the unit of the padded square input
    assert normalize_boxes([[0, 0, 80, 50]], (50, 80)).tolist() == [[0.0, 0.0, 1.0, 0.625]]


def test_prompts_are_permutation_equivariant_and_independent(model):
    state = model.encode(_image())
    boxes = torch.tensor([[0, 0, 40, 25], [10, 10, 80, 50], [5, 30, 20, 48], [60, 2, 79, 20],
                          [20, 20, 50, 40]], dtype=torch.float32)
    full = model.embed_regions(state, boxes=boxes)
    order = torch.tensor([3, 0, 4, 2, 1])
    permuted = model.embed_regions(state, boxes=boxes[order])
    assert (permuted - full[order]).abs().max() < 1e-5
    for i in range(len(boxes)):  # each prompt alone gives its row of the batch
        alone = model.embed_regions(state, boxes=boxes[i:i + 1])
        assert (alone[0] - full[i]).abs().max() < 1e-5
    # a changed neighbour leaves the others untouched
    changed = boxes.clone()
    changed[1] = torch.tensor([1.0, 1.0, 3.0, 3.0])
    other = model.embed_regions(state, boxes=changed)
    assert (other[[0, 2, 3, 4]] - full[[0, 2, 3, 4]]).abs().max() < 1e-5
    assert (other[1] - full[1]).abs().max() > 1e-3


def test_bad_prompts_are_one_clear_error(model):
    image = _image()
    with pytest.raises(PromptError, match="zero area"):
        model.embed_regions(image, boxes=[[10, 10, 10, 30]])
    with pytest.raises(PromptError, match="zero area"):
        model.embed_regions(image, boxes=[[100, 60, 120, 90]])  # outside: nothing left
    with pytest.raises(PromptError, match="outside"):
        model.embed_regions(image, points=[[81, 3]])
    with pytest.raises(PromptError, match="no box prompt"):
        model.embed_regions(image, boxes=np.zeros((0, 4)))
    with pytest.raises(PromptError, match="no prompt"):
        model.embed_regions(image)
    assert issubclass(PromptError, OvsegError) and issubclass(PromptError, ValueError)
    # partly outside: clipped to the image (documented)
    state = model.encode(image)
    assert torch.equal(model.embed_regions(state, boxes=[[-5, -5, 90, 70]]),
                       model.embed_regions(state, boxes=[[0, 0, 80, 50]]))


# --------------------------------------------------------------------------- losses


def test_region_loss_is_lower_for_matched_than_shuffled_pairs():
    gen = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    regions = F.normalize(texts + 0.3 * torch.randn(8, 16, generator=gen), dim=-1)
    scale = torch.tensor(np.log(1 / 0.07), dtype=torch.float32)
    matched = float(contrastive_loss(regions, texts, scale, 0.9))
    shuffled = float(contrastive_loss(regions, texts[torch.randperm(8, generator=gen)], scale,
                                      0.9))
    assert matched < 0.1 < 2.0 < shuffled, (matched, shuffled)


def test_text_similarity_filter_drops_near_duplicates_without_gradient():
    gen = torch.Generator().manual_seed(1)
    tower = torch.nn.Linear(8, 16)
    words = torch.randn(4, 8, generator=gen)
    words[1] = words[0] + 0.01 * torch.randn(8, generator=gen)  # a near-duplicate caption
    texts = F.normalize(tower(words), dim=-1)
    regions = F.normalize(torch.randn(4, 16, generator=gen), dim=-1)
    scale = torch.tensor(2.0)
    drop = near_duplicate_negatives(texts, texts, 0, 0.9)
    assert not drop.requires_grad
    assert drop.tolist() == [[False, True, False, False], [True, False, False, False],
                             [False, False, False, False], [False, False, False, False]]
    filtered = contrastive_loss(regions, texts, scale, 0.9)
    # the same loss by hand, the pairs (0, 1) and (1, 0) left out of the denominators
    logits = scale.exp() * regions @ texts.T
    masked = logits.masked_fill(drop, float("-inf"))
    by_hand = (F.cross_entropy(masked, torch.arange(4))
               + F.cross_entropy(masked.T, torch.arange(4))) / 2
    assert torch.allclose(filtered, by_hand, atol=1e-6)
    assert not torch.allclose(filtered, contrastive_loss(regions, texts, scale, None))
    # no gradient through the test: the tower's gradient is that of the loss with the mask fixed
    (grad_filtered,) = torch.autograd.grad(filtered, tower.weight, retain_graph=True)
    (grad_by_hand,) = torch.autograd.grad(by_hand, tower.weight)
    assert torch.allclose(grad_filtered, grad_by_hand, atol=1e-6)


def test_grounding_l2_reaches_zero_on_an_overfit_toy():
    torch.manual_seed(0)
    prompter = Prompter(PrompterConfig(width=32, embed_dim=16))
    tokens = torch.randn(2, 5, 32)
    text = F.normalize(torch.randn(4, 16), dim=-1)
    index = torch.tensor([0, 0, 1, 1])
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.4], [0.3, 0.2, 0.9, 0.8], [0.0, 0.5, 0.5, 1.0],
                          [0.6, 0.1, 0.7, 0.3]])
    optimizer = torch.optim.Adam(prompter.parameters(), lr=3e-3, foreach=False)
    first = None
    for _ in range(120):
        loss = grounding_loss(prompter.predict_boxes(
            prompter(prompter.text_tokens(text), tokens, index)), boxes)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = float(loss.detach())
    assert final < 1e-4 < first, (first, final)
    # normalised by 1 / (4 M N): one coordinate off by 0.2 in 4 regions -> 0.04 / 16
    off = boxes.clone()
    off[0, 0] += 0.2
    assert abs(float(grounding_loss(off, boxes)) - 0.04 / 16) < 1e-7


# --------------------------------------------------------------------------- the baseline


def test_roi_align_baseline_on_a_hand_made_feature_map():
    # 8 x 8 cells: left half (1, 0), right half (0, 1); RoIAlign samples bilinearly, so a box
    # ending one cell before the border sees one side only
    features = torch.zeros(1, 2, 8, 8)
    features[0, 0, :, :4] = 1.0
    features[0, 1, :, 4:] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 3.0, 8.0], [5.0, 1.0, 8.0, 7.0], [0.0, 0.0, 8.0, 8.0],
                          [2.0, 0.0, 6.0, 4.0]])
    pooled = roi_pool(features, boxes, output_size=2)
    half = float(1 / np.sqrt(2))
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [half, half], [half, half]])
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_roi_align_extractor_uses_the_dense_clip_map(model):
    image = _image()
    state = model.encode(image)
    z = model.embed_regions(state, boxes=[[0, 0, 80, 50]], extractor="roi_align")
    dense = model.dense_features(state)  # (1, D, 4, 4); the image covers rows 0 .. 2.5
    by_hand = roi_pool(dense, torch.tensor([[0.0, 0.0, 4.0, 2.5]]), 7)
    assert torch.allclose(z, by_hand, atol=1e-6)
    with pytest.raises(PromptError, match="box prompts only"):
        model.embed_regions(state, points=[[3, 3]], extractor="roi_align")


# --------------------------------------------------------------------------- evaluation


def write_region_set(root: Path, count: int = 8, seed: int = 0) -> dict:
    """``count`` images of coloured rectangles + a COCO JSON: categories red / green / blue,
    one box per rectangle with a caption, image captions; returns the JSON."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
    names = {1: "red", 2: "green", 3: "blue"}
    images, annotations = [], []
    for index in range(count):
        height, width = (60, 90) if index % 2 else (90, 60)
        image = np.full((height, width, 3), 128, np.uint8)
        for _ in range(3):
            cat = int(rng.integers(1, 4))
            x, y = int(rng.integers(0, width - 25)), int(rng.integers(0, height - 25))
            w, h = int(rng.integers(12, 25)), int(rng.integers(12, 25))
            image[y:y + h, x:x + w] = colours[cat]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0, "caption": f"a {names[cat]} square"})
        name = f"{index:03d}.png"
        cv2.imwrite(str(root / "images" / name), image[:, :, ::-1])
        images.append({"id": index + 1, "file_name": name, "height": height, "width": width,
                       "caption": "coloured squares on grey"})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in names.items()]}
    (root / "regions.json").write_text(json.dumps(data), encoding="utf-8")
    return data


def test_region_macc_on_a_tiny_coco_json_equals_a_hand_count(tmp_path, model, monkeypatch):
    data = write_region_set(tmp_path / "tiny")
    cfg = ovseg.get_config(TRAIN_TINY, ["datasets.root", str(tmp_path)])
    # a fake extractor: boxes whose x1 is even are called "red", the others their true class
    truth = {tuple(a["bbox"]): a["category_id"] for a in data["annotations"]}

    def fake_embed(state, boxes=None, **_):
        text = model.class_text(["red", "green", "blue"])
        rows = []
        for x1, y1, x2, y2 in torch.as_tensor(boxes).tolist():
            cat = truth[(int(x1), int(y1), int(x2 - x1), int(y2 - y1))]
            rows.append(text[0] if int(x1) % 2 == 0 else text[cat - 1])
        return torch.stack(rows)

    monkeypatch.setattr(model, "embed_regions", fake_embed)
    results = evaluate_region_set(model, "tiny_regions", cfg, tmp_path / "out")
    correct = {1: 0, 2: 0, 3: 0}
    total = {1: 0, 2: 0, 3: 0}
    for a in data["annotations"]:
        total[a["category_id"]] += 1
        predicted = 1 if a["bbox"][0] % 2 == 0 else a["category_id"]
        correct[a["category_id"]] += predicted == a["category_id"]
    by_hand = 100 * np.mean([correct[c] / total[c] for c in total])
    assert results["mAcc"] == pytest.approx(by_hand, abs=1e-9)
    assert results["regions"] == len(data["annotations"])
    assert json.loads((tmp_path / "out" / "tiny_regions" / "results.json").read_text())["mAcc"] \
        == pytest.approx(by_hand)


def test_evaluator_skips_absent_classes():
    evaluator = RegionRecognitionEvaluator(["a", "b", "c"])
    evaluator.process([0, 1, 1, 0], [0, 0, 1, 1])
    results = evaluator.evaluate()
    assert results["mAcc"] == pytest.approx(50.0)  # a: 1/2, b: 1/2, c absent
    assert results["classes_evaluated"] == 2 and results["accuracy"] == pytest.approx(50.0)


# --------------------------------------------------------------------------- end to end


def test_losses_on_a_real_batch(tmp_path, model):
    write_region_set(tmp_path / "tiny", count=4)
    cfg = ovseg.get_config(TRAIN_TINY, ["datasets.root", str(tmp_path)])
    dataset = model.train_dataset(cfg)
    batch = model.collate([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["boxes"].shape == (4, 4, 4)
    losses = model.loss(batch)
    assert set(losses) == {"loss_clip", "loss_cloc", "loss_grounding"}
    sum(losses.values()).backward()
    assert model.prompter.proj.weight.grad is not None
    assert all(p.grad is None for p in model.clip.parameters())


@pytest.mark.slow
def test_train_eval_and_demo_end_to_end(tmp_path):
    write_region_set(tmp_path / "tiny", count=8)
    out = tmp_path / "run"
    common = ["--config-file", str(TRAIN_TINY), "datasets.root", str(tmp_path),
              "output_dir", str(out)]
    run = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), *common],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    total = [sum(m[k] for k in ("loss_clip", "loss_cloc", "loss_grounding"))
             for m in metrics if "loss_cloc" in m]
    assert np.mean(total[-5:]) < np.mean(total[:5]), total
    trained = json.loads((out / "tiny_regions" / "results.json").read_text())
    assert 0.0 <= trained["mAcc"] <= 100.0 and trained["regions"] == 24

    evaluated = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--eval-only", "--resume",
         *common], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((out / "tiny_regions" / "results.json").read_text())
    assert again["mAcc"] == pytest.approx(trained["mAcc"])

    demo = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py"), "--config-file", str(TRAIN_TINY),
         "--input", str(tmp_path / "tiny" / "images" / "000.png"), "--output",
         str(tmp_path / "demo"), "--vocab", "red,green,blue", "--boxes", "5,5,30,40;10,20,50,80",
         "--points", "20,30", "--device", "cpu", "--opts", "model.weights",
         str(sorted(out.glob("model_*.safetensors"))[-1])],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    regions = json.loads((tmp_path / "demo" / "000_regions.json").read_text())["regions"]
    assert [r["kind"] for r in regions] == ["box", "box", "point"]
    assert all(r["class"] in ("red", "green", "blue") for r in regions)
    assert (tmp_path / "demo" / "000_regions.png").is_file()
