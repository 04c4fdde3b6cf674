"""Dense CLIP baselines: MaskCLIP, SCLIP, NACLIP and ProxyCLIP as one segmentor (dense_clip.md).

predict = resize by short side -> sliding windows of CLIP (last block in the chosen mode) ->
cosine with the text classifier -> stitch and resize back -> optional PAMR -> softmax over names,
max over each class's synonyms -> thresholds -> argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.config.schema import InferenceConfig
from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.sam import SamEncoder, SamFeatures
from ovseg.errors import ConfigError
from ovseg.layers.attention import LAST_BLOCK_VARIANTS
from ovseg.layers.labels import (
    argmax_classes,
    class_probabilities,
    labels_from_probabilities,
    small_class_mask,
    suppress_small_classes,
)
from ovseg.layers.pamr import PAMR
from ovseg.layers.resize import check_image, image_tensor, rescale_size
from ovseg.layers.windows import WindowBatch, splice_windows, window_batches
from ovseg.methods.base import ImageState, Prediction, labels_in_bands, score_bands
from ovseg.methods.common import (
    TextClassifiers,
    clip_from_config,
    dino_from_config,
    sam_from_config,
    settings_from_config,
)
from ovseg.methods.device import resolve_device
from ovseg.methods.sam_refine import RefineConfig, SamRefiner, check_refine_settings
from ovseg.text import as_vocabulary, get_templates


@dataclass
class DenseClipConfig:
    """``cfg.model.dense_clip``: the last-block mode and the scoring of specs/dense_clip.md."""

    mode: str = "maskclip"  # vanilla | maskclip | sclip | naclip | proxy
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float = 0.0
    # NACLIP renormalises the class probabilities to sum 1 after the max over synonyms
    renormalize: bool = False
    naclip_sigma: float = 5.0  # Gaussian std in patches
    proxy_gamma: float = 3.0
    proxy_beta: float = 1.2
    # ProxyCLIP's proxy model: "dino" = the DINO-family ViT of model.dino (DINO, DINOv2, MAE...);
    # "sam" = SAM's image encoder of model.sam (the window stretched to its square input)
    proxy: str = "dino"
    # "none" = the proxy sees the window as it is; "crop" = resized to crop x crop first
    # (ProxyCLIP's MAE, built for that input size)
    proxy_resize: str = "none"


@dataclass
class PamrConfig:
    """``cfg.model.pamr``: PAMR refinement of the dense logits (NACLIP)."""

    steps: int = 0  # 0 = off
    dilations: list[int] = field(default_factory=lambda: [8, 16])


class DenseClip(nn.Module):
    """A training-free dense CLIP segmentor; ``mode`` picks the last-block variant."""

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(
        self,
        clip: ClipEncoder,
        settings: DenseClipConfig,
        inference: InferenceConfig,
        pamr: PamrConfig,
        templates: list[str],
        dino: nn.Module | None = None,
        text_cache_dir: str | None = None,
        sam: SamEncoder | None = None,
        refine: RefineConfig | None = None,
    ):
        super().__init__()
        if settings.mode not in LAST_BLOCK_VARIANTS:
            raise ConfigError(
                f"model.dense_clip.mode: unknown mode {settings.mode!r}; one of "
                f"{tuple(LAST_BLOCK_VARIANTS)}"
            )
        if settings.mode == "proxy" and dino is None:
            raise ConfigError("model.dense_clip.mode 'proxy' needs a DINO encoder (model.dino)")
        self.clip = clip
        self.dino = dino
        self.settings = settings
        self.inference = inference
        self.pamr = PAMR(pamr.steps, tuple(pamr.dilations)) if pamr.steps > 0 else None
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)
        refine = refine or RefineConfig()
        check_refine_settings(refine)
        if refine.enabled and sam is None:
            raise ConfigError("model.refine.enabled needs a SAM encoder (model.sam)")
        # SAM refinement after the dense prediction (Trident's step 8), off by default
        self.sam = sam if refine.enabled else None
        self.refiner = SamRefiner(sam, refine) if refine.enabled else None

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    # ---- image -------------------------------------------------------------------------------
    def proxy_features(self, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Proxy tokens (B, N', C) of (B, 3, h, w) CLIP-normalised windows, and the proxy grid.

        ``self.dino`` is the proxy model (``model.dense_clip.proxy``): a DINO-family ViT, or
        SAM's image encoder (:class:`~ovseg.encoders.sam_proxy.SamProxy`, which stretches the
        window to its square input). The windows are re-normalised from the CLIP input's
        statistics to the proxy's, ProxyCLIP's way; with ``proxy_resize: crop`` they are then
        resized bilinearly to crop x crop (ProxyCLIP's MAE)."""
        x = self.dino.renormalize(windows, *self.clip.input_stats)
        if self.settings.proxy_resize == "crop":
            crop = self.inference.crop
            x = F.interpolate(x, size=(crop, crop), mode="bilinear", align_corners=False)
        features = self.dino(x)
        return features.tokens, tuple(features.grid)

    def window_features(self, windows: torch.Tensor) -> WindowFeatures:
        """(B, 3, h, w) CLIP-normalised windows -> their L2-normalised patch features: CLIP's
        last block as ``mode`` (:mod:`ovseg.layers.attention`), ln_post, proj."""
        settings = self.settings
        options: dict = {}
        if settings.mode == "naclip":
            options = {"sigma": settings.naclip_sigma}
        elif settings.mode == "proxy":
            proxy_tokens, proxy_grid = self.proxy_features(windows)
            options = {"proxy_tokens": proxy_tokens, "proxy_grid": proxy_grid,
                       "gamma": settings.proxy_gamma, "beta": settings.proxy_beta}
        variant = LAST_BLOCK_VARIANTS[settings.mode]
        tokens, grid = variant(self.clip(windows), self.clip, **options)
        patches = self.clip.project(tokens)[:, -grid[0] * grid[1]:]  # class token dropped
        return WindowFeatures(F.normalize(patches, dim=-1), tuple(grid))

    def window_cosine(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) CLIP-normalised windows -> (B, N_names, gh, gw) cosine on the patch grid."""
        return self.window_features(windows).cosine(text)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> DenseClipState:
        """Resize an (H, W, 3) uint8 RGB image by its short side and run CLIP (and DINO) over
        its sliding windows: all that does not depend on the vocabulary, kept per window batch
        for :meth:`predict`."""
        image = check_image(image, "DenseClip", self.max_image_pixels)
        inference = self.inference
        height, width = image.shape[:2]
        size = rescale_size(height, width, inference.short_side, inference.max_long_side,
                            min_side=self.clip.patch_size)
        x = self.clip.normalize(image_tensor(image, size, self.device))
        return DenseClipState(
            size=(int(height), int(width)), resized=tuple(size), windows=self.window_pass(x),
            guide=x if self.pamr is not None else None,
            # guess: SAM sees the image as it is (Trident rounds its sides to the CLIP patch)
            sam_features=self.refiner.image_features(image) if self.refiner else None,
        )

    def window_pass(self, x: torch.Tensor) -> list[tuple[WindowBatch | None, WindowFeatures]]:
        """CLIP features of the sliding windows of a (1, 3, h, w) normalised image, one entry
        per window batch; one (None, features) of the whole image when ``crop`` <= 0."""
        inference = self.inference
        if inference.crop <= 0:  # whole image: patch logits go straight to the input size
            return [(None, self.window_features(x))]
        batches = window_batches(
            x, crop=inference.crop, stride=inference.stride,
            window_batch=inference.window_batch, pad_multiple=inference.pad_multiple,
        )
        return [(batch, self.window_features(pixels)) for batch, pixels in batches]

    @staticmethod
    def stitched_cosine(windows, size: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
        """(N_names, h, w) name cosines of the resized image (``size``) from a
        :meth:`window_pass`: window cosines stitched, or the whole image's patch grid."""
        (first, features), *_ = windows
        if first is None:
            return features.cosine(text)[0]
        spliced = ((batch.boxes, batch.to_window(features.cosine(text)))
                   for batch, features in windows)
        return splice_windows(spliced, size)

    def dense_cosine(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) CLIP-normalised image -> (1, N_names, H, W) stitched window cosines."""
        return self.stitched_cosine(self.window_pass(x), tuple(x.shape[-2:]), text)[None]

    def class_probabilities(self, cosine: torch.Tensor, vocabulary) -> torch.Tensor:
        """(N_names, ...) cosines -> (C, ...) the returned scores: softmax over names, max over
        synonyms, renormalised to sum 1 with ``renormalize`` (NACLIP)."""
        return class_probabilities(cosine, vocabulary, self.settings.logit_scale,
                                   self.settings.renormalize)

    def decision_probabilities(self, cosine: torch.Tensor, vocabulary) -> torch.Tensor:
        """(N_names, ...) cosines -> (C, ...) the probabilities labels are decided on: as
        :meth:`class_probabilities` but never renormalised. NACLIP takes the argmax and applies
        ``prob_thd`` before it renormalises; renormalisation is for the returned scores only."""
        return class_probabilities(cosine, vocabulary, self.settings.logit_scale)

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities of a whole map -> (H, W) int64 labels; may zero small
        classes in place (``predict`` does the same a band at a time)."""
        if self.settings.area_thd > 0:
            suppress_small_classes(probs, self.settings.area_thd)
        return labels_from_probabilities(probs, self.settings.prob_thd)

    def _class_probabilities_in_bands(self, cosine, size, vocabulary) -> torch.Tensor:
        """(C, H, W) class probabilities of (N_names, h, w) cosines resized to ``size``, made a
        band of rows at a time as :class:`Prediction` makes them."""
        return Prediction(np.zeros(size, dtype=np.uint8), vocabulary.class_names, cosine,
                          partial(self.class_probabilities, vocabulary=vocabulary)).probabilities()

    @torch.inference_mode()
    def predict(
        self,
        image: np.ndarray | DenseClipState,
        vocabulary,
        classifier: torch.Tensor | None = None,
    ) -> Prediction:
        """Segment an image, or the :class:`DenseClipState` of one, into ``vocabulary``.

        Args:
            image: (H, W, 3) uint8 RGB, or ``encode(image)`` (then no encoder runs again).
            vocabulary: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list.
            classifier: (N_names, E) L2-normalised text embeddings of the vocabulary's names,
                precomputed; None = from the text encoder (cached per vocabulary).
        """
        state = image if isinstance(image, DenseClipState) else self.encode(image)
        vocabulary = as_vocabulary(vocabulary)
        text = self.text_classifier(vocabulary.names) if classifier is None else classifier
        scores = self.stitched_cosine(state.windows, state.resized, text)
        if self.pamr is not None:
            scores = self._refine(scores, state.guide, state.size)
        settings = self.settings
        to_probabilities = partial(self.class_probabilities, vocabulary=vocabulary)
        to_decision = partial(self.decision_probabilities, vocabulary=vocabulary)
        scores = scores.cpu()
        if settings.area_thd > 0:
            keep = self._small_class_filter(scores, state.size, to_decision,
                                            vocabulary.num_classes)
            to_probabilities = _times(to_probabilities, keep)
            to_decision = _times(to_decision, keep)
        labels = labels_in_bands(
            scores, state.size,
            lambda band: labels_from_probabilities(to_decision(band), settings.prob_thd),
            num_classes=len(vocabulary.class_names),
        )
        prediction = Prediction(labels.numpy(), vocabulary.class_names, scores, to_probabilities)
        if self.refiner is not None:
            prediction = self.refiner(prediction, state.sam_features, state.size)
        return prediction

    def _small_class_filter(self, scores, size, to_probabilities, num_classes) -> torch.Tensor:
        """SCLIP's area rule: (C, 1, 1) 0 for the classes to zero, else 1; it needs the argmax
        areas of the whole image first (counted a band at a time)."""
        counts = torch.zeros(num_classes, dtype=torch.int64)
        for _, band in score_bands(scores, size):
            argmax = argmax_classes(to_probabilities(band)).flatten().cpu()
            counts += torch.bincount(argmax, minlength=num_classes)
        return small_class_mask(counts, self.settings.area_thd).view(-1, 1, 1)

    def _refine(self, cosine: torch.Tensor, x: torch.Tensor, size) -> torch.Tensor:
        # guess: NACLIP refines at the original size with the normalised image resized to it
        # (PAMR works on the full-resolution map: this mode's memory grows with H x W x names)
        cosine = F.interpolate(cosine[None], size=size, mode="bilinear", align_corners=False)
        guide = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.pamr(guide, cosine)[0]


