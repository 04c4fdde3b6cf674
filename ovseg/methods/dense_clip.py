"""Dense CLIP baselines: MaskCLIP, SCLIP, NACLIP and ProxyCLIP as one segmentor (dense_clip.md).

predict = resize by short side -> sliding windows of CLIP (last block in the chosen mode) ->
cosine with the text classifier -> stitch and resize back -> optional PAMR -> softmax over names,
max over each class's synonyms -> thresholds -> argmax.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.config.schema import DenseClipConfig, InferenceConfig, PamrConfig
from ovseg.encoders.clip import CLIP_MODES, OPENAI_MEAN, OPENAI_STD, ClipEncoder
from ovseg.errors import ConfigError
from ovseg.layers.chunked_resize import map_resized_bands
from ovseg.layers.pamr import PAMR
from ovseg.layers.resize import rescale_size, resize_image
from ovseg.layers.windows import sliding_window_logits
from ovseg.methods.base import Prediction
from ovseg.methods.common import (
    TextClassifiers,
    clip_from_config,
    dino_from_config,
    settings_from_config,
)
from ovseg.methods.device import resolve_device
from ovseg.text import Vocabulary, as_vocabulary, get_templates
from ovseg.text.vocabulary import max_over_synonyms


def name_probabilities(cosine: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """softmax(logit_scale * cos) over the names axis (0) of (N_names, ...)."""
    return (logit_scale * cosine).softmax(dim=0)


def suppress_small_classes(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's area rule on (C, H, W), in place: zero the probabilities of every non-background
    class whose argmax area is not above ``area_thd`` times the predicted-foreground area."""
    counts = torch.bincount(probs.argmax(0).flatten(), minlength=probs.shape[0]).float()
    foreground = counts[1:]
    keep = (foreground > area_thd * foreground.sum()).to(probs.dtype)
    probs[1:] *= keep.view(-1, 1, 1).to(probs.device)
    return probs


def labels_from_probabilities(probs: torch.Tensor, prob_thd: float) -> torch.Tensor:
    """Argmax of (C, H, W) class probabilities; pixels whose max is below ``prob_thd`` get 0."""
    best, labels = probs.max(dim=0)
    if prob_thd > 0:
        labels = torch.where(best < prob_thd, torch.zeros_like(labels), labels)
    return labels


