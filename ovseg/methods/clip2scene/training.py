"""CLIP2Scene's training on ScanNet (specs/clip2scene.md, steps 1, 2, 4-6).

data: one sample per scene: the mesh vertices and colours, and up to ``max_frames`` random
frames; each frame resized to the depth grid (640x480), then a RandomResizedCrop to
``crop_size`` (224x416; scale [0.3, 1], ratio [14/9, 17/9]) and a horizontal flip, pixels in
[0, 1]. Points are paired with depth-grid pixels (depth intrinsics, absolute 0.05 m depth
test, ``ovseg.layers.projection``); a pair is kept when its pixel lies in the crop, and its
pixel is moved into the crop's coordinates.
loss (the code's, ScanNet):
  semantic: CE(p_final . T^T, pixel label) with unnormalised point features and no temperature
  (``semantic_loss: infonce``: the paper's tau = 0.5 variant on cosines);
  spatial: mean(1 - cos(p_local, x_img)), x_img = the frozen projection of MaskCLIP's value
  features at the pair's pixel; weights 1:1.
self-training: once ``self_training_epoch`` epochs are done, each step with probability
``self_training_prob`` the student's own argmax replaces the pixel labels of all pairs.

teacher cache: with fixed crops (``random_crop: false``: the whole frame, unflipped) and
``teacher_cache_dir``, each frame's teacher outputs are computed once and read from disk after;
with random crops they are computed on the fly.

Pixel positions on the teacher's patch grid are read by bilinear sampling, which equals
bilinear upsampling to the crop (align_corners False, edges clamped) read at the pixel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.data.scannet import frame_paths, list_frames, read_scene
from ovseg.errors import ConfigError, DatasetError
from ovseg.io import ArrayCache
from ovseg.layers.projection import pair_points_with_pixels, sample_frames

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # CLIP2Scene's ignore label in the training code


# --------------------------------------------------------------------------- self-training


def semantic_targets(pixel_labels: Tensor, student_labels: Tensor, epoch: int,
                     switch_epoch: int, probability: float, draw: float) -> Tensor:
    """The semantic CE target of one step (S3T, the code's rule).

    Args:
        pixel_labels: (K,) the teacher's pixel pseudo-labels of the pairs.
        student_labels: (K,) the student's own argmax for the same pairs.
        epoch: completed epochs before this step (0-based epoch index).
        switch_epoch: the switch may happen only once this many epochs are done (10).
        probability: chance of the switch per step (0.5).
        draw: a uniform [0, 1) number drawn for this step.

    Returns:
        ``student_labels`` when ``epoch >= switch_epoch`` and ``draw < probability``, else
        ``pixel_labels`` (all pairs together; no confidence threshold).
    """
    if epoch >= switch_epoch and draw < probability:
        return student_labels
    return pixel_labels


# --------------------------------------------------------------------------- data


def random_resized_crop_params(height: int, width: int, scale: Sequence[float],
                               ratio: Sequence[float], rng: random.Random
                               ) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (top, left, h, w), drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_pixels(pixels: Tensor, box: tuple[int, int, int, int], crop_size: Sequence[int],
                flip: bool) -> tuple[Tensor, Tensor]:
    """Depth-grid pixels (K, 2) (u, v) -> their pixels in the resized crop, and which lie
    in the crop box (top, left, h, w). Pixel centres are mapped, then rounded."""
    top, left, h, w = box
    out_h, out_w = int(crop_size[0]), int(crop_size[1])
    u, v = pixels[:, 0].double(), pixels[:, 1].double()
    inside = (u >= left) & (u < left + w) & (v >= top) & (v < top + h)
    cu = torch.floor((u - left + 0.5) * out_w / w).clamp(0, out_w - 1).long()
    cv = torch.floor((v - top + 0.5) * out_h / h).clamp(0, out_h - 1).long()
    if flip:
        cu = out_w - 1 - cu
    return torch.stack([cu, cv], dim=1), inside


class ScanNetPairs(Sequence[dict[str, Any]]):
    """Training samples of ScanNet scenes: points, colours, frame crops and point-pixel pairs.

    ``pairs[i]``: ``points`` (N, 3) float32, ``colors`` (N, 3) uint8, ``crops`` (F, 3, Hc, Wc)
    float32 in [0, 1], ``pair_frame`` / ``pair_point`` (K,) int64 and ``pair_pixel`` (K, 2)
    int64 (u, v) in the crop, ``scene_id``.
    """

    def __init__(self, scans_root: Path, scene_ids: Sequence[str], settings,
                 frames_root: Path | None = None, seed: int = 0) -> None:
        self.scans_root = Path(scans_root)
        self.scene_ids = list(scene_ids)
        self.settings = settings
        self.frames_root = Path(frames_root) if frames_root is not None else self.scans_root
        self.seed = seed
        self._frames: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.scene_ids)

    def _frame_ids(self, scene_id: str) -> list[int]:
        if scene_id not in self._frames:
            ids = list_frames(self.frames_root / scene_id)
            if not ids:
                raise DatasetError(f"scene {scene_id} has no frames in "
                                   f"{self.frames_root / scene_id}")
            self._frames[scene_id] = ids
        return self._frames[scene_id]

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        settings = self.settings
        scene_id = self.scene_ids[index]
        ids = self._frame_ids(scene_id)
        # torch's RNG is seeded per loader worker by the engine
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        chosen = sample_frames(len(ids), settings.max_frames, np.random.default_rng(
            rng.getrandbits(63)))
        depth_h, depth_w = (int(s) for s in settings.depth_size)
        scene = read_scene(self.scans_root, scene_id, [ids[i] for i in chosen],
                           frames_root=self.frames_root, labels=False,
                           depth_size=(depth_h, depth_w))
        pairs = pair_points_with_pixels(
            scene.points, scene.poses, scene.intrinsic_depth, scene.depths,
            occlusion=settings.occlusion, threshold=settings.depth_threshold,
            compat=settings.compat)
        frame, point, pixel = pairs.pairs()
        crops, keep_frame, keep_point, keep_pixel, keys = [], [], [], [], []
        for f, image in enumerate(scene.images):
            resized = cv2.resize(image, (depth_w, depth_h), interpolation=cv2.INTER_LINEAR)
            if settings.random_crop:
                box = random_resized_crop_params(depth_h, depth_w, settings.crop_scale,
                                                 settings.crop_ratio, rng)
                flip = bool(settings.flip) and rng.random() < 0.5
            else:  # fixed: the whole frame, unflipped
                box, flip = (0, 0, depth_h, depth_w), False
            keys.append(json.dumps({
                "scene": scene_id, "frame": int(scene.frame_ids[f]), "box": list(box),
                "flip": flip, "crop_size": [int(v) for v in settings.crop_size],
                "colour_bytes": _colour_stamp(self.frames_root / scene_id,
                                              int(scene.frame_ids[f]), scene.layout)},
                sort_keys=True))
            top, left, h, w = box
            crop = cv2.resize(resized[top:top + h, left:left + w],
                              (int(settings.crop_size[1]), int(settings.crop_size[0])),
                              interpolation=cv2.INTER_LINEAR)
            if flip:
                crop = crop[:, ::-1]
            crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
                         / 255.0)
            mine = frame == f
            moved, inside = crop_pixels(pixel[mine], box, settings.crop_size, flip)
            keep_frame.append(frame[mine][inside])
            keep_point.append(point[mine][inside])
            keep_pixel.append(moved[inside])
        return {
            "scene_id": scene_id,
            "points": torch.from_numpy(scene.points.astype(np.float32)),
            "colors": torch.from_numpy(scene.colors),
            "crops": torch.stack(crops),
            "pair_frame": torch.cat(keep_frame),
            "pair_point": torch.cat(keep_point),
            "pair_pixel": torch.cat(keep_pixel),
            "crop_keys": keys if not settings.random_crop else [],
        }


def _colour_stamp(frames_dir: Path, frame_id: int, layout) -> list[int]:
    """Size and modification time of a frame's colour file (a changed file: another key)."""
    stat = frame_paths(frames_dir, frame_id, layout)[0].stat()
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def list_scene_ids(root: Path) -> list[str]:
    """The scene folders (``scene*``) of ``root``, sorted; a DatasetError when there is none."""
    if not root.is_dir():
        raise DatasetError(f"ScanNet scene folder {root} does not exist; see datasets/README.md")
    scenes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("scene"))
    if not scenes:
        raise DatasetError(f"no scene folders (scene*) in {root}")
    return scenes