def _times(to_probabilities, keep: torch.Tensor):
    """``to_probabilities`` with each class multiplied by ``keep`` (C, 1, 1)."""
    return lambda band: to_probabilities(band) * keep.to(band.device, band.dtype)


@dataclass
class WindowFeatures:
    """Dense CLIP features of a batch of windows: (B, N, D) L2-normalised patch features on the
    (h, w) patch grid (N = h * w)."""

    features: torch.Tensor
    grid: tuple[int, int]

    def cosine(self, text: torch.Tensor) -> torch.Tensor:
        """(B, N_names, h, w) float32 cosines with an (N_names, D) normalised text classifier."""
        cosine = self.features @ text.to(self.features.dtype).T
        return cosine.transpose(1, 2).reshape(self.features.shape[0], -1, *self.grid).float()


@dataclass
class DenseClipState(ImageState):
    """What :meth:`DenseClip.encode` keeps of an image.

    resized: (h, w) of the resized image; windows: (where the batch lies, its features) per
        window batch, or one (None, features of the whole image) without windows;
    guide: (1, 3, h, w) the CLIP-normalised resized image, PAMR's guide (None without PAMR);
    sam_features: SAM features of the image for the refinement (None when it is off).
    """

    resized: tuple[int, int] = (0, 0)
    windows: list[tuple[WindowBatch | None, WindowFeatures]] = field(default_factory=list)
    guide: torch.Tensor | None = None
    sam_features: SamFeatures | None = None