class DenseClip(nn.Module):
    """A training-free dense CLIP segmentor; ``mode`` picks the last-block variant."""

    def __init__(
        self,
        clip: ClipEncoder,
        settings: DenseClipConfig,
        inference: InferenceConfig,
        pamr: PamrConfig,
        templates: list[str],
        dino: nn.Module | None = None,
        text_cache_dir: str | None = None,
    ):
        super().__init__()
        if settings.mode not in CLIP_MODES:
            raise ConfigError(
                f"model.dense_clip.mode: unknown mode {settings.mode!r}; one of {CLIP_MODES}"
            )
        if settings.mode == "proxy" and dino is None:
            raise ConfigError("model.dense_clip.mode 'proxy' needs a DINO encoder (model.dino)")
        self.clip = clip
        self.dino = dino
        self.settings = settings
        self.inference = inference
        self.pamr = PAMR(pamr.steps, tuple(pamr.dilations)) if pamr.steps > 0 else None
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    # ---- image -------------------------------------------------------------------------------
    def proxy_features(self, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """DINO tokens of CLIP-normalised windows, re-normalised with ImageNet statistics."""
        features = self.dino(self.dino.renormalize(windows, OPENAI_MEAN, OPENAI_STD))
        return features.tokens, tuple(features.grid)

    def window_cosine(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) CLIP-normalised windows -> (B, N_names, gh, gw) cosine on the patch grid."""
        proxy_tokens = proxy_grid = None
        if self.settings.mode == "proxy":
            proxy_tokens, proxy_grid = self.proxy_features(windows)
        out = self.clip(
            windows, self.settings.mode, proxy_tokens=proxy_tokens, proxy_grid=proxy_grid,
            naclip_sigma=self.settings.naclip_sigma, proxy_gamma=self.settings.proxy_gamma,
            proxy_beta=self.settings.proxy_beta,
        )
        features = F.normalize(out.features, dim=-1)
        cosine = features @ text.to(features.dtype).T
        return cosine.transpose(1, 2).reshape(windows.shape[0], -1, *out.grid).float()

    def dense_cosine(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) CLIP-normalised image -> (1, N_names, H, W) stitched window cosines."""
        settings = self.inference
        return sliding_window_logits(
            x, lambda windows: self.window_cosine(windows, text), crop=settings.crop,
            stride=settings.stride, window_batch=settings.window_batch,
            pad_multiple=settings.pad_multiple,
        )

    def class_probabilities(self, cosine: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """(N_names, ...) cosines -> (C, ...): softmax over names, then max over synonyms."""
        probs = name_probabilities(cosine, self.settings.logit_scale)
        probs = max_over_synonyms(
            probs, vocabulary.name_to_class.to(probs.device), vocabulary.num_classes
        )
        if self.settings.renormalize:
            probs = probs / probs.sum(dim=0, keepdim=True)
        return probs

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities -> (H, W) int64 labels; may zero small classes in place."""
        if self.settings.area_thd > 0:
            suppress_small_classes(probs, self.settings.area_thd)
        return labels_from_probabilities(probs, self.settings.prob_thd)

    @torch.inference_mode()
    def predict(self, image: np.ndarray, vocabulary) -> Prediction:
        """Segment an (H, W, 3) uint8 RGB image into the classes of ``vocabulary``.

        ``vocabulary``: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list.
        """
        vocabulary = as_vocabulary(vocabulary)
        text = self.text_classifier(vocabulary.names)
        height, width = image.shape[:2]
        size = rescale_size(height, width, self.inference.short_side, self.inference.max_long_side)
        resized = resize_image(image, size)
        pixels = torch.from_numpy(np.ascontiguousarray(resized)).to(self.device)
        x = self.clip.normalize(pixels.permute(2, 0, 1)[None])
        if self.inference.crop <= 0:  # whole image: patch logits go straight to the input size
            cosine = self.window_cosine(x, text)[0]
        else:
            cosine = self.dense_cosine(x, text)[0]
        if self.pamr is not None:
            probs = self.class_probabilities(self._refine(cosine, x, (height, width)), vocabulary)
        else:
            probs = self._class_probabilities_in_bands(cosine, (height, width), vocabulary)
        labels = self.labels(probs)
        return Prediction(labels.cpu().numpy(), probs.cpu(), vocabulary.class_names)

    def _refine(self, cosine: torch.Tensor, x: torch.Tensor, size) -> torch.Tensor:
        # guess: NACLIP refines at the original size with the normalised image resized to it
        cosine = F.interpolate(cosine[None], size=size, mode="bilinear", align_corners=False)
        guide = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.pamr(guide, cosine)[0]

    def _class_probabilities_in_bands(self, cosine, size, vocabulary: Vocabulary) -> torch.Tensor:
        """Resize back and score a band of rows at a time: memory is one band plus the output."""
        return map_resized_bands(
            cosine, size, lambda band: self.class_probabilities(band, vocabulary),
            vocabulary.num_classes,
        )


def build_dense_clip(cfg) -> DenseClip:
    """Build :class:`DenseClip` from a full config (``cfg.model``, ``cfg.text``)."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    mode = model_cfg.dense_clip.mode
    return DenseClip(
        clip_from_config(model_cfg, device),
        settings_from_config(model_cfg.dense_clip, DenseClipConfig),
        settings_from_config(model_cfg.inference, InferenceConfig),
        settings_from_config(model_cfg.pamr, PamrConfig),
        get_templates(cfg.text.templates),
        dino=dino_from_config(model_cfg, device) if mode == "proxy" else None,
        text_cache_dir=cfg.text.cache_dir or None,
    )