def read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"scene list {path} does not exist (model.clip2scene.train_split)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def build_train_dataset(model: nn.Module, cfg) -> ScanNetPairs:
    """The training scenes of ``cfg`` (``model.clip2scene.train_scenes`` / ``train_split``
    under ``datasets.root``)."""
    from ovseg.data.catalog import datasets_root
    settings = cfg.model.clip2scene
    root = datasets_root(cfg.datasets.root or None)
    scans = Path(str(settings.train_scenes)).expanduser()
    scans = scans if scans.is_absolute() else root / scans
    if str(settings.train_split or ""):
        split = Path(str(settings.train_split)).expanduser()
        scene_ids = read_split(split if split.is_absolute() else root / split)
    else:
        scene_ids = list_scene_ids(scans)
    if not scene_ids:
        raise DatasetError(f"no training scenes in {scans}")
    frames_root = None
    if str(settings.frames_root or ""):
        frames = Path(str(settings.frames_root)).expanduser()
        frames_root = frames if frames.is_absolute() else root / frames
    dataset = ScanNetPairs(scans, scene_ids, model.settings, frames_root, seed=int(cfg.seed))
    model.train_size = len(dataset)
    logger.info("CLIP2Scene training set: %d scenes in %s", len(dataset), scans)
    return dataset