def dense_clip_encoders(cfg) -> tuple[str, ...]:
    """The encoders :func:`build_dense_clip` builds for ``cfg``: CLIP; the proxy's DINO (or
    SAM); SAM for the refinement."""
    model_cfg = cfg.model
    proxy = model_cfg.dense_clip.proxy if model_cfg.dense_clip.mode == "proxy" else None
    sam = model_cfg.refine.enabled or proxy == "sam"
    return ("clip",) + (("dino",) if proxy == "dino" else ()) + (("sam",) if sam else ())


def build_dense_clip(cfg) -> DenseClip:
    """Build :class:`DenseClip` from a full config (``cfg.model``, ``cfg.text``)."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    mode = model_cfg.dense_clip.mode
    refine = settings_from_config(model_cfg.refine, RefineConfig)
    sam_proxy = mode == "proxy" and model_cfg.dense_clip.proxy == "sam"
    # one SAM serves as the proxy and for the refinement when both want it
    sam = sam_from_config(model_cfg, device) if refine.enabled or sam_proxy else None
    return DenseClip(
        clip_from_config(model_cfg, device),
        settings_from_config(model_cfg.dense_clip, DenseClipConfig),
        settings_from_config(model_cfg.inference, InferenceConfig),
        settings_from_config(model_cfg.pamr, PamrConfig),
        get_templates(cfg.text.templates),
        dino=proxy_from_config(model_cfg, device, sam) if mode == "proxy" else None,
        text_cache_dir=cfg.text.cache_dir or None,
        sam=sam if refine.enabled else None,
        refine=refine,
    )


PROXY_MODELS = ("dino", "sam")
PROXY_RESIZES = ("none", "crop")


def proxy_from_config(
    model_cfg, device: torch.device, sam: SamEncoder | None = None
) -> nn.Module:
    """ProxyCLIP's proxy model of ``cfg.model.dense_clip.proxy``: the DINO-family encoder of
    ``model.dino``, or SAM's image encoder of ``model.sam`` (``sam`` when already built) as a
    :class:`~ovseg.encoders.sam_proxy.SamProxy`."""
    settings = model_cfg.dense_clip
    if settings.proxy not in PROXY_MODELS:
        raise ConfigError(f"model.dense_clip.proxy: unknown proxy model {settings.proxy!r}; "
                          f"one of {', '.join(PROXY_MODELS)}")
    if settings.proxy_resize not in PROXY_RESIZES:
        raise ConfigError(f"model.dense_clip.proxy_resize: unknown value "
                          f"{settings.proxy_resize!r}; one of {', '.join(PROXY_RESIZES)}")
    if settings.proxy_resize == "crop" and model_cfg.inference.crop <= 0:
        raise ConfigError("model.dense_clip.proxy_resize 'crop' needs sliding windows "
                          "(model.inference.crop > 0)")
    if settings.proxy == "dino":
        return dino_from_config(model_cfg, device)
    if "sam" not in model_cfg:
        raise ConfigError("model.dense_clip.proxy 'sam' needs a model.sam section, which this "
                          "config does not have")
    from ovseg.encoders.sam_proxy import SamProxy

    return SamProxy(sam if sam is not None else sam_from_config(model_cfg, device))
