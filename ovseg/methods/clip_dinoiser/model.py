"""CLIP-DINOiser: MaskCLIP features pooled by learned patch correlations (clip_dinoiser.md).

Per window, ONE frozen CLIP forward gives both inputs:
    MaskCLIP features F (B, 512, h, w): last block as MaskCLIP (value path), ln_post, proj;
    the ln_2 output of block ``head_block`` (9; B, 768, h, w), the heads' input.
Then
    correlation head -> patch cosines w_ij, w_ij < 0.2 -> 0 -> F'_i = sum_j w_ij F_j / (sum_j w_ij
    + 1e-6)  (global over the window's patches);
    L2-normalise F', cosine with the text classifier, softmax(100 cos)  -> class probabilities;
    background rule (VOC-21, COCO-Object): top probability < 0.99 and sigmoid(background head)
    <= 0.5 -> class-0 probability 1.0;
    probabilities bilinear to the window, averaged over overlaps, bilinear to the image, argmax.

Inference uses CLIP and the two heads only. The teachers (DINO ViT-B/16, FOUND's decoder on DINO
ViT-S/8) exist only in training, in :mod:`ovseg.methods.clip_dinoiser.training`, which the
training hooks below import lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.config.schema import DinoConfig, InferenceConfig
from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.weights import seeded_init
from ovseg.errors import ConfigError
from ovseg.layers.attention import maskclip_last_block
from ovseg.layers.labels import argmax_classes, class_probabilities
from ovseg.layers.resize import check_image, image_tensor, rescale_size
from ovseg.layers.windows import WindowBatch, splice_windows, window_batches
from ovseg.methods.base import ImageState, Prediction, labels_in_bands
from ovseg.methods.common import (
    TextClassifiers,
    clip_from_config,
    settings_from_config,
)
from ovseg.methods.device import resolve_device
from ovseg.modeling.dinoiser_heads import HEADS_CONFIG_KEY, DinoiserHeads, patch_cosines
from ovseg.text import as_vocabulary, get_templates

logger = logging.getLogger(__name__)

SECTION = "model.clip_dinoiser"


@dataclass
class ClipDinoiserConfig:
    """``cfg.model.clip_dinoiser``: the heads, the pooling, the scoring, the background rule,
    and what training reads (the correlation teacher is ``model.dino``)."""

    # 0-based CLIP block whose ln_2 output the heads read (resblocks[-3] of ViT-B/16)
    head_block: int = 9
    proj_dim: int = 256  # correlation head's output width
    corr_threshold: float = 0.2  # pooling weights below this (strictly) are 0
    pool_eps: float = 1e-6  # added to each patch's weight sum
    logit_scale: float = 100.0  # softmax(logit_scale * cos); fixed, not CLIP's own
    # the background rule (VOC-21 and COCO-Object configs): class 0 is the background
    background_rule: bool = False
    background_prob_threshold: float = 0.99  # top class probability below this ...
    background_saliency_threshold: float = 0.5  # ... and saliency at most this -> class 0
    heads: str = ""  # trained heads file (.safetensors, or the authors' last.pt); "" = random
    # ---- training (ovseg.methods.clip_dinoiser.training); never read at inference ----------
    image_dir: str = ""  # training images: a folder of images (ImageFolder layout or flat)
    subset_size: int = 1000  # images drawn from image_dir (seed: cfg.seed)
    with_replacement: bool = False  # true = the reference's np.random.choice draw
    target_corr_threshold: float = 0.2  # DINO target: value cosine >= this
    found_threshold: float = 0.5  # FOUND target: resized sigmoid > this
    # FOUND's backbone: DINO ViT-S/8, last-block keys, and FOUND's trained decoder file
    found_dino_arch: str = "vit_small_patch8_224.dino"
    found_dino_weights: str = "timm"
    found_weights: str = ""  # FOUND's data/weights/decoder_weights.pt
    target_cache_dir: str = ""  # "" = teacher targets are not cached on disk
    # 0 = a fresh augmentation per read; N = each image's crop is one of N fixed draws, so
    # its cached targets are reused (training.ImageFolderCrops)
    augment_variants: int = 0


class ClipDinoiser(nn.Module):
    """CLIP-DINOiser: a frozen CLIP and two trained heads.

    Args:
        clip: the frozen encoder (OpenCLIP ViT-B/16 ``laion2b_s34b_b88k`` in the paper; any
            size: the heads take its width).
        settings: ``model.clip_dinoiser``.
        inference: resize and sliding windows (``model.inference``).
        templates: prompt templates of the text classifier.
        text_cache_dir: on-disk text-classifier cache (None = the default).
        dino_settings: ``model.dino``, the correlation teacher (read by training only).
    """

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(
        self,
        clip: ClipEncoder,
        settings: ClipDinoiserConfig,
        inference: InferenceConfig,
        templates: list[str],
        text_cache_dir: str | None = None,
        dino_settings: DinoConfig | None = None,
    ):
        super().__init__()
        _check_settings(settings)
        self.clip = clip
        self.settings = settings
        self.inference = inference
        self.dino_settings = dino_settings or DinoConfig()
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)
        with seeded_init():  # untrained heads are the same every build
            heads = DinoiserHeads(clip.width, settings.proj_dim)
        self.heads = heads.to(clip.mean.device)
        if settings.heads:
            self.heads.load_file(settings.heads, HEADS_CONFIG_KEY)
        else:
            logger.info("CLIP-DINOiser heads are untrained; set %s to a trained heads file "
                        "(or model.weights with tools/train_net.py)", HEADS_CONFIG_KEY)

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    # ---- training hooks (ovseg.methods.clip_dinoiser.training) -----------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def loss(self, batch):
        from ovseg.methods.clip_dinoiser.training import dinoiser_loss

        return dinoiser_loss(self, batch)

    def train_dataset(self, cfg):
        from ovseg.methods.clip_dinoiser.training import build_train_dataset

        return build_train_dataset(self, cfg)

    def optimizer_param_groups(self, solver):
        from ovseg.methods.clip_dinoiser.training import param_groups

        return param_groups(self, solver)

    # ---- the network -------------------------------------------------------------------------
    def head_inputs(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """One frozen CLIP forward of (B, 3, H, W) CLIP-normalised windows ->
        (MaskCLIP features (B, D, h, w) before any L2 norm, ln_2 output of block
        ``head_block`` (B, W, h, w), class token dropped), both float32 and without gradient.
        D = the joint embedding dim (512), W = the width (768), (h, w) = the patch grid."""
        block = self.settings.head_block
        with torch.no_grad():
            out = self.clip(windows, ln2_blocks=(block,))
            if block not in out.ln2:
                raise ConfigError(f"{SECTION}.head_block {block} is not a block of this CLIP "
                                  f"({self.clip.name}); use a 0-based index of one of its "
                                  "blocks (9 for ViT-B/16)")
            tokens, grid = maskclip_last_block(out, self.clip)
            count = grid[0] * grid[1]
            features = self.clip.project(tokens)[:, -count:]  # class token dropped
            ln2 = out.ln2[block][:, -count:]
        return _to_map(features, grid), _to_map(ln2, grid)

    def correlation_pool(self, features: Tensor, corr: Tensor) -> Tensor:
        """(B, D, h, w) MaskCLIP features pooled by the correlation head's (B, P, h, w) output
        ``corr``: :func:`pool_by_correlation` of its patch cosines."""
        settings = self.settings
        return pool_by_correlation(features, patch_cosines(corr), settings.corr_threshold,
                                   settings.pool_eps)

    def background_logits(self, ln2: Tensor) -> Tensor:
        """(B, W, h, w) ln_2 features -> (B, 1, h, w) background-head logits (sigmoid =
        foreground saliency)."""
        return self.heads.background_logits(ln2)

    def window_outputs(self, windows: Tensor) -> DinoiserWindows:
        """(B, 3, H, W) CLIP-normalised windows -> their pooled, L2-normalised features and
        their saliency: all that does not depend on the vocabulary."""
        features, ln2 = self.head_inputs(windows)
        pooled = self.correlation_pool(features, self.heads.correlation_features(ln2))
        saliency = self.background_logits(ln2).float().sigmoid()
        return DinoiserWindows(F.normalize(pooled, dim=1), saliency)

    def window_probabilities(self, outputs: DinoiserWindows, text: Tensor,
                             vocabulary) -> Tensor:
        """(B, C, h, w) class probabilities of a window batch: softmax(logit_scale * cos) over
        the names, max over each class's synonyms, then the background rule when it is on."""
        cosine = outputs.cosine(text)  # (B, N_names, h, w)
        probs = class_probabilities(cosine.transpose(0, 1), vocabulary,
                                    self.settings.logit_scale).transpose(0, 1)
        if self.settings.background_rule:
            probs = apply_background_rule(probs, outputs.saliency,
                                          self.settings.background_prob_threshold,
                                          self.settings.background_saliency_threshold)
        return probs

    # ---- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> ClipDinoiserState:
        """Resize an (H, W, 3) uint8 RGB image by its short side and run CLIP and the heads
        over its sliding windows; kept per window batch for :meth:`predict`."""
        image = check_image(image, "ClipDinoiser", self.max_image_pixels)
        inference = self.inference
        height, width = image.shape[:2]
        size = rescale_size(height, width, inference.short_side, inference.max_long_side,
                            min_side=self.clip.patch_size)
        x = self.clip.normalize(image_tensor(image, size, self.device))
        if inference.crop <= 0:  # the whole image is one window
            batches = [(WindowBatch([(0, 0, *size)], (0, 0, 0, 0), tuple(size)), x)]
        else:
            batches = window_batches(x, crop=inference.crop, stride=inference.stride,
                                     window_batch=inference.window_batch,
                                     pad_multiple=inference.pad_multiple)
        windows = [(batch, self.window_outputs(pixels)) for batch, pixels in batches]
        return ClipDinoiserState(size=(int(height), int(width)), resized=tuple(size),
                                 windows=windows)

    @torch.inference_mode()
    def predict(
        self,
        image: np.ndarray | ClipDinoiserState,
        vocabulary,
        classifier: Tensor | None = None,
    ) -> Prediction:
        """Segment an image, or the :class:`ClipDinoiserState` of one, into ``vocabulary``.

        Args:
            image: (H, W, 3) uint8 RGB, or ``encode(image)`` (then no encoder runs again).
            vocabulary: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list;
                with ``background_rule`` on, class 0 is the background.
            classifier: (N_names, D) L2-normalised text embeddings of the vocabulary's names;
                None = from the text encoder (cached per vocabulary).

        Returns:
            a :class:`Prediction` whose scores are the (C, h, w) stitched class probabilities
            of the resized image (they sum to 1 per pixel unless the background rule set a
            class-0 probability to 1).
        """
        state = image if isinstance(image, ClipDinoiserState) else self.encode(image)
        vocabulary = as_vocabulary(vocabulary)
        text = self.text_classifier(vocabulary.names) if classifier is None else classifier
        spliced = ((batch.boxes, batch.to_window(self.window_probabilities(outputs, text,
                                                                          vocabulary)))
                   for batch, outputs in state.windows)
        scores = splice_windows(spliced, state.resized).cpu()
        labels = labels_in_bands(scores, state.size, _argmax,
                                 num_classes=len(vocabulary.class_names))
        return Prediction(labels.numpy(), vocabulary.class_names, scores, _as_they_are)

    def load_heads(self, path: str, config_key: str = HEADS_CONFIG_KEY) -> None:
        """Load a heads file strictly (ours, a training checkpoint's or the authors' last.pt)."""
        self.heads.load_file(path, config_key)


