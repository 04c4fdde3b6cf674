"""CLIP2Scene: a sparse-conv student distilled from MaskCLIP on ScanNet (specs/clip2scene.md).

Student: MinkUNet14A (``ovseg.modeling.minkunet``) on 5 cm voxels, RGB in [-1, 1], centred
coordinates; two 1x1 heads to CLIP's joint dim: ``final`` (semantic loss and inference) and
``local`` (spatial loss).
Teacher (frozen, training only): CLIP in MaskCLIP mode (the dense_clip last-block variant of
``teacher_mode``) over the paired frames' crops: L2-normalised patch features . text -> pixel
pseudo-labels (argmax of the bilinearly upsampled logits); the last block's value features
(CLIP's width, before ln_post/proj) through a frozen 1x1 projection -> paired image features.
Text: the 20 ScanNet classes in ``text.templates`` (MaskCLIP's 85 in the configs), normalised,
averaged, renormalised.
Inference (annotation-free): logits = final . [0; T]^T, the zero row's logit -1e6, argmax per
voxel, copied to every vertex through the inverse voxel map.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.weights import seeded_init
from ovseg.errors import ConfigError
from ovseg.layers.attention import LAST_BLOCK_VARIANTS
from ovseg.layers.sparse import voxels_to_points
from ovseg.methods.common import TextClassifiers, clip_from_config, settings_from_config
from ovseg.methods.device import resolve_device
from ovseg.modeling.minkunet import (
    MINKUNET_CONFIG_KEY,
    MINKUNET_PLANS,
    build_minkunet,
    load_authors_checkpoint,
    student_input,
)
from ovseg.text import get_templates

logger = logging.getLogger(__name__)

SECTION = "model.clip2scene"
BENCHMARK = "scannet_20"
IGNORE_LOGIT = -1e6  # the zero "ignore" row's logit at inference
SEMANTIC_LOSSES = ("ce", "infonce")
IMAGE_PROJECTIONS = ("random", "clip")
OCCLUSIONS = ("absolute", "relative", "none")


@dataclass
class Clip2SceneConfig:
    """``cfg.model.clip2scene``: student, teacher, pairing, losses and training data."""

    # ---- student ---------------------------------------------------------------------------
    student: str = "MinkUNet14A"  # or MinkUNet18A
    student_planes: list[int] = field(default_factory=list)  # [] = the plan's widths
    student_init_dim: int = 0  # 0 = the plan's
    backend: str = "torch"  # sparse conv: torch | spconv | auto
    voxel_size: float = 0.05
    student_weights: str = ""  # the authors' MinkowskiEngine checkpoint ("" = none)
    # ---- teacher (training only) -------------------------------------------------------------
    teacher_mode: str = "maskclip"  # a dense_clip last-block mode
    # false = the reference's [0, 1] input without CLIP mean/std (the default follows the
    # code, as the spec does); true = correct CLIP use, which the reference's near-zero
    # annotation-free mIoU report (its issue 14) suggests trying
    teacher_normalize: bool = False
    # frozen width -> joint-dim 1x1 projection of the value features: "random" (the
    # reference's random init) or "clip" (CLIP's own ln_post + proj)
    image_projection: str = "random"
    # ---- frames and pairing --------------------------------------------------------------------
    frames_root: str = ""  # under datasets.root; "" = the scene folders (export layout)
    max_frames: int = 8
    depth_size: list[int] = field(default_factory=lambda: [480, 640])  # (H, W) depth grid
    crop_size: list[int] = field(default_factory=lambda: [224, 416])  # (H, W)
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [14 / 9, 17 / 9])
    flip: bool = True
    # false: every frame's crop is the whole resized frame, unflipped (fixed, so the teacher's
    # outputs can be cached in teacher_cache_dir)
    random_crop: bool = True
    occlusion: str = "absolute"
    depth_threshold: float = 0.05
    compat: str = "ours"  # "reference": truncated stored pixels
    # ---- losses --------------------------------------------------------------------------------
    semantic_loss: str = "ce"  # "ce" (code: no temperature) | "infonce" (paper Eq. 1)
    temperature: float = 0.5  # infonce only
    spatial_weight: float = 1.0
    self_training_epoch: int = 10  # epochs done before the switch may happen
    self_training_prob: float = 0.5
    sgd_dampening: float = 0.1
    # ---- training data -------------------------------------------------------------------------
    train_scenes: str = "scannet/scans"  # folder of scene folders under datasets.root
    train_split: str = ""  # file of scene ids (one a line); "" = every scene folder
    # teacher outputs on disk, per scene, frame, crop and teacher; used only with fixed crops
    # (random_crop false); "" = off
    teacher_cache_dir: str = ""


def _check_settings(settings: Clip2SceneConfig) -> None:
    checks = [
        (settings.student in MINKUNET_PLANS, "student", f"one of {sorted(MINKUNET_PLANS)}"),
        (settings.teacher_mode in LAST_BLOCK_VARIANTS, "teacher_mode",
         f"one of {sorted(LAST_BLOCK_VARIANTS)}"),
        (settings.image_projection in IMAGE_PROJECTIONS, "image_projection",
         f"one of {IMAGE_PROJECTIONS}"),
        (settings.semantic_loss in SEMANTIC_LOSSES, "semantic_loss", f"one of {SEMANTIC_LOSSES}"),
        (settings.occlusion in OCCLUSIONS, "occlusion", f"one of {OCCLUSIONS}"),
        (settings.compat in ("ours", "reference"), "compat", "ours or reference"),
        (settings.voxel_size > 0, "voxel_size", "> 0"),
        (settings.max_frames >= 1, "max_frames", ">= 1"),
        (len(settings.depth_size) == 2 and min(settings.depth_size) > 0, "depth_size",
         "[H, W], positive"),
        (len(settings.crop_size) == 2 and min(settings.crop_size) > 0, "crop_size",
         "[H, W], positive"),
        (len(settings.crop_scale) == 2 and 0 < settings.crop_scale[0] <= settings.crop_scale[1],
         "crop_scale", "[low, high], 0 < low <= high"),
        (len(settings.crop_ratio) == 2 and 0 < settings.crop_ratio[0] <= settings.crop_ratio[1],
         "crop_ratio", "[low, high], 0 < low <= high"),
        (settings.temperature > 0, "temperature", "> 0"),
        (0 <= settings.self_training_prob <= 1, "self_training_prob", "in [0, 1]"),
        (not settings.student_planes or len(settings.student_planes) == 8, "student_planes",
         "8 widths or []"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{SECTION}.{key} must be {expected}, got "
                              f"{getattr(settings, key)!r}")


class Clip2Scene(nn.Module):
    """The CLIP2Scene student with its frozen CLIP (text classifier, training teacher).

    Args:
        clip: the frozen CLIP (ViT-B/16 in the paper); its joint dim sets the heads' width.
        settings: ``model.clip2scene``.
        templates: prompt templates of the text classifier.
        class_names: the classes predicted (ScanNet-20's, in label order).
        text_cache_dir: on-disk text-classifier cache (None = the default).
    """

    def __init__(self, clip: ClipEncoder, settings: Clip2SceneConfig, templates: list[str],
                 class_names: list[str], text_cache_dir: str | None = None):
        super().__init__()
        _check_settings(settings)
        self.clip = clip
        self.clip.requires_grad_(False)
        self.settings = settings
        self.class_names = list(class_names)
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)
        overrides: dict = {"head_dim": clip.embed_dim}
        if settings.student_planes:
            overrides["planes"] = tuple(int(p) for p in settings.student_planes)
        if settings.student_init_dim:
            overrides["init_dim"] = int(settings.student_init_dim)
        with seeded_init():  # untrained students (and the random projection) are reproducible
            student = build_minkunet(settings.student, settings.backend, **overrides)
            # the frozen, randomly initialised width -> joint-dim projection of the reference
            projection = nn.Conv2d(clip.width, clip.embed_dim, 1)
        self.student = student.to(self.device)
        self.image_projection = projection.to(self.device).requires_grad_(False)
        if settings.student_weights:
            load_authors_checkpoint(self.student, settings.student_weights, MINKUNET_CONFIG_KEY)
        # samples all processes consumed before this step (set by the trainer each step, from
        # its restored iteration, so a resumed run knows its epoch): the self-training switch
        self.samples_seen = 0
        self.train_size = 0

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    # ---- training hooks (ovseg.methods.clip2scene.training) --------------------------------
    def set_training_progress(self, samples_seen: int) -> None:
        """Called by the trainer before each step: samples consumed over all processes."""
        self.samples_seen = int(samples_seen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def loss(self, batch):
        from ovseg.methods.clip2scene.training import clip2scene_loss

        return clip2scene_loss(self, batch)

    def train_dataset(self, cfg):
        from ovseg.methods.clip2scene.training import build_train_dataset

        return build_train_dataset(self, cfg)

    def collate(self, samples):
        return list(samples)

    def optimizer_param_groups(self, solver):
        # the reference's SGD dampening (the engine's SGD has none; torch takes it per group)
        return [{"name": "student", "params": list(self.student.parameters()),
                 "dampening": float(self.settings.sgd_dampening)}]

    # ---- text and teacher --------------------------------------------------------------------
    def text_embeddings(self) -> Tensor:
        """(C, D) L2-normalised, template-averaged text embeddings of the classes."""
        return self.text_classifier(self.class_names).float()

    @torch.no_grad()
    def teacher_outputs(self, crops: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """MaskCLIP on (B, 3, H, W) crops in [0, 1].

        Returns:
            logits (B, C, h, w): L2-normalised patch features . text (patch grid);
            image features (B, D, h, w): the value features through the frozen projection.
        """
        x = crops.to(self.device, torch.float32)
        x = self.clip.normalize(x * 255.0) if self.settings.teacher_normalize else x
        variant = LAST_BLOCK_VARIANTS[self.settings.teacher_mode]
        tokens, grid = variant(self.clip(x), self.clip)
        count = grid[0] * grid[1]
        values = tokens[:, -count:]  # class token dropped; (B, N, width)
        joint = F.normalize(self.clip.project(values).float(), dim=-1)
        logits = (joint @ text.to(joint).T).transpose(1, 2).reshape(len(x), -1, *grid)
        value_map = values.float().transpose(1, 2).reshape(len(x), -1, *grid)
        if self.settings.image_projection == "clip":
            image = self.clip.project(values).float().transpose(1, 2).reshape(
                len(x), -1, *grid)
        else:
            image = self.image_projection(value_map)
        return logits, image

    # ---- inference ---------------------------------------------------------------------------
    def student_forward(self, points: list[Tensor], colors: list[Tensor]):
        """The student on scenes: (output, voxels per scene)."""
        sparse, voxels = student_input([p.to(self.device) for p in points],
                                       [c.to(self.device) for c in colors],
                                       self.settings.voxel_size)
        return self.student(sparse), voxels

    @torch.inference_mode()
    def predict_points(self, points, colors) -> np.ndarray:
        """Per-point ScanNet-20 indices (N,) int64 of one cloud ((N, 3) metres, (N, 3) RGB)."""
        points = torch.as_tensor(np.asarray(points), dtype=torch.float32)
        colors = torch.as_tensor(np.asarray(colors))
        was_training = self.student.training
        self.student.eval()
        try:
            output, (voxels,) = self.student_forward([points], [colors])
        finally:
            self.student.train(was_training)
        text = self.text_embeddings()
        # the reference's [0; T]: row 0 a zero "ignore" class whose logit is set to -1e6
        rows = torch.cat([text.new_zeros(1, text.shape[1]), text])
        logits = output.final.float() @ rows.T
        logits[:, 0] = IGNORE_LOGIT
        voxel_labels = logits.argmax(1) - 1
        return voxels_to_points(voxel_labels, voxels).cpu().numpy().astype(np.int64)

    def predict_scene(self, scene) -> np.ndarray:
        """Per-vertex ScanNet-20 indices of a :class:`~ovseg.data.scannet.ScanNetScene`."""
        return self.predict_points(scene.points, scene.colors)

    def evaluate_benchmark(self, name: str, cfg, output_dir) -> dict | None:
        """Point mIoU on ``scannet_20``: every scene folder of the catalog's ``scannet/scans``
        (mesh vertices, labels from ``_vh_clean_2.labels.ply``), by the shared evaluator;
        writes ``<output_dir>/scannet_20/results.json``."""
        from ovseg.data.catalog import class_names, datasets_root, get_benchmark
        from ovseg.data.scannet import IGNORE_LABEL, read_scene
        from ovseg.evaluation.sem_seg import SemSegEvaluator, write_results
        from ovseg.methods.clip2scene.training import list_scene_ids

        if name != BENCHMARK:
            raise ConfigError(f"clip2scene evaluates {BENCHMARK} (point clouds), not {name}")
        info = get_benchmark(name)
        root = datasets_root(cfg.datasets.root or None) / info.image_dir
        scenes = list_scene_ids(root)
        evaluator = SemSegEvaluator(info.num_classes, info.ignore_value,
                                    class_names=class_names(name),
                                    absent_classes=cfg.evaluation.absent_classes)
        started = time.perf_counter()
        for scene_id in scenes:
            scene = read_scene(root, scene_id, frames=None, ignore=IGNORE_LABEL)
            prediction = self.predict_scene(scene)
            evaluator.process(prediction[None], scene.labels[None], source=scene_id)
        results = evaluator.evaluate()
        if results is None:
            return None
        from ovseg.config import config_to_yaml

        protocol = {"benchmark": name, "split": info.split, "scenes": len(scenes),
                    "unit": "mesh vertices", "wall_time_s": round(time.perf_counter() - started, 3),
                    "templates": str(cfg.text.templates),
                    "clip": {"arch": str(cfg.model.clip.arch),
                             "weights": str(cfg.model.clip.weights)},
                    "student_weights": str(cfg.model.weights or
                                           self.settings.student_weights or "untrained"),
                    "config": config_to_yaml(cfg)}
        write_results(results, Path(output_dir) / name, extra={"protocol": protocol})
        return results


def build_clip2scene(cfg) -> Clip2Scene:
    """Build :class:`Clip2Scene` from a full config (``cfg.model``, ``cfg.text``)."""
    from ovseg.data.catalog import class_vocabulary

    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    vocabulary = class_vocabulary(BENCHMARK, cfg.text.prompt_names)
    return Clip2Scene(
        clip_from_config(model_cfg, device),
        settings_from_config(model_cfg.clip2scene, Clip2SceneConfig),
        get_templates(cfg.text.templates),
        vocabulary.class_names,
        text_cache_dir=cfg.text.cache_dir or None,
    )
