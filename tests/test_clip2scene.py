"""CLIP2Scene (specs/clip2scene.md): text embeddings, the losses, the self-training switch,
zero-shot inference through the voxels, and training end to end on a generated scene."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg.data.scannet import nyu40_to_scannet20, read_ply_vertices, read_scene
from ovseg.methods.clip2scene import Clip2Scene, training
from ovseg.methods.clip2scene.training import crop_pixels, semantic_targets
from ovseg.text import get_templates
from tests.fixtures.scannet import LABEL_COLOURS, build_scannet_scene
from tests.helpers import REPO_ROOT, load_script

TINY = REPO_ROOT / "configs" / "tiny" / "clip2scene_tiny.yaml"
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"


def tiny_config(*overrides: str):
    return ovseg.get_config(str(TINY), ["model.device", "cpu", *overrides])


@pytest.fixture(scope="module")
def tiny_model() -> Clip2Scene:
    return ovseg.build_model(tiny_config())


# --------------------------------------------------------------------------- text


def test_85_template_text_embeddings_shape_and_norm(tmp_path):
    templates = get_templates("maskclip")
    assert len(templates) == 85
    assert sum("in the scene" in t for t in templates) == 5
    model = ovseg.build_model(tiny_config("text.templates", "maskclip",
                                          "text.cache_dir", str(tmp_path)))
    text = model.text_embeddings()
    assert text.shape == (20, model.clip.embed_dim)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(20), atol=1e-5, rtol=0)
    assert model.class_names[:3] == ["wall", "floor", "cabinet"]


# --------------------------------------------------------------------------- self-training


def test_semantic_target_switches_only_after_epoch_10_with_the_draw():
    pixel = torch.tensor([1, 2, 3])
    student = torch.tensor([4, 5, 6])
    for epoch in range(10):
        for draw in (0.0, 0.3, 0.49, 0.9):
            assert torch.equal(semantic_targets(pixel, student, epoch, 10, 0.5, draw), pixel)
    for epoch in (10, 11, 29):
        assert torch.equal(semantic_targets(pixel, student, epoch, 10, 0.5, 0.49), student)
        assert torch.equal(semantic_targets(pixel, student, epoch, 10, 0.5, 0.5), pixel)
    # over many steps, about half switch
    rng = np.random.default_rng(0)
    switched = sum(semantic_targets(pixel, student, 12, 10, 0.5, rng.random()) is student
                   for _ in range(2000))
    assert 900 < switched < 1100


def test_epoch_counts_scenes_seen(tiny_model):
    tiny_model.train_size = 3
    tiny_model.set_training_progress(samples_seen=29)
    assert training.current_epoch(tiny_model) == 9
    tiny_model.set_training_progress(samples_seen=30)
    assert training.current_epoch(tiny_model) == 10
    tiny_model.set_training_progress(samples_seen=0)


# --------------------------------------------------------------------------- crops


def test_crop_maps_pixels_and_flips():
    pixels = torch.tensor([[10, 5], [0, 0], [39, 29], [5, 5]])
    box = (0, 10, 30, 30)  # top, left, h, w: columns 10..39, rows 0..29
    moved, inside = crop_pixels(pixels, box, (60, 60), flip=False)
    assert inside.tolist() == [True, False, True, False]
    # each crop pixel is 2x2 output pixels; the centre of (10, 5) lands at output (1, 11)
    assert moved[0].tolist() == [1, 11] and moved[2].tolist() == [59, 59]
    flipped, _ = crop_pixels(pixels, box, (60, 60), flip=True)
    assert flipped[0].tolist() == [58, 11]
    rng = __import__("random").Random(0)
    for _ in range(50):
        top, left, h, w = training.random_resized_crop_params(480, 640, (0.3, 1), (14 / 9, 17 / 9),
                                                               rng)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        assert 0.3 * 480 * 640 * 0.95 <= h * w <= 480 * 640


# --------------------------------------------------------------------------- inference


def test_prediction_uses_the_zero_ignore_row_and_copies_voxels_to_vertices(tiny_model):
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (300, 3)).astype(np.float32)
    points = np.concatenate([points, points + 0.001])  # twins share their voxel
    colors = rng.integers(0, 256, (600, 3), dtype=np.uint8)
    labels = tiny_model.predict_points(points, colors)
    assert labels.shape == (600,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 20  # never the ignore row
    from ovseg.layers.sparse import voxelize

    voxels = voxelize(torch.from_numpy(points), 0.05)
    same = voxels.point_to_voxel[:300] == voxels.point_to_voxel[300:]
    assert same.sum() > 200
    assert np.array_equal(labels[:300][same.numpy()], labels[300:][same.numpy()])
    # the same argmax as over the text rows alone (row 0 never wins)
    tiny_model.student.eval()
    with torch.no_grad():
        output, (vox,) = tiny_model.student_forward([torch.from_numpy(points)],
                                                    [torch.from_numpy(colors)])
        direct = (output.final @ tiny_model.text_embeddings().T).argmax(1)
    assert np.array_equal(labels, direct[vox.point_to_voxel].numpy())


# --------------------------------------------------------------------------- losses


def test_loss_is_ce_without_temperature_plus_one_minus_cosine(tiny_model, monkeypatch):
    model = tiny_model
    d = model.clip.embed_dim
    text = F.normalize(torch.randn(20, d, generator=torch.Generator().manual_seed(1)), dim=1)
    monkeypatch.setattr(model, "text_embeddings", lambda: text)
    crop_h, crop_w = model.settings.crop_size
    logits_map = torch.zeros(1, 20, crop_h, crop_w)
    logits_map[0, 3] = 1.0  # every pixel: class 3
    image_map = torch.randn(1, d, 1, 1).expand(1, d, crop_h, crop_w).contiguous()
    monkeypatch.setattr(model, "teacher_outputs", lambda crops, t: (logits_map, image_map))
    points = torch.rand(50, 3)
    colors = torch.randint(0, 256, (50, 3), dtype=torch.uint8)
    sample = {"points": points, "colors": colors, "crops": torch.zeros(1, 3, crop_h, crop_w),
              "pair_frame": torch.zeros(10, dtype=torch.long),
              "pair_point": torch.arange(10), "pair_pixel": torch.stack(
                  [torch.arange(10), torch.arange(10)], dim=1)}
    model.train_size = 1000
    losses = training.clip2scene_loss(model, [sample])
    output, (vox,) = model.student_forward([points], [colors])
    rows = vox.point_to_voxel[:10]
    expected_ce = F.cross_entropy(output.final[rows] @ text.T, torch.full((10,), 3))
    expected_cos = (1 - F.cosine_similarity(output.local[rows], image_map[0, :, 0, 0][None],
                                            dim=1)).mean()
    assert losses["loss_semantic"].item() == pytest.approx(expected_ce.item(), rel=1e-4)
    assert losses["loss_spatial"].item() == pytest.approx(expected_cos.item(), rel=1e-4)
    losses["loss_semantic"].backward()
    assert all(p.grad is not None for p in model.student.final.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert not any(p.requires_grad for p in model.image_projection.parameters())
    model.student.zero_grad(set_to_none=True)


def test_teacher_gives_maskclip_logits_and_projected_value_features(tiny_model):
    crops = torch.rand(2, 3, 32, 64)
    text = tiny_model.text_embeddings()
    logits, image = tiny_model.teacher_outputs(crops, text)
    assert logits.shape == (2, 20, 2, 4)
    assert image.shape == (2, tiny_model.clip.embed_dim, 2, 4)
    assert logits.abs().max() <= 1.0 + 1e-5  # cosines


# --------------------------------------------------------------------------- teacher cache


def test_teacher_cache_with_fixed_crops_is_reused_and_off_with_random_crops(tmp_path,
                                                                           monkeypatch):
    datasets = tmp_path / "datasets"
    build_scannet_scene(datasets / "scannet", num_points=300, num_frames=3, layouts=("export",))
    cache = tmp_path / "cache"
    cfg = tiny_config("datasets.root", str(datasets), "model.clip2scene.random_crop", "false",
                      "model.clip2scene.teacher_cache_dir", str(cache))
    model = ovseg.build_model(cfg)
    model.eval()  # BN running stats stay put between the two losses
    sample = model.train_dataset(cfg)[0]
    assert len(sample["crop_keys"]) == 3 and sample["crops"].shape[1:] == (3, 32, 64)
    first = training.clip2scene_loss(model, [sample])
    assert len(list(cache.rglob("*.npz"))) == 3

    def no_teacher(*args, **kwargs):
        raise AssertionError("the cached teacher outputs should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(Clip2Scene, "teacher_outputs", no_teacher)
        again = training.clip2scene_loss(model, [sample])
    for name in first:
        assert again[name].item() == pytest.approx(first[name].item(), abs=1e-6)
    # random crops: computed on the fly, nothing cached
    random_cfg = tiny_config("datasets.root", str(datasets),
                             "model.clip2scene.teacher_cache_dir", str(tmp_path / "none"))
    model = ovseg.build_model(random_cfg)
    training.clip2scene_loss(model, [model.train_dataset(random_cfg)[0]])
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- end to end


def _colour_to_class() -> tuple[np.ndarray, np.ndarray]:
    ids = sorted(LABEL_COLOURS)
    colours = np.array([LABEL_COLOURS[i] for i in ids], dtype=np.float32) / 255.0
    classes = nyu40_to_scannet20(np.array(ids), ignore=19)  # ceiling -> a class never in GT
    return colours, classes


def oracle_teacher(self, crops, text):
    """A teacher that reads the generated scene's label colours off the crops."""
    colours, classes = _colour_to_class()
    pixels = crops.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) in [0, 1]
    distance = ((pixels[..., None, :] - colours) ** 2).sum(-1)
    labels = torch.from_numpy(classes[distance.argmin(-1)])  # (B, H, W)
    logits = F.one_hot(labels, 20).permute(0, 3, 1, 2).float()
    image = torch.randn(20, self.clip.embed_dim, generator=torch.Generator().manual_seed(0))
    return logits, image[labels].permute(0, 3, 1, 2).contiguous()


