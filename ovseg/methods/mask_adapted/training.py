"""Mask-adapted CLIP's three training stages (mask_adapted.md "Stage 1" and "Adapting CLIP").

``model.mask_adapted.stage`` picks what trains and on what:

- ``proposals`` (a): the proposal network on a semantic-segmentation set (COCO-Stuff-171
  train2017 in the paper; ``datasets.train``). Each image's targets are the binary masks of
  the classes it holds (ignore pixels in none); Hungarian matching + CE (no-object 0.1) +
  20 focal + 1 dice on the final and the 5 intermediate decoder layers
  (:class:`ovseg.modeling.mask_criterion.MaskCriterion`); class logits against the frozen
  CLIP text embeddings of the training set's names. Augmentation: short side drawn from
  ``train_short_sides``, random ``dataloader.crop_size`` crop (image padded with 128, labels
  with ignore), SSD colour jitter, flip. Groups: backbone (x ``backbone_lr_multiplier``) and
  the rest, each with and without weight decay (norms and embeddings: 0).
- ``clip`` (b): CLIP's image tower on masked-region / noun pairs (``region_pairs``,
  :file:`tools/mine_region_nouns.py`), text tower frozen, CLIP's contrastive loss against the
  raw nouns (no template); RandomResizedCrop(224, scale 0.9-1.0).
- ``prompts`` (c): the mask prompts only, both encoders frozen, the same pairs and loss with
  the prompts inserted where the crop's patches are blank; a crop's mask = its pixels that are
  not exactly the stored fill colour (124, 116, 103).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ovseg.data.concat import ConcatenatedSamples
from ovseg.data.image_io import read_image
from ovseg.errors import ConfigError, DatasetError
from ovseg.layers.resize import resize_image
from ovseg.modeling.mask_criterion import MaskCriterion
from ovseg.modeling.mask_proposal import normalize_images
from ovseg.modeling.matcher import MaskTargets

IGNORE_LABEL = -1  # training labels: every dataset's ignore value is mapped to this
PAD_VALUE = 128  # the image padding of the reference's semantic dataset mapper
# the fill colour of the stored region crops (mask_adapted.md "Adapting CLIP"); MPT training
# takes a crop's mask to be its pixels that differ from it
STORED_FILL = (124, 116, 103)
CROP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- parameters


def stage_parameters(model, stage: str) -> list[nn.Parameter]:
    """The parameters trained in ``stage``."""
    if stage == "proposals":
        # the backbone's frozen parts (frozen batch norms) hold buffers, not parameters
        return list(model.proposals.parameters())
    if stage == "clip":
        return list(model.clip.model.visual.parameters())
    return [model.prompts.mask_embedding]


def _no_decay(name: str, parameter: nn.Parameter, module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)) \
        or name.endswith(("query_embed.weight", "no_object_embedding",
                          "absolute_pos_embed", "relative_position_bias_table"))


def param_groups(model, solver) -> list[dict[str, Any]]:
    """Named optimizer groups of the stage. proposals: ``backbone`` and ``head`` at
    ``base_lr`` x ``backbone_lr_multiplier`` and ``base_lr``, each with a ``*_no_decay`` twin
    (norm and embedding weights, weight decay 0); clip / prompts: one group."""
    trainable = {id(p) for p in model.trainable_parameters()}
    if model.stage != "proposals":
        return [{"name": model.stage, "params": [p for p in model.parameters()
                                                  if id(p) in trainable]}]
    base_lr = float(solver.base_lr)
    multiplier = float(model.settings.backbone_lr_multiplier)
    groups: dict[str, dict[str, Any]] = {}
    for module_name, module in model.proposals.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in trainable:
                continue
            full = f"{module_name}.{name}" if module_name else name
            part = "backbone" if full.startswith("backbone.") else "head"
            key = part + ("_no_decay" if _no_decay(full, parameter, module) else "")
            group = groups.setdefault(key, {
                "name": key, "params": [],
                "lr": base_lr * (multiplier if part == "backbone" else 1.0),
                **({"weight_decay": 0.0} if key.endswith("_no_decay") else {}),
            })
            group["params"].append(parameter)
    return list(groups.values())


# --------------------------------------------------------------------------- losses


def stage_loss(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    if model.stage == "proposals":
        return proposal_loss(model, batch)
    return region_contrastive_loss(model, batch)


def semantic_targets(labels: Tensor) -> list[MaskTargets]:
    """(B, H, W) int64 labels (-1 = ignore) -> per image the binary masks of the classes it
    holds, classes increasing."""
    targets = []
    for label in labels:
        classes = torch.unique(label)
        classes = classes[classes != IGNORE_LABEL]
        targets.append(MaskTargets(classes, label[None] == classes[:, None, None]))
    return targets


def proposal_loss(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Stage a: MaskFormer's set losses with deep supervision, on (B, 3, S, S) uint8 images and
    (B, S, S) labels."""
    text = model.train_text_embeddings
    if text is None:
        raise ConfigError("stage proposals has no class names: build the data with "
                          "train_dataset(cfg) first")
    criterion = MaskCriterion()
    outputs = model.proposals(normalize_images(batch["image"]), text.to(batch["image"].device),
                              aux=True)
    return criterion(outputs.final, semantic_targets(batch["label"]), outputs.aux)


