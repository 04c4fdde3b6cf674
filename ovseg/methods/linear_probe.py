"""Linear probe: a 1x1 conv classifier trained on frozen dense CLIP (MaskCLIP) features.

The smallest trainable method: it shows how a method plugs into the training engine and
measures how much of a benchmark's classes frozen dense CLIP features separate linearly.

train: image (crop_size x crop_size) -> frozen CLIP, last block in MaskCLIP mode -> (B, D, h, w)
features -> 1x1 conv -> (B, C, h, w) logits -> bilinear to the label size -> cross-entropy
(ignore pixels left out), a mean per image, then over the batch.
predict: resize by short side -> sliding windows of the same features and classifier ->
stitch and resize back -> softmax -> argmax. The classes are those of the training set; it
predicts no other vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.config.schema import InferenceConfig
from ovseg.data.concat import ConcatenatedSamples
from ovseg.encoders.clip import ClipEncoder
from ovseg.errors import ConfigError, VocabularyError
from ovseg.layers.attention import LAST_BLOCK_VARIANTS
from ovseg.layers.labels import argmax_classes
from ovseg.layers.resize import check_image, image_tensor, rescale_size, resize_image
from ovseg.layers.windows import sliding_window_logits
from ovseg.methods.base import Prediction, labels_in_bands
from ovseg.text import as_vocabulary

FEATURE_MODE = "maskclip"  # dense features whose patches keep their own content
IGNORE_LABEL = -1  # training labels: every dataset's own ignore value is mapped to this
# std of the classifier's initial weights: small, so the first losses are near log(C)
INIT_STD = 0.01


class CropSamples(Sequence[dict[str, Any]]):
    """Training samples resized to a fixed square crop, ignore pixels mapped to -1.

    ``samples[i]``: ``image`` (S, S, 3) uint8, ``label`` (S, S) int64 in [0, C) or -1.
    Deterministic (no random augmentation), so a resumed run reads exactly the same data.
    """

    def __init__(self, datasets: Sequence[Any], ignore_values: Sequence[int], crop_size: int):
        if crop_size <= 0:
            raise ConfigError(f"dataloader.crop_size must be positive, got {crop_size}")
        self.samples = ConcatenatedSamples(datasets)
        self.ignore_values = list(ignore_values)
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        which, sample = self.samples.locate(index)
        size = (self.crop_size, self.crop_size)
        image = resize_image(sample["image"], size)
        label = np.asarray(sample["label"])
        ignore = label == self.ignore_values[which]
        # cv2 cannot resize int64: int32 holds every class index (< 65535)
        label = np.where(ignore, IGNORE_LABEL, label).astype(np.int32)
        label = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
        return {"image": np.ascontiguousarray(image), "label": label.astype(np.int64)}


class LinearProbe(nn.Module):
    """A 1x1 conv over frozen dense CLIP features, for a fixed list of classes.

    Args:
        clip: the frozen encoder.
        class_names: the C classes, in label order.
        inference: resize and sliding-window settings of ``predict``.
        bias: give the classifier a bias.
    """

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(self, clip: ClipEncoder, class_names: Sequence[str], inference: InferenceConfig,
                 bias: bool = True) -> None:
        super().__init__()
        if not class_names:
            raise ConfigError("a linear probe needs at least one class")
        self.clip = clip
        self.class_names = list(class_names)
        self.inference = inference
        self.classifier = nn.Conv2d(clip.embed_dim, len(self.class_names), 1, bias=bias)
        nn.init.normal_(self.classifier.weight, std=INIT_STD)
        if bias:
            nn.init.zeros_(self.classifier.bias)
        self.classifier.to(clip.mean.device)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised images -> (B, C, h, w) logits on the patch grid."""
        with torch.no_grad():
            tokens, grid = LAST_BLOCK_VARIANTS[FEATURE_MODE](self.clip(x), self.clip)
            patches = self.clip.project(tokens)[:, -grid[0] * grid[1]:]  # class token dropped
        batch, _, dim = patches.shape
        features = patches.transpose(1, 2).reshape(batch, dim, *grid)
        return self.classifier(features.to(self.classifier.weight.dtype))

    # ---- training ----------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy of a batch: ``image`` (B, H, W, 3) uint8, ``label`` (B, H, W) int64
        (-1 = ignore). A mean over each image's labelled pixels, then over the images."""
        images = batch["image"].to(self.device)
        labels = batch["label"].to(self.device)
        x = self.clip.normalize(images.permute(0, 3, 1, 2))
        logits = F.interpolate(self(x).float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="none")
        valid = (labels != IGNORE_LABEL).float()
        per_image = (per_pixel * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)
        return {"loss_ce": per_image.mean()}

    def train_dataset(self, cfg) -> CropSamples:
        """The samples of ``cfg.datasets.train`` at ``cfg.dataloader.crop_size``."""
        from ovseg.data.catalog import get_benchmark, load_dataset, register_from_config

        register_from_config(cfg)
        names = list(cfg.datasets.train)
        datasets = [load_dataset(name, cfg.datasets.root or None) for name in names]
        ignore_values = [get_benchmark(name).ignore_value for name in names]
        return CropSamples(datasets, ignore_values, cfg.dataloader.crop_size)

    # ---- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, image: np.ndarray, vocabulary) -> Prediction:
        """Segment an (H, W, 3) uint8 RGB image into the trained classes.

        ``vocabulary`` must name exactly the trained classes in their order (a linear probe
        has no text side), e.g. the benchmark's class vocabulary.

        Raises:
            VocabularyError: another vocabulary.
        """
        vocabulary = as_vocabulary(vocabulary)
        if vocabulary.class_names != self.class_names:
            raise VocabularyError(
                f"a linear probe predicts only the {len(self.class_names)} classes it was "
                f"trained on ({', '.join(self.class_names[:5])}"
                f"{', ...' if len(self.class_names) > 5 else ''}); got "
                f"{vocabulary.num_classes} classes ({', '.join(vocabulary.class_names[:5])}"
                f"{', ...' if vocabulary.num_classes > 5 else ''})"
            )
        image = check_image(image, "LinearProbe", self.max_image_pixels)
        height, width = image.shape[:2]
        settings = self.inference
        size = rescale_size(height, width, settings.short_side, settings.max_long_side,
                            min_side=self.clip.patch_size)
        x = self.clip.normalize(image_tensor(image, size, self.device))
        logits = sliding_window_logits(
            x, self, crop=settings.crop, stride=settings.stride,
            window_batch=settings.window_batch, pad_multiple=settings.pad_multiple,
        )[0].cpu()
        labels = labels_in_bands(logits, (height, width), argmax_classes,
                                 num_classes=len(self.class_names))
        return Prediction(labels.numpy(), list(self.class_names), logits, _softmax_over_classes)


def _softmax_over_classes(band: torch.Tensor) -> torch.Tensor:
    """(C, ...) logits -> class probabilities."""
    return band.softmax(dim=0)


def build_linear_probe(cfg) -> LinearProbe:
    """Build :class:`LinearProbe` for the classes of ``cfg.datasets.train`` (all must share one
    class list)."""
    from ovseg.data.catalog import class_vocabulary, register_from_config
    from ovseg.methods.common import clip_from_config, settings_from_config
    from ovseg.methods.device import resolve_device

    register_from_config(cfg)
    names = list(cfg.datasets.train)
    if not names:
        raise ConfigError(
            "model.name linear_probe needs datasets.train: its classes are those of the "
            "training set (e.g. datasets.train '[ade20k_150]')"
        )
    classes = class_vocabulary(names[0]).class_names
    for other in names[1:]:
        if class_vocabulary(other).class_names != classes:
            raise ConfigError(
                f"datasets.train: {names[0]} and {other} have different classes; a linear "
                "probe trains on one class list"
            )
    model_cfg = cfg.model
    clip = clip_from_config(model_cfg, resolve_device(model_cfg.device))
    return LinearProbe(clip, classes, settings_from_config(model_cfg.inference, InferenceConfig))