def _train_net(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("ovseg_train_net_cli", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0


@pytest.mark.slow
def test_train_through_train_net_then_eval_only(tmp_path, monkeypatch, restore_ovseg_logging):
    datasets = tmp_path / "datasets"
    build_scannet_scene(datasets / "scannet", num_points=1500, num_frames=8,
                        layouts=("export",))
    monkeypatch.setattr(Clip2Scene, "teacher_outputs", oracle_teacher)
    common = ["--config-file", str(TINY), "model.device", "cpu",
              "datasets.root", str(datasets), "text.cache_dir", str(tmp_path / "text")]
    # untrained
    _train_net(*common, "--eval-only", "output_dir", str(tmp_path / "untrained"))
    before = json.loads((tmp_path / "untrained" / "scannet_20" / "results.json").read_text())
    iterations = 100
    output = tmp_path / "run"
    # one scene is one epoch: keep the self-training switch out of this short run
    _train_net(*common, "solver.max_iter", str(iterations), "solver.ims_per_batch", "1",
               "model.clip2scene.self_training_epoch", "1000", "output_dir", str(output))
    records = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    records = [r for r in records if "total_loss" in r]
    assert len(records) == iterations
    semantic = np.array([r["loss_semantic"] for r in records])
    first, last = semantic[:10].mean(), semantic[-10:].mean()
    assert last < first * 0.7, (first, last)
    weights = output / f"model_{iterations:07d}.safetensors"
    assert weights.is_file()
    _train_net(*common, "--eval-only", "model.weights", str(weights),
               "output_dir", str(tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "scannet_20" / "results.json").read_text())
    present = 5  # wall, floor, door, window, picture
    chance = 100.0 / present
    print("mIoU untrained", before["mIoU"], "trained", results["mIoU"], "losses", first, last)
    assert results["mIoU"] > chance and results["mIoU"] > before["mIoU"]
    assert not math.isnan(results["mIoU"])
    assert results["protocol"]["benchmark"] == "scannet_20"

    # the 3D demo with the trained student: a PLY of the same per-vertex prediction
    demo = _load_demo3d()
    scene_dir = datasets / "scannet" / "scans" / "scene0000_00"
    code = demo.main(["--config-file", str(TINY), "--scene", str(scene_dir), "--output",
                      str(tmp_path / "demo"), "--device", "cpu", "model.weights", str(weights),
                      "text.cache_dir", str(tmp_path / "text")])
    assert code == 0
    written = read_ply_vertices(tmp_path / "demo" / "scene0000_00_pred.ply")
    model = ovseg.build_model(tiny_config("model.weights", str(weights),
                                          "text.cache_dir", str(tmp_path / "text")))
    expected = model.predict_scene(read_scene(scene_dir.parent, "scene0000_00", frames=None))
    assert np.array_equal(written["label"], expected)
    assert len(written["x"]) == len(expected)


def _load_demo3d():
    return load_script("demo/demo3d.py")


def test_demo3d_missing_mesh_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "scene0001_00").mkdir()
    code = _load_demo3d().main(["--config-file", str(TINY), "--scene",
                                str(tmp_path / "scene0001_00"), "--output", str(tmp_path / "out"),
                                "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mesh ") and "scene0001_00_vh_clean_2.ply" in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()