# --------------------------------------------------------------------------- loss


def _sample(maps: Tensor, frames: Tensor, pixels: Tensor, crop_size: Sequence[int]) -> Tensor:
    """(B, C, h, w) patch-grid maps read bilinearly at crop pixels -> (K, C)."""
    out_h, out_w = int(crop_size[0]), int(crop_size[1])
    x = (pixels[:, 0].float() + 0.5) / out_w * 2 - 1
    y = (pixels[:, 1].float() + 0.5) / out_h * 2 - 1
    rows = []
    for f in range(maps.shape[0]):
        mine = frames == f
        grid = torch.stack([x[mine], y[mine]], dim=-1).view(1, 1, -1, 2)
        rows.append((mine, F.grid_sample(maps[f:f + 1], grid.to(maps), mode="bilinear",
                                         padding_mode="border", align_corners=False)[0, :, 0].T))
    out = maps.new_zeros(len(frames), maps.shape[1])
    for mine, values in rows:
        out[mine] = values
    return out


CACHE_FORMAT = "ovseg-clip2scene-teacher/1"
_CACHE = "_clip2scene_teacher_cache"


class TeacherCache(ArrayCache):
    """Teacher outputs of fixed crops on disk (:class:`ovseg.io.ArrayCache`): float16 logits
    and image features on the patch grid, keyed by the crop (scene, frame, crop box, flip, crop
    size, colour file stamp) under the teacher's digest (CLIP and projection weights, teacher
    settings, text embeddings)."""

    def __init__(self, directory: str | Path, digest: str) -> None:
        super().__init__(directory, digest, what="teacher cache")

    def load(self, key: str) -> tuple[Tensor, Tensor] | None:  # type: ignore[override]
        return super().load(key, lambda stored: (
            torch.from_numpy(stored["logits"].astype(np.float32)),
            torch.from_numpy(stored["image"].astype(np.float32))))

    def save(self, key: str, logits: Tensor, image: Tensor) -> None:  # type: ignore[override]
        super().save(key, logits=logits.detach().cpu().numpy().astype(np.float16),
                     image=image.detach().cpu().numpy().astype(np.float16))


