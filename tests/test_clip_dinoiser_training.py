"""Tests of CLIP-DINOiser's training (ovseg/methods/clip_dinoiser/training.py; spec
clip_dinoiser.md "Training"): targets, loss, learning rates, data, target cache, end to end.

The end-to-end test trains the tiny model on a folder of generated images through
``tools/train_net.py``, then evaluates the trained heads with ``--eval-only`` on a tiny VOC and
runs the demo with them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from safetensors.torch import load_file
from torch.utils.data import default_collate

import ovseg
from ovseg.engine.trainer import build_lr_scheduler, build_optimizer, trainable_parameters
from ovseg.errors import ConfigError, DatasetError, WeightsError
from ovseg.methods.clip_dinoiser import training
from ovseg.methods.clip_dinoiser.training import (
    background_target,
    correlation_target,
    dinoiser_loss,
    draw_subset,
)
from ovseg.modeling.dinoiser_heads import DinoiserHeads
from ovseg.modeling.found import FoundDecoder
from tests.fixtures.builders import build_voc
from tests.helpers import load_script, run_train_net

REPO = Path(__file__).resolve().parents[1]
TRAIN_TINY = REPO / "configs" / "tiny" / "clip_dinoiser_train_tiny.yaml"
TRAIN_FULL = REPO / "configs" / "clip_dinoiser" / "train_imagenet1k.yaml"
HEAD_KEYS = {"heads.correlation.weight", "heads.correlation.bias", "heads.background.weight",
             "heads.background.bias"}


# --------------------------------------------------------------------------- fixtures


def make_image_folder(root: Path, count: int = 12, seed: int = 0) -> Path:
    """``count`` PNGs of coloured shapes on a plain background, sizes 80x100 and 100x80."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = (80, 100) if index % 2 else (100, 80)
        image = np.full((*size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(20, size[1] - 20)), int(rng.integers(20, size[0] - 20)))
        if index % 3:
            cv2.circle(image, centre, int(rng.integers(10, 25)), colour, -1)
        else:
            cv2.rectangle(image, (centre[0] - 15, centre[1] - 12),
                          (centre[0] + 15, centre[1] + 12), colour, -1)
        cv2.imwrite(str(root / f"{index:03d}.png"), image)
    return root