def _to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) patch tokens -> (B, C, h, w) float32."""
    return tokens.float().transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _argmax(band: Tensor) -> Tensor:
    return argmax_classes(band)


def _as_they_are(band: Tensor) -> Tensor:
    """The scores are class probabilities already."""
    return band


def pool_by_correlation(features: Tensor, cosines: Tensor, threshold: float,
                        eps: float) -> Tensor:
    """CLIP-DINOiser's global correlation pooling of one window's patches.

    F'_i = sum_j w_ij F_j / (sum_j w_ij + eps) with w_ij = cos_ij, or 0 where cos_ij <
    ``threshold`` (strict, so negatives are 0 too; the self-weight is 1).

    Args:
        features: (B, D, h, w) features F.
        cosines: (B, N, N) patch cosines, N = h * w row-major.

    Returns:
        (B, D, h, w) float32.
    """
    weights = cosines.float().masked_fill(cosines < threshold, 0.0)
    flat = features.float().flatten(2)  # (B, D, N)
    pooled = flat @ weights.transpose(1, 2)  # [b, d, i] = sum_j F[b, d, j] w_ij
    pooled = pooled / (weights.sum(dim=-1).unsqueeze(1) + eps)
    return pooled.reshape(features.shape)


def apply_background_rule(probs: Tensor, saliency: Tensor, prob_threshold: float,
                          saliency_threshold: float) -> Tensor:
    """The background rule, per window and per patch, for any batch.

    Where the top class probability < ``prob_threshold`` and the saliency <=
    ``saliency_threshold``, the class-0 probability becomes 1.0.

    Args:
        probs: (B, C, h, w) class probabilities, class 0 the background.
        saliency: (B, 1, h, w) sigmoid of the background head.

    Returns:
        (B, C, h, w), a new tensor.
    """
    background = (probs.max(dim=1).values < prob_threshold) & (
        saliency[:, 0] <= saliency_threshold)
    probs = probs.clone()
    probs[:, 0] = torch.where(background, torch.ones_like(probs[:, 0]), probs[:, 0])
    return probs


def _check_settings(settings: ClipDinoiserConfig) -> None:
    if settings.head_block < 0:
        raise ConfigError(f"{SECTION}.head_block must be a 0-based block index (>= 0), got "
                          f"{settings.head_block}")
    if settings.proj_dim < 1:
        raise ConfigError(f"{SECTION}.proj_dim must be positive, got {settings.proj_dim}")
    if settings.pool_eps <= 0:
        raise ConfigError(f"{SECTION}.pool_eps must be positive, got {settings.pool_eps}")


@dataclass
class DinoiserWindows:
    """What :meth:`ClipDinoiser.window_outputs` keeps of a window batch.

    features: (B, D, h, w) float32 pooled features, L2-normalised per patch;
    saliency: (B, 1, h, w) float32 sigmoid of the background head.
    """

    features: Tensor
    saliency: Tensor

    def cosine(self, text: Tensor) -> Tensor:
        """(B, N_names, h, w) float32 cosines with an (N_names, D) normalised classifier."""
        return torch.einsum("bdhw,kd->bkhw", self.features, text.to(self.features))


@dataclass
class ClipDinoiserState(ImageState):
    """What :meth:`ClipDinoiser.encode` keeps of an image.

    resized: (h, w) of the resized image; windows: (where the batch lies, its outputs) per
        window batch (the whole image is one window when ``model.inference.crop`` <= 0).
    """

    resized: tuple[int, int] = (0, 0)
    windows: list[tuple[WindowBatch, DinoiserWindows]] = field(default_factory=list)


def build_clip_dinoiser(cfg) -> ClipDinoiser:
    """Build :class:`ClipDinoiser` from a full config (``cfg.model``, ``cfg.text``); only CLIP
    is built (the teachers are training's)."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    return ClipDinoiser(
        clip_from_config(model_cfg, device),
        settings_from_config(model_cfg.clip_dinoiser, ClipDinoiserConfig),
        settings_from_config(model_cfg.inference, InferenceConfig),
        get_templates(cfg.text.templates),
        text_cache_dir=cfg.text.cache_dir or None,
        dino_settings=settings_from_config(model_cfg.dino, DinoConfig),
    )