def region_contrastive_loss(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Stages b and c: CLIP's symmetric contrastive loss of region crops against their raw
    nouns (text tower frozen), over the batch of this process."""
    images = batch["image"]
    text = F.normalize(model.clip.encode_text(list(batch["noun"])).to(images.device), dim=-1)
    if model.stage == "prompts":
        regions = model.prompts(model.clip, images, batch["mask"])
    else:
        regions = model.clip.encode_image(images)
    regions = F.normalize(regions.float(), dim=-1)
    # guess: the logit scale stays at the pretrained value (only the image tower trains)
    scale = model.clip.model.logit_scale.detach().exp().float()
    logits = scale * regions @ text.T
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return {"loss_contrastive": loss}


# --------------------------------------------------------------------------- data


def build_train_dataset(model, cfg):
    """The stage's samples: semantic crops of ``datasets.train`` (proposals) or the region/noun
    pairs of ``model.mask_adapted.region_pairs`` (clip, prompts)."""
    settings = model.settings
    if model.stage != "proposals":
        return RegionNounPairs(settings.region_pairs, settings.region_crop_scale,
                               with_masks=model.stage == "prompts")
    from ovseg.data.catalog import (
        class_vocabulary,
        get_benchmark,
        load_dataset,
        register_from_config,
    )

    register_from_config(cfg)
    names = list(cfg.datasets.train)
    if not names:
        raise ConfigError("model.mask_adapted.stage proposals trains on datasets.train (COCO-Stuff"
                          "-171 train2017 in the paper, e.g. a datasets.custom entry)")
    infos = [get_benchmark(name) for name in names]
    vocabularies = [class_vocabulary(name, cfg.text.prompt_names) for name in names]
    if any(v.classes != vocabularies[0].classes for v in vocabularies[1:]):
        raise ConfigError(f"datasets.train: {names} have different classes; the proposal "
                          "network trains on one class list")
    model.train_text_embeddings = _class_embeddings(model, vocabularies[0])
    datasets = [load_dataset(name, cfg.datasets.root or None) for name in names]
    return SemanticCrops(datasets, [info.ignore_value for info in infos],
                         cfg.dataloader.crop_size, list(settings.train_short_sides),
                         flip=settings.flip, color_jitter=settings.color_jitter)


def _class_embeddings(model, vocabulary) -> Tensor:
    """(K, D) text embeddings of the classes (a class's first name), templates averaged."""
    with torch.no_grad():
        return model.text_classifier(vocabulary.class_names).float()


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def ssd_color_jitter(image: np.ndarray) -> np.ndarray:
    """SSD's photometric distortion of an (H, W, 3) uint8 RGB image, each step with p 0.5:
    brightness + U(-32, 32), contrast x U(0.5, 1.5), saturation x U(0.5, 1.5), hue +
    U(-18, 18) (OpenCV's 0..180 hue); contrast before or after the HSV steps, at random."""
    out = image.astype(np.float32)

    def contrast(x):
        return np.clip(x * _uniform(0.5, 1.5), 0, 255) if _coin() else x

    if _coin():
        out = np.clip(out + _uniform(-32, 32), 0, 255)
    contrast_first = _coin()
    if contrast_first:
        out = contrast(out)
    hsv = cv2.cvtColor(out.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    if _coin():
        hsv[..., 1] = np.clip(hsv[..., 1] * _uniform(0.5, 1.5), 0, 255)
    if _coin():
        hsv[..., 0] = (hsv[..., 0] + int(_uniform(-18, 18))) % 180
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        out = contrast(out)
    return out.astype(np.uint8)


class SemanticCrops(Sequence[dict[str, Any]]):
    """Stage-a samples: ``image`` (3, S, S) uint8, ``label`` (S, S) int64 in [0, K) or -1.

    Args:
        datasets: semantic-segmentation datasets (``ovseg.data.catalog.load_dataset``).
        ignore_values: each dataset's ignore value (mapped to -1).
        crop_size: S.
        short_sides: the short side is drawn from these first ([] = kept).
        flip, color_jitter: horizontal flip (p 0.5), SSD colour jitter.
    """

    def __init__(self, datasets: Sequence[Any], ignore_values: Sequence[int], crop_size: int,
                 short_sides: Sequence[int] = (), *, flip: bool = True,
                 color_jitter: bool = True):
        if crop_size <= 0:
            raise ConfigError(f"dataloader.crop_size must be positive, got {crop_size}")
        self.samples = ConcatenatedSamples(datasets)
        self.ignore_values = list(ignore_values)
        self.crop_size = crop_size
        self.short_sides = [int(s) for s in short_sides]
        self.flip = flip
        self.color_jitter = color_jitter

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        which, sample = self.samples.locate(index)
        image = np.asarray(sample["image"])
        label = np.asarray(sample["label"])
        label = np.where(label == self.ignore_values[which], IGNORE_LABEL, label).astype(np.int32)
        if self.short_sides:
            short = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
            scale = short / min(image.shape[:2])
            size = (int(image.shape[0] * scale + 0.5), int(image.shape[1] * scale + 0.5))
            image = resize_image(image, size)
            label = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
        image, label = self._crop(image, label)
        if self.color_jitter:
            image = ssd_color_jitter(image)
        if self.flip and _coin():
            image, label = image[:, ::-1], label[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "label": torch.from_numpy(np.ascontiguousarray(label)).long()}

    def _crop(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.crop_size
        height, width = label.shape
        top = int(torch.randint(max(height - size, 0) + 1, ()))
        left = int(torch.randint(max(width - size, 0) + 1, ()))
        image = image[top:top + size, left:left + size]
        label = label[top:top + size, left:left + size]
        pad = ((0, size - label.shape[0]), (0, size - label.shape[1]))
        image = np.pad(image, (*pad, (0, 0)), constant_values=PAD_VALUE)
        label = np.pad(label, pad, constant_values=IGNORE_LABEL)
        return image, label


class RegionNounPairs(Sequence[dict[str, Any]]):
    """Stage b/c samples from a pairs file (one JSON object a line: ``image``, a crop file
    relative to the file's folder, and ``noun``).

    ``pairs[i]``: ``image`` (3, 224, 224) float32 CLIP-normalised (RandomResizedCrop at
    ``scale``, bicubic), ``noun`` str, and with ``with_masks`` ``mask`` (224, 224) float32:
    1 where the crop's pixel is not exactly :data:`STORED_FILL`, cropped and resized
    (nearest) with the image.
    """

    def __init__(self, pairs_file: str, scale: Sequence[float] = (0.9, 1.0), *,
                 with_masks: bool = False):
        path = Path(pairs_file).expanduser()
        if not pairs_file or not path.is_file():
            raise DatasetError(f"region/noun pairs file {pairs_file!r} does not exist; set "
                               "model.mask_adapted.region_pairs to the pairs.jsonl of "
                               "tools/mine_region_nouns.py")
        self.root = path.parent
        self.pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
        if not self.pairs:
            raise DatasetError(f"region/noun pairs file {path} is empty")
        self.scale = (float(scale[0]), float(scale[1]))
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        pair = self.pairs[index]
        crop = read_image(self.root / pair["image"])
        image = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
        top, left, height, width = RandomResizedCrop.get_params(
            image, scale=list(self.scale), ratio=[3 / 4, 4 / 3])
        pixels = TF.resized_crop(image.float() / 255.0, top, left, height, width,
                                 [CROP_SIZE, CROP_SIZE], InterpolationMode.BICUBIC,
                                 antialias=True)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        sample = {"image": (pixels - mean) / std, "noun": str(pair["noun"])}
        if self.with_masks:
            # guess: the mask is taken on the stored crop, then cropped and resized with it
            fill = torch.tensor(STORED_FILL, dtype=torch.uint8).view(3, 1, 1)
            mask = (image != fill).any(dim=0).float()[None]
            sample["mask"] = TF.resized_crop(mask, top, left, height, width,
                                             [CROP_SIZE, CROP_SIZE],
                                             InterpolationMode.NEAREST)[0]
        return sample


def iterations_for_epochs(epochs: int, samples: int, batch: int) -> int:
    """Iterations of ``epochs`` passes over ``samples`` at ``batch`` per step (configs set
    ``solver.max_iter`` from it: 5 epochs of the 442,117 pairs)."""
    return int(math.ceil(epochs * samples / batch))