def save_found_decoder(path: Path, in_dim: int = 64, seed: int = 0) -> Path:
    """A random FOUND decoder in the released file's key layout ({'decoder': weight, bias})."""
    torch.manual_seed(seed)
    torch.save({"decoder": FoundDecoder(in_dim).decoder.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dinoiser_training")
    return {"base": base, "images": make_image_folder(base / "images"),
            "found": save_found_decoder(base / "decoder_weights.pt")}


def tiny_config(files: dict[str, Path], *overrides: str):
    return ovseg.get_config(str(TRAIN_TINY), [
        "model.clip_dinoiser.image_dir", str(files["images"]),
        "model.clip_dinoiser.found_weights", str(files["found"]), *overrides])


@pytest.fixture(scope="module")
def tiny(files):
    cfg = tiny_config(files)
    return cfg, ovseg.build_model(cfg)


# --------------------------------------------------------------------------- targets


def _values(patches: list[list[float]], heads: int = 2) -> torch.Tensor:
    """(1, heads, 1 + N, d / heads) per-head values of N patch vectors (heads concatenated),
    after a class token that must be ignored."""
    vectors = torch.tensor([[50.0, -50.0, 50.0, -50.0], *patches])  # class token first
    tokens, dim = vectors.shape
    return vectors.reshape(1, tokens, heads, dim // heads).permute(0, 2, 1, 3)


def test_correlation_target_is_cosine_of_normalised_values_at_least_0_2():
    side = math.sqrt(1 - 0.1999**2)
    patches = [
        [1.0, 0.0, 0.0, 0.0],
        [7.0, 14.0, 14.0, 28.0],  # (1, 2, 2, 4) x 7: cosine with patch 0 exactly 0.2
        [0.1999, side, 0.0, 0.0],  # cosine 0.1999 with patch 0
        [-3.0, 0.0, 0.0, 0.0],  # cosine -1 with patch 0
    ]
    target = correlation_target(_values(patches), num_prefix_tokens=1, threshold=0.2)
    assert target.shape == (1, 4, 4) and target.dtype == torch.float32
    assert target[0, 0, 1] == 1 and target[0, 1, 0] == 1  # 0.2 is kept
    assert target[0, 0, 2] == 0 and target[0, 2, 0] == 0  # 0.1999 is dropped
    assert target[0, 0, 3] == 0  # negatives are dropped
    assert torch.equal(target[0].diagonal(), torch.ones(4))
    # direct computation: cosine of the L2-normalised 4-d vectors, thresholded
    vectors = torch.nn.functional.normalize(torch.tensor(patches), dim=1)
    torch.testing.assert_close(target[0], (vectors @ vectors.T >= 0.2).float())


def test_found_target_is_sigmoid_resized_to_the_clip_grid_then_above_0_5():
    zero = torch.zeros(1, 1, 8, 8)  # sigmoid exactly 0.5 everywhere: not > 0.5
    assert background_target(zero, (4, 4), 0.5).sum() == 0
    assert background_target(zero + 1e-3, (4, 4), 0.5).sum() == 16
    halves = torch.cat([torch.full((1, 1, 8, 4), 4.0), torch.full((1, 1, 8, 4), -4.0)], dim=-1)
    target = background_target(halves, (4, 4), 0.5)
    assert target.shape == (1, 1, 4, 4)
    assert torch.equal(target[0, 0], torch.tensor([[1.0, 1, 0, 0]]).repeat(4, 1))
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    expected = (TF.resize(torch.sigmoid(logits), [4, 4]) > 0.5).float()
    torch.testing.assert_close(background_target(logits, (4, 4), 0.5), expected)


# --------------------------------------------------------------------------- loss


def _bce(logit: float, target: float) -> float:
    return math.log1p(math.exp(logit)) - target * logit


def test_loss_is_bce_on_clamped_head_cosines_plus_bce_on_background(monkeypatch):
    heads = DinoiserHeads(in_dim=4, proj_dim=2)
    with torch.no_grad():
        heads.correlation.weight.zero_()
        heads.correlation.weight[0, 0, 1, 1] = 1.0  # the centre tap copies channels 0 and 1
        heads.correlation.weight[1, 1, 1, 1] = 1.0
        heads.correlation.bias.zero_()
        heads.background.weight.zero_()
        heads.background.weight[0, 0, 0, 0] = 2.0
        heads.background.bias.fill_(0.5)
    # three patches in a row: (1, 0), (1, 1), (-1, 0) in channels 0-1 (channels 2-3 zero)
    ln2 = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0], [0.0] * 3, [0.0] * 3])
    ln2 = ln2.reshape(1, 4, 1, 3)
    model = SimpleNamespace(
        heads=heads, settings=SimpleNamespace(target_cache_dir=""),
        clip=SimpleNamespace(normalize=lambda x: x),
        head_inputs=lambda windows: (None, ln2),
    )
    corr_target = torch.tensor([[[1.0, 0, 0], [1, 1, 0], [0, 0, 1]]])
    bkg_target = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    monkeypatch.setattr(training, "batch_targets",
                        lambda model, images, keys, grid: (corr_target, bkg_target))
    losses = dinoiser_loss(model, {"image": torch.zeros(1, 3, 16, 48)})

    c = math.sqrt(0.5)  # cosine of (1, 0) and (1, 1)
    cosines = [[1, c, -1], [c, 1, -c], [-1, -c, 1]]
    expected = sum(_bce(max(cosines[i][j], 0.0), float(corr_target[0, i, j]))
                   for i in range(3) for j in range(3)) / 9
    assert losses["loss_correlation"].item() == pytest.approx(expected, rel=1e-6)
    # background: 2 x (channel 0 of the L2-normalised input) + 0.5
    logits = [2 * 1 + 0.5, 2 * c + 0.5, 2 * -1 + 0.5]
    expected = sum(_bce(x, t) for x, t in zip(logits, [1.0, 0.0, 1.0], strict=True)) / 3
    assert losses["loss_background"].item() == pytest.approx(expected, rel=1e-6)
    assert set(losses) == {"loss_correlation", "loss_background"}


