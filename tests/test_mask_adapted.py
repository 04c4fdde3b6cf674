"""Tests of Mask-adapted CLIP (ovseg/methods/mask_adapted; spec mask_adapted.md): the method
equals a direct composition of the groundwork functions, 0 / 1 / many valid queries, batched
crops equal one-by-one crops, the authors' checkpoint and our trained weights load, the three
training stages train the right parameters, and the tiny proposal network trains end to end
through ``tools/train_net.py``, then ``--eval-only`` and the demo run with its weights.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import default_collate

import ovseg
from ovseg.encoders.weights import save_state_dict_file
from ovseg.engine.checkpoint import load_model_state, trainable_state_dict
from ovseg.engine.trainer import build_optimizer, trainable_parameters
from ovseg.errors import WeightsError
from ovseg.layers.mask_ensemble import clip_region_logits, ensemble_probabilities, semantic_map
from ovseg.layers.masked_crops import CLIP_MEAN_COLOUR, masked_crop_batches
from ovseg.layers.resize import image_tensor, rescale_size
from ovseg.methods.mask_adapted import MaskAdapted, MaskAdaptedState
from ovseg.methods.mask_adapted.training import STORED_FILL, semantic_targets
from ovseg.modeling.mask_proposal import normalize_images
from ovseg.modeling.mask_proposal.checkpoint import authors_key
from ovseg.modeling.matcher import HungarianMatcher
from tests.helpers import load_script, run_train_net

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "mask_adapted_tiny.yaml"
TRAIN_TINY = REPO / "configs" / "tiny" / "mask_adapted_train_tiny.yaml"
VOCAB = ["sky", "dog", "grass"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


def tiny(cache: Path, *overrides: str) -> MaskAdapted:
    cfg = ovseg.get_config(str(TINY), ["text.cache_dir", str(cache), *overrides])
    return ovseg.build_model(cfg)


def photo(seed: int = 0, size=(70, 90)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def set_threshold_between(model: MaskAdapted, state: MaskAdaptedState, valid: int) -> None:
    """A threshold that exactly ``valid`` queries pass (their max probability above it)."""
    peaks = state.mask_probs.flatten(1).max(1).values.sort(descending=True).values
    if valid == 0:
        model.settings.mask_threshold = float(peaks[0]) + 1e-6
    else:
        model.settings.mask_threshold = float((peaks[valid - 1] + peaks[valid]) / 2)


# --------------------------------------------------------------------------- inference


def direct_composition(model: MaskAdapted, image: np.ndarray, names: list[str]):
    """(C, H, W) class map and labels from the groundwork functions, step by step."""
    settings, inference = model.settings, model.inference
    size = rescale_size(*image.shape[:2], inference.short_side, inference.max_long_side)
    resized = image_tensor(image, size, "cpu")
    text = model.text_classifier(names)
    proposals = model.proposals.inference(normalize_images(resized), text)
    mask_probs, class_probs = proposals.mask_probs[0], proposals.class_probs[0]
    regions, queries = [], []
    for crops in masked_crop_batches(resized[0], mask_probs, threshold=settings.mask_threshold,
                                     crop_batch=settings.crop_batch, fill=CLIP_MEAN_COLOUR):
        regions.append(model.prompts(model.clip, crops.images, crops.masks))
        queries.append(crops.queries)
    regions = torch.cat(regions) if regions else torch.zeros(0, model.clip.embed_dim)
    valid = torch.zeros(mask_probs.shape[0], dtype=torch.bool)
    if queries:
        valid[torch.cat(queries)] = True
    clip_logits = clip_region_logits(regions, text, model.proposals.no_object_embedding)
    # log of the proposal softmax: its own softmax gives the same probabilities back
    probs, kept = ensemble_probabilities(class_probs.log(), clip_logits, valid,
                                         settings.clip_ensemble_weight)
    semantic = semantic_map(probs, mask_probs[kept])
    semantic = F.interpolate(semantic[None], size=image.shape[:2], mode="bilinear",
                             align_corners=False)[0]
    return semantic, semantic.argmax(0), valid


@torch.no_grad()
def test_predict_equals_the_direct_composition_with_some_invalid_queries(cache):
    model = tiny(cache)
    image = photo()
    state = model.encode(image)
    assert state.mask_probs.shape == (10, 64, 82) and state.class_embeddings.shape == (10, 64)
    set_threshold_between(model, state, valid=4)
    expected, labels, valid = direct_composition(model, image, VOCAB)
    assert int(valid.sum()) == 4
    prediction = model.predict(image, VOCAB)
    assert prediction.labels.shape == (70, 90) and prediction.classes == VOCAB
    torch.testing.assert_close(prediction.probabilities(), expected, atol=1e-5, rtol=1e-4)
    assert (prediction.labels == labels.numpy()).mean() > 0.999
    # encode once, score twice: the state gives the same map
    state = model.encode(image)
    assert torch.equal(state.valid, valid)
    torch.testing.assert_close(model.predict(state, VOCAB).probabilities(), expected,
                               atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_zero_one_and_many_valid_queries(cache):
    model = tiny(cache)
    image = photo(1)
    state = model.encode(image)
    for count in (0, 1, 10):
        set_threshold_between(model, state, count) if count < 10 else None
        if count == 10:
            model.settings.mask_threshold = 0.0
        encoded = model.encode(image)
        assert int(encoded.valid.sum()) == count
        assert encoded.region_embeddings.shape == (count, 64)
        expected, labels, _ = direct_composition(model, image, VOCAB)
        probabilities = model.predict(encoded, VOCAB).probabilities()
        torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)
    # lambda <= 0: CLIP only, the valid queries only; none valid -> an all-zero map, label 0
    model.settings.clip_ensemble_weight = 0.0
    set_threshold_between(model, state, 0)
    prediction = model.predict(image, VOCAB)
    assert (prediction.labels == 0).all() and prediction.probabilities().abs().max() == 0
    set_threshold_between(model, state, 1)
    expected, labels, _ = direct_composition(model, image, VOCAB)
    torch.testing.assert_close(model.predict(image, VOCAB).probabilities(), expected)


@torch.no_grad()
def test_batched_crops_equal_one_by_one(cache):
    model = tiny(cache, "model.mask_adapted.mask_threshold", "0.5")
    image = photo(2, (90, 120))
    outputs = {}
    for crop_batch in (1, 3, 32):
        model.settings.crop_batch = crop_batch
        state = model.encode(image)
        outputs[crop_batch] = (state, model.predict(state, VOCAB))
    base_state, base = outputs[1]
    assert int(base_state.valid.sum()) > 1
    for state, prediction in list(outputs.values())[1:]:
        assert torch.equal(state.valid, base_state.valid)
        torch.testing.assert_close(state.mask_probs, base_state.mask_probs, atol=0, rtol=0)
        torch.testing.assert_close(state.region_embeddings, base_state.region_embeddings,
                                   atol=1e-5, rtol=1e-5)
        assert np.array_equal(prediction.labels, base.labels)


@torch.no_grad()
def test_mask_prompts_off_uses_clips_own_image_embedding(cache):
    model = tiny(cache, "model.mask_adapted.mask_prompt_fwd", "false")
    images = torch.randn(2, 3, 224, 224)
    masks = torch.zeros(2, 224, 224)
    torch.testing.assert_close(model.embed_regions(images, masks),
                               model.clip.encode_image(images).float())
    # zero prompts, a full mask: MPT changes nothing either
    model.settings.mask_prompt_fwd = True
    torch.testing.assert_close(model.embed_regions(images, masks + 1),
                               model.clip.encode_image(images).float(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- weights


def authors_file(source: MaskAdapted, path: Path, extra: dict | None = None) -> Path:
    """A fake released OVSeg file with the authors' key names: the proposal network, the CLIP
    (``clip_adapter.clip_model.*`` incl. ``visual.mask_embedding``) and the constants."""
    state = {authors_key(k): v.clone() for k, v in source.proposals.state_dict().items()}
    for key, value in source.clip.model.state_dict().items():
        state[f"clip_adapter.clip_model.{key}"] = value.clone()
    state["clip_adapter.clip_model.visual.mask_embedding"] = source.prompts.mask_embedding.clone()
    state["criterion.empty_weight"] = torch.ones(5)
    state.update(extra or {})
    torch.save({"model": state, "iteration": 1}, path)
    return path


def test_authors_checkpoint_loads_proposals_clip_and_prompts(cache, tmp_path):
    source = tiny(cache, "model.clip.weights", "random")
    with torch.no_grad():
        source.prompts.mask_embedding.normal_(std=0.02)
        source.proposals.no_object_embedding.normal_()
        source.clip.model.visual.conv1.weight.mul_(1.5)
        for p in source.proposals.parameters():
            p.add_(0.01)
    path = authors_file(source, tmp_path / "ovseg_fake.pth")
    model = tiny(cache, "model.mask_adapted.checkpoint", str(path))
    for key, value in source.proposals.state_dict().items():
        assert torch.equal(model.proposals.state_dict()[key], value), key
    assert torch.equal(model.prompts.mask_embedding, source.prompts.mask_embedding)
    assert torch.equal(model.clip.model.visual.conv1.weight, source.clip.model.visual.conv1.weight)
    assert "ovseg:" in model.clip.name  # its own text-classifier cache key
    image = photo(3)
    assert np.array_equal(model.predict(image, VOCAB).labels, source.predict(image, VOCAB).labels)

    wrong = authors_file(source, tmp_path / "wrong.pth", {"sem_seg_head.extra_head.weight":
                                                          torch.zeros(2)})
    with pytest.raises(WeightsError) as raised:
        tiny(cache, "model.mask_adapted.checkpoint", str(wrong))
    assert "extra_head" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(WeightsError, match="does not exist"):
        tiny(cache, "model.mask_adapted.checkpoint", str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("stage", ["proposals", "prompts", "clip"])
def test_trained_weights_round_trip(cache, tmp_path, stage):
    model = tiny(cache, "model.mask_adapted.stage", stage)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = trainable_state_dict(model)
    expected_keys = {
        "proposals": {f"proposals.{k}" for k, _ in model.proposals.named_parameters()},
        "prompts": {"prompts.mask_embedding"},
        "clip": {f"clip.model.visual.{k}" for k, _ in model.clip.model.visual.named_parameters()},
    }[stage]
    assert set(state) == expected_keys
    if stage == "proposals":
        assert "proposals.no_object_embedding" in state
    path = tmp_path / f"{stage}.safetensors"
    save_state_dict_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh = tiny(cache, "model.mask_adapted.stage", stage)
    load_model_state(fresh, load_file(str(path)), str(path))
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    image = photo(4)
    assert np.array_equal(fresh.predict(image, VOCAB).labels, model.predict(image, VOCAB).labels)


# --------------------------------------------------------------------------- training


def test_stage_parameters_and_optimizer_groups(cache):
    model = tiny(cache, "model.mask_adapted.backbone_lr_multiplier", "0.1")
    solver = ovseg.get_config(str(TRAIN_TINY)).solver
    solver.base_lr = 2e-4
    solver.weight_decay = 1e-4
    params = trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.proposals.parameters()}
    groups = {g["name"]: g for g in build_optimizer(solver, params, model).param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)
    assert groups["head"]["lr"] == pytest.approx(2e-4)
    assert groups["head"]["weight_decay"] == 1e-4 and groups["head_no_decay"]["weight_decay"] == 0
    no_decay = {id(p) for p in groups["head_no_decay"]["params"]}
    assert id(model.proposals.no_object_embedding) in no_decay
    assert id(model.proposals.predictor.query_embed.weight) in no_decay
    for stage, expected in (("clip", list(model.clip.model.visual.parameters())),
                            ("prompts", [model.prompts.mask_embedding])):
        model.set_stage(stage)
        assert [id(p) for p in trainable_parameters(model)] == [id(p) for p in expected]
        assert not any(p.requires_grad for p in model.clip.model.transformer.parameters())


def test_semantic_targets_are_the_classes_present_without_ignore():
    label = torch.tensor([[[0, 0, 2], [2, -1, 5]]])
    (target,) = semantic_targets(label)
    assert target.labels.tolist() == [0, 2, 5]
    assert target.masks.tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [1, 0, 0]],
                                     [[0, 0, 0], [0, 0, 1]]]


def write_pairs(root: Path) -> Path:
    """Three region crops with the stored fill (124, 116, 103) outside a shape, and nouns."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, noun in enumerate(["dog", "cat", "car"]):
        crop = np.zeros((40 + 8 * index, 50, 3), np.uint8) + np.array(STORED_FILL, np.uint8)
        crop[10:30, 5 + index:40] = (200, 30 * index, 90)
        cv2.imwrite(str(root / f"{index}.png"), crop[:, :, ::-1])
        lines.append(json.dumps({"image": f"{index}.png", "noun": noun}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.mark.parametrize("stage", ["clip", "prompts"])
def test_region_stages_train_their_parameters_only(cache, tmp_path, stage):
    pairs = write_pairs(tmp_path / "pairs")
    cfg = ovseg.get_config(str(TINY), ["text.cache_dir", str(cache), "model.mask_adapted.stage",
                                       stage, "model.mask_adapted.region_pairs", str(pairs)])
    model = ovseg.build_model(cfg)
    dataset = model.train_dataset(cfg)
    sample = dataset[0]
    assert sample["image"].shape == (3, 224, 224) and sample["noun"] == "dog"
    if stage == "prompts":
        # the shape covers rows 10..29 of 40 and columns 5..39 of 50: about half the crop
        assert 0.2 < float(sample["mask"].mean()) < 0.5
        assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    batch = default_collate([dataset[i] for i in range(3)])
    model.train()
    losses = model.loss(batch)
    assert set(losses) == {"loss_contrastive"} and losses["loss_contrastive"] > 0
    losses["loss_contrastive"].backward()
    trained = model.trainable_parameters()
    assert all(p.grad is not None for p in trained)
    others = [p for p in model.parameters() if all(p is not q for q in trained)]
    assert all(p.grad is None for p in others)


# --------------------------------------------------------------------------- end to end


def write_shapes(root: Path, size: int = 64) -> Path:
    """Three images of 2-3 coloured shapes (1 square, 2 disc, 3 triangle) on plain
    backgrounds (0), as a custom data set: images/, labels/ (uint8 PNG), classes.txt."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:size, :size]

    def square(cy, cx, r):
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)

    def disc(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    def triangle(cy, cx, r):
        return (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) // 2)

    colours = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 230)}
    scenes = [((200, 200, 200), [(1, square(18, 18, 10)), (2, disc(44, 42, 12))]),
              ((30, 30, 30), [(2, disc(20, 40, 11)), (3, triangle(42, 20, 14))]),
              ((120, 110, 90), [(1, square(46, 46, 9)), (3, triangle(20, 22, 12)),
                                (2, disc(16, 50, 8))])]
    for index, (background, shapes) in enumerate(scenes):
        image = np.zeros((size, size, 3), np.uint8) + np.array(background, np.uint8)
        label = np.zeros((size, size), np.uint8)
        for value, mask in shapes:
            image[mask] = colours[value]
            label[mask] = value
        cv2.imwrite(str(root / "images" / f"{index}.png"), image[:, :, ::-1])
        cv2.imwrite(str(root / "labels" / f"{index}.png"), label)
    (root / "classes.txt").write_text("background\nsquare\ndisc\ntriangle\n")
    return root


def _train_net(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_train_net(*args, timeout=timeout, threads=2)


def _load_demo():
    return load_script("demo/demo.py")


def test_train_proposals_then_evaluate_and_demo(tmp_path, cache):
    shapes = write_shapes(tmp_path / "shapes")
    data = ["datasets.custom",
            f"[{{name: shapes, image_dir: {shapes / 'images'}, label_dir: {shapes / 'labels'}, "
            f"class_file: {shapes / 'classes.txt'}, image_ext: .png}}]",
            "text.cache_dir", str(cache)]
    output = tmp_path / "run"
    _train_net("--config-file", str(TRAIN_TINY), *data, "datasets.train", "[shapes]",
               "output_dir", str(output))
    records = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    total = np.array([r["total_loss"] for r in records if "total_loss" in r])
    assert len(total) == 120
    first, last = total[:5].mean(), total[-5:].mean()
    assert last < 0.1 * first, (first, last)
    weights = output / "model_0000120.safetensors"
    stored = load_file(str(weights))
    assert "proposals.no_object_embedding" in stored
    assert not any(k.startswith(("clip.", "prompts.")) for k in stored)

    # the trained masks on the training images: matched IoU > 0.5 for every target
    model = ovseg.build_model(ovseg.get_config(str(TRAIN_TINY), data))
    load_model_state(model, stored, str(weights))
    names = ["background", "square", "disc", "triangle"]
    images = torch.stack([torch.from_numpy(cv2.imread(str(p))[:, :, ::-1].copy()).permute(2, 0, 1)
                          for p in sorted((shapes / "images").glob("*.png"))])
    labels = torch.stack([torch.from_numpy(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).long()
                          for p in sorted((shapes / "labels").glob("*.png"))])
    targets = semantic_targets(labels)
    with torch.no_grad():
        text = model.text_classifier(names)
        out = model.proposals(normalize_images(images), text, aux=False)
        matches = HungarianMatcher()(out.class_logits, out.mask_logits, targets)
        masks = model.proposals.inference(normalize_images(images), text).mask_probs
    ious = []
    for b, (queries, matched) in enumerate(matches):
        predicted, truth = masks[b, queries] > 0.5, targets[b].masks[matched]
        inter = (predicted & truth).flatten(1).sum(1).float()
        ious += (inter / (predicted | truth).flatten(1).sum(1).float()).tolist()
    assert len(ious) == 10 and min(ious) > 0.5, ious

    # --eval-only with the trained weights on the same images
    _train_net("--config-file", str(TRAIN_TINY), "--eval-only", *data, "datasets.test",
               "[shapes]", "model.weights", str(weights), "output_dir", str(tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "shapes" / "results.json").read_text())
    assert 0 <= results["mIoU"] <= 100

    # the demo with the trained weights gives what the model with them predicts
    image = cv2.imread(str(shapes / "images" / "1.png"))
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    code = _load_demo().main(["--config-file", str(TRAIN_TINY), "--input",
                              str(tmp_path / "photo.png"), "--output", str(tmp_path / "demo"),
                              "--vocab", ",".join(names), "--device", "cpu",
                              "model.mask_adapted.trained_weights", str(weights),
                              "text.cache_dir", str(cache)])
    assert code == 0
    demo_labels = cv2.imread(str(tmp_path / "demo" / "photo_labels.png"), cv2.IMREAD_UNCHANGED)
    model = ovseg.build_model(ovseg.get_config(str(TRAIN_TINY), [
        *data, "model.mask_adapted.trained_weights", str(weights)]))
    for key, value in stored.items():
        assert torch.equal(model.state_dict()[key], value)
    expected = model.predict(image[:, :, ::-1].copy(), names).labels
    assert np.array_equal(demo_labels, expected)