def teacher_digest(model: nn.Module, text: Tensor) -> str:
    settings = model.settings
    hasher = hashlib.sha256(CACHE_FORMAT.encode())
    hasher.update(repr((settings.teacher_mode, settings.teacher_normalize,
                        settings.image_projection)).encode())
    for module in (model.clip, model.image_projection):
        for name, tensor in sorted(module.state_dict().items()):
            hasher.update(name.encode())
            hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    hasher.update(text.detach().float().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def teacher_cache(model: nn.Module, text: Tensor) -> TeacherCache | None:
    """The model's teacher cache (None = off, or random crops: computed on the fly)."""
    directory = str(model.settings.teacher_cache_dir or "")
    if not directory or model.settings.random_crop:
        return None
    cache = model.__dict__.get(_CACHE)
    if cache is None or cache.directory != Path(directory).expanduser():
        cache = TeacherCache(directory, teacher_digest(model, text))
        object.__setattr__(model, _CACHE, cache)  # not a module: never in a state dict
    return cache


def batch_teacher(model: nn.Module, crops: Tensor, text: Tensor,
                  keys: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Teacher outputs of a batch's crops: from the cache where it has them (fixed crops with
    ``teacher_cache_dir``), the teacher for the rest (then cached)."""
    cache = teacher_cache(model, text) if keys and len(keys) == len(crops) else None
    if cache is None:
        return model.teacher_outputs(crops, text)
    found = [cache.load(key) for key in keys]
    missing = [i for i, hit in enumerate(found) if hit is None]
    if missing:
        logits, image = model.teacher_outputs(crops[missing], text)
        for row, i in enumerate(missing):
            cache.save(keys[i], logits[row], image[row])
            # what the cache gives back next time (float16), so a step reads the same
            found[i] = (logits[row].cpu().half().float(), image[row].cpu().half().float())
    device = model.device
    return (torch.stack([f[0] for f in found]).to(device).float(),
            torch.stack([f[1] for f in found]).to(device).float())


def current_epoch(model: nn.Module) -> int:
    """Completed epochs before this step: samples consumed over all processes (the trainer
    sets them from its iteration) over the training set's size."""
    size = max(int(getattr(model, "train_size", 0)), 1)
    return int(model.samples_seen) // size


def clip2scene_loss(model: nn.Module, batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The training loss of a batch of scenes (see the module docstring).

    Returns:
        ``loss_semantic`` and ``loss_spatial``, means over the batch's pairs.
    """
    settings = model.settings
    if not batch:
        raise ConfigError("clip2scene: an empty batch")
    device = model.device
    text = model.text_embeddings()
    output, voxels = model.student_forward([s["points"] for s in batch],
                                           [s["colors"] for s in batch])
    crops = torch.cat([s["crops"] for s in batch]).to(device)
    keys = [key for s in batch for key in s.get("crop_keys", [])]
    logits_map, image_map = batch_teacher(model, crops, text, keys)
    voxel_rows, frames, pixels = [], [], []
    voxel_offset = frame_offset = 0
    for sample, vox in zip(batch, voxels, strict=True):
        voxel_rows.append(vox.point_to_voxel[sample["pair_point"].to(device)] + voxel_offset)
        frames.append(sample["pair_frame"].to(device) + frame_offset)
        pixels.append(sample["pair_pixel"].to(device))
        voxel_offset += len(vox.coords)
        frame_offset += len(sample["crops"])
    rows, frames, pixels = torch.cat(voxel_rows), torch.cat(frames), torch.cat(pixels)
    if len(rows) == 0:
        zero = output.final.sum() * 0.0 + output.local.sum() * 0.0
        logger.warning("a batch without any point-pixel pair; its loss is 0")
        return {"loss_semantic": zero, "loss_spatial": zero}
    with torch.no_grad():
        pixel_labels = _sample(logits_map, frames, pixels, settings.crop_size).argmax(1)
        image_features = _sample(image_map, frames, pixels, settings.crop_size)
    point_final = output.final[rows].float()
    point_local = output.local[rows].float()
    if settings.semantic_loss == "infonce":
        # guess: Eq. 1's class-grouped InfoNCE as CE over cosines to the C text embeddings / tau
        logits = F.normalize(point_final, dim=1) @ text.T / settings.temperature
    else:
        logits = point_final @ text.T  # unnormalised, no temperature (the code)
    epoch = current_epoch(model)
    draw = float(torch.rand(()))
    targets = semantic_targets(pixel_labels, logits.detach().argmax(1), epoch,
                               settings.self_training_epoch, settings.self_training_prob, draw)
    semantic = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    spatial = (1 - F.cosine_similarity(point_local, image_features, dim=1)).mean()
    return {"loss_semantic": semantic, "loss_spatial": settings.spatial_weight * spatial}