def test_loss_on_a_real_batch_trains_the_heads_only(files, tiny):
    cfg, model = tiny
    dataset = model.train_dataset(cfg)
    batch = default_collate([dataset[i] for i in range(2)])
    losses = model.loss(batch)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())
    teachers = training.teachers_of(model)
    assert not any(p.requires_grad for p in teachers.dino.parameters())
    # the teachers are not the model's: never in a state dict or a checkpoint
    assert not any(key.startswith(("dino", "found", "_dinoiser")) for key in model.state_dict())
    model.heads.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- optimizer


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_two_learning_rates_and_the_step_at_5000(files, tiny):
    _, model = tiny
    solver = ovseg.get_config(str(TRAIN_FULL)).solver
    optimizer = build_optimizer(solver, trainable_parameters(model), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["correlation"]["params"] == list(model.heads.correlation.parameters())
    assert groups["background"]["params"] == list(model.heads.background.parameters())
    for group in groups.values():
        assert group["weight_decay"] == 0.01 and group["betas"] == (0.9, 0.999)
    scheduler = build_lr_scheduler(solver, optimizer)
    # the reference: torch's MultiStepLR([5000], 0.1) stepped after every iteration
    mirror_optimizer = torch.optim.AdamW([
        {"params": [torch.zeros(1, requires_grad=True)], "lr": 5e-5},
        {"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-2}])
    mirror = torch.optim.lr_scheduler.MultiStepLR(mirror_optimizer, [5000], gamma=0.1)
    lrs = {}
    for iteration in range(solver.max_iter):  # the lr that iteration (0-based) trains with
        lrs[iteration] = [g["lr"] for g in optimizer.param_groups]
        assert lrs[iteration] == pytest.approx([g["lr"] for g in mirror_optimizer.param_groups])
        scheduler.step()
        mirror.step()
    assert solver.max_iter == 6300 and solver.ims_per_batch == 16 and solver.warmup_iters == 0
    assert lrs[0] == pytest.approx([5e-5, 1e-2]) and lrs[4999] == pytest.approx([5e-5, 1e-2])
    assert lrs[5000] == pytest.approx([5e-6, 1e-3]) and lrs[6299] == pytest.approx([5e-6, 1e-3])


def test_param_groups_config_errors(files, tiny):
    _, model = tiny
    params = trainable_parameters(model)
    solver = tiny_config(files, "solver.param_groups", "[{name: backgrund, lr: 0.1}]").solver
    with pytest.raises(ConfigError, match=r"unknown parameter groups \['backgrund'\]"):
        build_optimizer(solver, params, model)
    # a group not listed trains at base_lr
    solver = tiny_config(files, "solver.param_groups", "[{name: background, lr: 0.5}]",
                         "solver.base_lr", "0.25").solver
    lrs = {g["name"]: g["lr"] for g in build_optimizer(solver, params, model).param_groups}
    assert lrs == {"correlation": 0.25, "background": 0.5}


# --------------------------------------------------------------------------- data


def test_subset_without_duplicates_by_default_and_with_them_as_the_reference():
    distinct = draw_subset(50, 20, with_replacement=False, seed=0)
    assert len(distinct) == 20 and len(set(distinct.tolist())) == 20
    assert np.array_equal(distinct, draw_subset(50, 20, False, 0))  # seeded
    assert not np.array_equal(distinct, draw_subset(50, 20, False, 1))
    assert np.array_equal(draw_subset(5, 20, False, 0), np.arange(5))  # fewer images: all
    drawn = draw_subset(5, 20, with_replacement=True, seed=0)
    np.random.seed(0)
    assert np.array_equal(drawn, np.random.choice(list(range(5)), 20))  # the reference's draw
    assert len(set(drawn.tolist())) < 20


def test_dataset_crops_and_subset_from_the_config(files, tiny):
    cfg, model = tiny
    dataset = model.train_dataset(cfg)
    assert len(dataset) == 12 and len(set(dataset.files)) == 12
    sample = dataset[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1  # not normalised
    cfg = tiny_config(files, "model.clip_dinoiser.with_replacement", "true",
                      "model.clip_dinoiser.subset_size", "30")
    dataset = training.build_train_dataset(model, cfg)
    assert len(dataset) == 30 and len(set(dataset.files)) < 30


def test_augmentation_crops_flips_and_scales_brightness():
    image = torch.rand(3, 64, 80)
    augmentation = training.Augmentation((64, 80), top=0, left=10, crop=64, flip=True,
                                         brightness=1.5)
    expected = (image[:, :, 10:74].flip(-1) * 1.5).clamp(0, 1)
    torch.testing.assert_close(augmentation.apply(image), expected)
    assert training.resized_size(375, 500, 448) == (448, 597)
    assert training.resized_size(500, 375, 448) == (597, 448)
    draws = [training.Augmentation.draw((64, 80), 64, np.random.default_rng(i)) for i in range(40)]
    assert {d.top for d in draws} == {0} and {d.flip for d in draws} == {True, False}
    assert all(0 <= d.left <= 16 and 0.5 <= d.brightness <= 1.5 for d in draws)


def test_unreadable_files_are_skipped_with_one_warning_each(tmp_path, tiny, caplog):
    cfg, model = tiny
    folder = make_image_folder(tmp_path / "mixed", count=3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    cfg = ovseg.get_config(str(TRAIN_TINY), [
        "model.clip_dinoiser.image_dir", str(folder),
        "model.clip_dinoiser.found_weights", str(cfg.model.clip_dinoiser.found_weights)])
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        dataset = training.build_train_dataset(model, cfg)
    assert len(dataset) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert sorted(Path(w.split("cannot read image ")[1].split(":")[0]).name
                  for w in warnings) == ["broken.jpg", "empty.png"]
    assert all("\n" not in w for w in warnings)

    for path in folder.glob("*.png"):
        path.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError) as raised:
        training.build_train_dataset(model, cfg)
    assert "no readable training image in" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_found_decoder_is_one_line_naming_the_key(files, tiny, tmp_path):
    cfg, _ = tiny
    for value in ("", str(tmp_path / "missing.pt")):
        model = ovseg.build_model(cfg)
        with pytest.raises(WeightsError) as raised:
            training.build_train_dataset(model, tiny_config(
                files, "model.clip_dinoiser.found_weights", value))
        assert "model.clip_dinoiser.found_weights" in str(raised.value)
        assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------- target cache


def test_target_cache_is_reused_and_invalidated(files, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    cfg = tiny_config(files, "model.clip_dinoiser.target_cache_dir", str(cache_dir),
                      "model.clip_dinoiser.augment_variants", "1")
    model = ovseg.build_model(cfg)
    dataset = model.train_dataset(cfg)
    batch = default_collate([dataset[i] for i in range(3)])
    first = model.loss(batch)
    stored = sorted(cache_dir.rglob("*.npz"))
    assert len(stored) == 3
    # one fixed augmentation per image: the same crop and key again
    again = default_collate([dataset[i] for i in range(3)])
    assert again["key"] == batch["key"] and torch.equal(again["image"], batch["image"])

    def no_teacher(*args, **kwargs):
        raise AssertionError("the cached targets should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(training.Teachers, "targets", no_teacher)
        cached = model.loss(again)
    for name in first:
        assert cached[name].item() == pytest.approx(first[name].item(), abs=1e-6)

    # other teacher weights (another FOUND decoder): other files
    other = tiny_config(files, "model.clip_dinoiser.target_cache_dir", str(cache_dir),
                        "model.clip_dinoiser.augment_variants", "1",
                        "model.clip_dinoiser.found_weights",
                        str(save_found_decoder(tmp_path / "other.pt", seed=1)))
    other_model = ovseg.build_model(other)
    other_model.loss(batch)
    assert len(list(cache_dir.rglob("*.npz"))) == 6
    # a changed image file: another key
    image = dataset.files[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert dataset[0]["key"] != batch["key"][0]


# --------------------------------------------------------------------------- end to end


def _train_net(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_train_net(*args, timeout=timeout, threads=1)


def _load_demo():
    return load_script("demo/demo.py")


def test_train_then_evaluate_and_demo_with_the_trained_heads(files, tmp_path):
    output = tmp_path / "run"
    iterations = 60
    _train_net("--config-file", str(TRAIN_TINY),
               "model.clip_dinoiser.image_dir", str(files["images"]),
               "model.clip_dinoiser.found_weights", str(files["found"]),
               "solver.max_iter", str(iterations), "solver.steps", "[50]",
               "solver.checkpoint_period", str(iterations), "output_dir", str(output))
    records = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    records = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    total = np.array([r["total_loss"] for r in records])
    first, last = total[:10].mean(), total[-10:].mean()
    assert last < first - 0.05, (first, last)
    assert records[0]["lr/correlation"] == records[0]["lr/background"] == 0.01
    assert records[-1]["lr/background"] == pytest.approx(0.001)  # x0.1 from iteration 50
    weights = output / f"model_{iterations:07d}.safetensors"
    assert set(load_file(str(weights))) == HEAD_KEYS  # no CLIP, no teacher

    # --eval-only on a tiny VOC with the trained heads
    voc = tmp_path / "voc"
    build_voc(voc)
    _train_net("--config-file", str(TRAIN_TINY), "--eval-only", "model.weights", str(weights),
               "datasets.root", str(voc), "datasets.test", "[voc_21]",
               "model.clip_dinoiser.background_rule", "true", "output_dir",
               str(tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "voc_21" / "results.json").read_text())
    assert 0 <= results["mIoU"] <= 100

    # the demo with the trained heads gives what the model with those heads predicts
    image = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), image[:, :, ::-1])
    heads = ["model.clip_dinoiser.heads", str(weights)]
    code = _load_demo().main(["--config-file", str(TRAIN_TINY), "--input",
                              str(tmp_path / "photo.png"), "--output", str(tmp_path / "demo"),
                              "--vocab", "sky,ball,grass", "--device", "cpu", *heads])
    assert code == 0
    labels = cv2.imread(str(tmp_path / "demo" / "photo_labels.png"), cv2.IMREAD_UNCHANGED)
    model = ovseg.build_model(ovseg.get_config(str(TRAIN_TINY), heads))
    trained = load_file(str(weights))
    for key, value in model.heads.state_dict().items():
        assert torch.equal(value, trained[f"heads.{key}"])
    expected = model.predict(image, "sky,ball,grass").labels
    assert np.array_equal(labels, expected)
