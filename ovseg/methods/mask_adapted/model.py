"""Mask-adapted CLIP (OVSeg, specs/mask_adapted.md): proposals, masked-region CLIP, ensemble.

encode (vocabulary-free):
    resize by short side (test 512 / max 2048 for R101c, 640 / 2560 for Swin-B) ->
    proposal network (normalised with its own pixel mean/std, zero-padded to 32) -> per query a
    class embedding (Q, D) and mask logits at 1/4, upsampled bilinearly to the padded size,
    cropped, sigmoid -> mask probabilities (Q, h, w) at the resized image's resolution;
    masked regions: probability > threshold (strict), empty masks invalid (no CLIP), tight box,
    outside filled with CLIP's mean colour, CLIP-normalised, bicubic 224, ``crop_batch`` crops
    at a time through CLIP with mask prompt tuning -> region embeddings (V, D).
predict (per vocabulary):
    proposal logits = 100 cos(class embedding, [text..., no-object]); CLIP logits = 100
    cos(region, [text..., no-object]); ensemble p_prop^(1-lambda) p_clip^lambda (invalid
    queries: p_prop^(1-lambda)); semantic map = sum_q p(q, c) x mask prob (q, h, w), soft,
    bilinear to the image a band of rows at a time, argmax.

The trainable parts and their three training stages (``stage``: proposals | clip | prompts)
live in :mod:`ovseg.methods.mask_adapted.training`, imported by the hooks only when training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.config.schema import InferenceConfig
from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.weights import load_into, seeded_init
from ovseg.errors import ConfigError, WeightsError
from ovseg.io import load_state_dict_file, sha256_file
from ovseg.layers.labels import argmax_classes, max_over_synonyms
from ovseg.layers.mask_ensemble import clip_region_logits, ensemble_probabilities
from ovseg.layers.masked_crops import BLACK, CLIP_MEAN_COLOUR, masked_crop_batches
from ovseg.layers.resize import check_image, image_tensor, rescale_size
from ovseg.methods.base import ImageState, Prediction, labels_in_bands
from ovseg.methods.common import TextClassifiers, clip_from_config, settings_from_config
from ovseg.methods.device import resolve_device
from ovseg.modeling.mask_prompt_tuning import MaskPrompts
from ovseg.modeling.mask_proposal import (
    MaskProposalNetwork,
    build_r101c_proposal_network,
    build_swin_b_proposal_network,
    build_tiny_proposal_network,
    normalize_images,
)
from ovseg.modeling.mask_proposal.checkpoint import load_authors_checkpoint
from ovseg.modeling.mask_proposal.network import pad_to_multiple
from ovseg.text import as_vocabulary, get_templates

logger = logging.getLogger(__name__)

SECTION = "model.mask_adapted"
PROPOSAL_BUILDERS: dict[str, Callable[..., MaskProposalNetwork]] = {
    "tiny": build_tiny_proposal_network,
    "r101c": build_r101c_proposal_network,
    "swin_b": build_swin_b_proposal_network,
}
MASK_FILLS = {"mean": CLIP_MEAN_COLOUR, "zero": BLACK}
STAGES = ("proposals", "clip", "prompts")
# keys of OpenAI's CLIP files that are metadata, not weights
_CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_MASK_EMBEDDING = "visual.mask_embedding"


@dataclass
class MaskAdaptedConfig:
    """``cfg.model.mask_adapted``: proposals, masked-region classification, ensemble, training.

    The test resize is ``model.inference.short_side`` / ``max_long_side`` (the whole resized
    image is one input: ``model.inference.crop`` 0); CLIP is ``model.clip``.
    """

    proposal_backbone: str = "r101c"  # tiny (tests) | r101c (+ ViT-B/16) | swin_b (+ ViT-L/14)
    num_queries: int = 100
    proposal_dropout: float = 0.1  # the transformer decoder's dropout (training only)
    # the authors' released file (ovseg_R101c_vitB16_ft_mpt.pth / ovseg_swinbase_vitL14_ft_mpt
    # .pth): proposal network, no-object embedding, fine-tuned CLIP and its mask prompts;
    # "" = random proposals and model.clip as it is (then model.weights may hold ours)
    checkpoint: str = ""
    # our trained weights loaded at build, after ``checkpoint``: a training checkpoint's
    # .safetensors of any stage (any subset of this model's keys; an unknown key is an error),
    # e.g. stage b's fine-tuned CLIP for stage c, or trained proposals for the demo
    trained_weights: str = ""
    mask_threshold: float = 0.5  # MASK_THR: in a mask when probability > this (0.4 Swin-B)
    clip_ensemble_weight: float = 0.7  # lambda (CLIP_ENSEMBLE_WEIGHT); <= 0: CLIP only
    crop_batch: int = 32  # masked crops thresholded and run through CLIP at a time
    mask_fill: str = "mean"  # MASK_FILL: mean (CLIP's mean colour) | zero (black)
    mask_prompt_fwd: bool = True  # MASK_PROMPT_FWD: mask prompt tuning at inference
    mask_prompt_depth: int = 3
    # ---- training (ovseg.methods.mask_adapted.training); never read at inference ----------
    stage: str = "proposals"  # proposals (a) | clip (b: image encoder) | prompts (c: MPT)
    backbone_lr_multiplier: float = 0.1  # stage a: backbone lr factor (R101c 0.1, Swin-B 1.0)
    # stage a: the short side is drawn from these before the dataloader.crop_size crop;
    # [] = no resize
    train_short_sides: list[int] = field(default_factory=list)
    flip: bool = True  # stage a: horizontal flip, p 0.5
    color_jitter: bool = True  # stage a: SSD colour jitter
    # stages b, c: the region/noun pairs file (tools/mine_region_nouns.py: pairs.jsonl)
    region_pairs: str = ""
    region_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    prompt_init_std: float = 0.02  # stage c: initial mask prompts ~ N(0, std)


class MaskAdapted(nn.Module):
    """Mask-adapted CLIP: a proposal network, a CLIP with mask prompts, their ensemble.

    Args:
        clip: the CLIP (ViT-B/16 OpenAI for R101c, ViT-L/14 for Swin-B); frozen except in
            training stage ``clip``.
        proposals: the mask proposal network (its class embeddings in CLIP's joint space).
        settings: ``model.mask_adapted``.
        inference: the test resize (``model.inference``).
        templates: prompt templates of the class names (ViLD's 14 in the released configs).
        text_cache_dir: on-disk text-classifier cache (None = the default).
    """

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(self, clip: ClipEncoder, proposals: MaskProposalNetwork,
                 settings: MaskAdaptedConfig, inference: InferenceConfig, templates: list[str],
                 text_cache_dir: str | None = None):
        super().__init__()
        _check_settings(settings)
        self.clip = clip
        self.settings = settings
        self.inference = inference
        device = clip.mean.device
        self.proposals = proposals.to(device)
        init_std = settings.prompt_init_std if settings.stage == "prompts" else 0.0
        with seeded_init():
            prompts = MaskPrompts.for_encoder(clip, settings.mask_prompt_depth, init_std)
        self.prompts = prompts.to(device)
        if settings.checkpoint:
            self.load_authors_checkpoint(settings.checkpoint)
        if settings.trained_weights:
            self.load_trained_weights(settings.trained_weights)
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)
        # stage proposals: (K, D) text embeddings of the training classes (train_dataset)
        self.train_text_embeddings: Tensor | None = None
        self.set_stage(settings.stage)

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    @property
    def fill(self) -> tuple[float, float, float]:
        return MASK_FILLS[self.settings.mask_fill]

    # ---- weights -----------------------------------------------------------------------------
    def load_authors_checkpoint(self, path: str) -> None:
        """Load a released OVSeg file: the proposal network (strictly, through
        :mod:`ovseg.modeling.mask_proposal.checkpoint`), the fine-tuned CLIP and its mask
        prompts (``visual.mask_embedding``; zeros when the file has none)."""
        split = load_authors_checkpoint(self.proposals, path)
        clip_state = dict(split.clip)
        prompts = clip_state.pop(_MASK_EMBEDDING, None)
        for key in _CLIP_METADATA_KEYS:
            clip_state.pop(key, None)
        if prompts is not None:
            expected = tuple(self.prompts.mask_embedding.shape)
            if tuple(prompts.shape) != expected:
                raise WeightsError(
                    f"weights {path}: {AUTHORS_MASK_EMBEDDING} has shape {tuple(prompts.shape)}, "
                    f"this CLIP's mask prompts are {expected} (depth x patches x width); check "
                    f"model.clip.arch and {SECTION}.mask_prompt_depth")
            with torch.no_grad():
                self.prompts.mask_embedding.copy_(prompts)
        if clip_state:
            dtype = self.clip.model.visual.conv1.weight.dtype
            load_into(self.clip.model, clip_state, source=path,
                      expected=f"the fine-tuned {self.clip.name.split('|')[0]} CLIP of an OVSeg "
                      "checkpoint (clip_adapter.clip_model.*)")
            self.clip.model.visual.to(dtype)
            # the text tower may differ from model.clip's: another text-classifier cache key
            self.clip.name = f"{self.clip.name}|ovseg:{sha256_file(path)[:16]}"
        logger.info("loaded the OVSeg checkpoint %s (%d proposal tensors, %d CLIP tensors%s)",
                    path, len(split.proposal), len(clip_state),
                    ", mask prompts" if prompts is not None else "")

    def load_trained_weights(self, path: str) -> None:
        """Load our weights file (any subset of this model's state dict keys)."""
        state = load_state_dict_file(path)
        own = self.state_dict()
        unknown = sorted(k for k in state if k not in own)
        wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
        if unknown or wrong:
            raise WeightsError(
                f"{SECTION}.trained_weights {path} does not fit this model: unknown keys "
                f"{unknown[:10]}, wrong shapes {wrong[:10]}; expected an ovseg mask_adapted "
                "checkpoint (.safetensors) of the same backbone and CLIP")
        self.load_state_dict(state, strict=False)

    def set_stage(self, stage: str) -> None:
        """Make the parameters of training stage ``stage`` the trainable ones (requires_grad),
        so checkpoints store exactly them: proposals -> the proposal network; clip -> CLIP's
        image tower; prompts -> the mask prompts."""
        if stage not in STAGES:
            raise ConfigError(f"{SECTION}.stage: unknown stage {stage!r}; one of {STAGES}")
        self.stage = stage
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)

    # ---- training hooks (ovseg.methods.mask_adapted.training) ------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        from ovseg.methods.mask_adapted.training import stage_parameters

        return stage_parameters(self, self.stage)

    def loss(self, batch):
        from ovseg.methods.mask_adapted.training import stage_loss

        return stage_loss(self, batch)

    def train_dataset(self, cfg):
        from ovseg.methods.mask_adapted.training import build_train_dataset

        return build_train_dataset(self, cfg)

    def optimizer_param_groups(self, solver):
        from ovseg.methods.mask_adapted.training import param_groups

        return param_groups(self, solver)

    # ---- the steps ---------------------------------------------------------------------------
    def propose(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Proposals of one resized image.

        Args:
            image: (1, 3, h, w) RGB on 0..255 (the resized test image).

        Returns:
            class_embeddings: (Q, D) float32, the queries' class embeddings (vocabulary-free;
                :meth:`MaskProposalNetwork.classify` turns them into logits).
            mask_probs: (Q, h, w) float32 sigmoid mask probabilities at the image's size:
                logits at 1/4 upsampled bilinearly to the padded size, cropped, sigmoid, as
                :meth:`MaskProposalNetwork.inference` does; ``crop_batch`` queries at a time.
        """
        net = self.proposals
        height, width = image.shape[-2:]
        padded = pad_to_multiple(normalize_images(image), net.size_divisibility)
        features = net.backbone(padded)
        mask_features = net.pixel_decoder(features)
        queries = net.predictor.decode(features["res5"])[-1:]
        class_embeddings, mask_logits = net.predictor.heads(queries, mask_features)
        mask_logits = mask_logits[-1, 0]
        mask_probs = torch.empty((mask_logits.shape[0], height, width), dtype=torch.float32,
                                 device=mask_logits.device)
        step = self.settings.crop_batch
        for start in range(0, mask_logits.shape[0], step):
            chunk = F.interpolate(mask_logits[None, start:start + step].float(),
                                  size=padded.shape[-2:], mode="bilinear", align_corners=False)
            mask_probs[start:start + step] = chunk[0, :, :height, :width].sigmoid()
        return class_embeddings[-1, 0].float(), mask_probs

    def embed_regions(self, images: Tensor, masks: Tensor) -> Tensor:
        """(B, D) float32 CLIP embeddings of (B, 3, 224, 224) CLIP-normalised masked crops and
        their (B, 224, 224) binary masks; mask prompts inserted when ``mask_prompt_fwd``."""
        if self.settings.mask_prompt_fwd:
            return self.prompts(self.clip, images, masks).float()
        return self.clip.encode_image(images).float()

    def region_embeddings(self, image: Tensor, mask_probs: Tensor) -> tuple[Tensor, Tensor]:
        """CLIP embeddings of the valid queries' masked regions, ``crop_batch`` at a time.

        Args:
            image: (3, h, w) RGB on 0..255, not normalised.
            mask_probs: (Q, h, w) mask probabilities at that size.

        Returns:
            (V, D) float32 embeddings in query order, and (Q,) bool: which queries are valid
            (their binary mask is not empty); V may be 0.
        """
        settings = self.settings
        valid = torch.zeros(mask_probs.shape[0], dtype=torch.bool, device=image.device)
        embeddings = []
        for crops in masked_crop_batches(image, mask_probs, threshold=settings.mask_threshold,
                                         crop_batch=settings.crop_batch, fill=self.fill):
            embeddings.append(self.embed_regions(crops.images, crops.masks))
            valid[crops.queries] = True
        if not embeddings:
            return torch.zeros((0, self.clip.embed_dim), device=image.device), valid
        return torch.cat(embeddings), valid

    # ---- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> MaskAdaptedState:
        """Everything of an (H, W, 3) uint8 RGB image that does not depend on the vocabulary:
        proposals and the CLIP embeddings of their masked regions."""
        image = check_image(image, "MaskAdapted", self.max_image_pixels)
        height, width = image.shape[:2]
        inference = self.inference
        size = rescale_size(height, width, inference.short_side, inference.max_long_side)
        resized = image_tensor(image, size, self.device)
        class_embeddings, mask_probs = self.propose(resized)
        regions, valid = self.region_embeddings(resized[0], mask_probs)
        return MaskAdaptedState(size=(int(height), int(width)), resized=tuple(size),
                                mask_probs=mask_probs.cpu(), class_embeddings=class_embeddings,
                                region_embeddings=regions, valid=valid)

    @torch.inference_mode()
    def predict(self, image: np.ndarray | MaskAdaptedState, vocabulary,
                classifier: Tensor | None = None) -> Prediction:
        """Segment an image, or the :class:`MaskAdaptedState` of one, into ``vocabulary``.

        Args:
            image: (H, W, 3) uint8 RGB, or ``encode(image)`` (then no network runs again).
            vocabulary: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list.
            classifier: (N_names, D) L2-normalised text embeddings of the vocabulary's names;
                None = from the text encoder (cached per vocabulary).

        Returns:
            a :class:`Prediction` whose scores are the (Q', h, w) mask probabilities of the
            resized image (Q' = Q, or the valid queries when lambda <= 0) and whose
            ``to_probabilities`` applies the (Q', N_names) ensemble probabilities to a band of
            them (then the max over each class's names): the soft-mask semantic map.
        """
        state = image if isinstance(image, MaskAdaptedState) else self.encode(image)
        vocabulary = as_vocabulary(vocabulary)
        text = self.text_classifier(vocabulary.names) if classifier is None else classifier
        probabilities, queries = self.query_probabilities(state, text.to(self.device))
        scores = state.mask_probs[queries.cpu()]
        probabilities = probabilities.cpu()
        if scores.shape[0] == 0:  # lambda <= 0 and no valid query: an all-zero map
            scores = torch.zeros((1, *state.resized))
            probabilities = torch.zeros((1, len(vocabulary.names)))
        to_probabilities = SoftMaskMap(probabilities, vocabulary.name_to_class,
                                       vocabulary.num_classes)
        labels = labels_in_bands(scores, state.size, to_probabilities.labels,
                                 num_classes=len(vocabulary.class_names))
        return Prediction(labels.numpy(), vocabulary.class_names, scores, to_probabilities)

    def query_probabilities(self, state: MaskAdaptedState, text: Tensor) -> tuple[Tensor, Tensor]:
        """(Q', N_names) ensemble probabilities and the (Q,) bool queries they belong to
        (:func:`ovseg.layers.mask_ensemble.ensemble_probabilities`)."""
        no_object = self.proposals.no_object_embedding
        proposal_logits = self.proposals.classify(state.class_embeddings.to(self.device), text)
        clip_logits = clip_region_logits(state.region_embeddings.to(self.device), text,
                                         no_object)
        return ensemble_probabilities(proposal_logits, clip_logits,
                                      state.valid.to(self.device),
                                      self.settings.clip_ensemble_weight)


AUTHORS_MASK_EMBEDDING = f"clip_adapter.clip_model.{_MASK_EMBEDDING}"


class SoftMaskMap:
    """``to_probabilities`` of a :class:`Prediction`: a (Q', rows, W) band of mask
    probabilities -> (C, rows, W) = max over each class's names of sum_q p(q, name) x mask."""

    def __init__(self, probabilities: Tensor, name_to_class: Tensor, num_classes: int):
        self.probabilities = probabilities.float()
        self.name_to_class = name_to_class
        self.num_classes = num_classes

    def __call__(self, band: Tensor) -> Tensor:
        names = torch.einsum("qk,qhw->khw", self.probabilities.to(band.device), band.float())
        return max_over_synonyms(names, self.name_to_class.to(band.device), self.num_classes)

    def labels(self, band: Tensor) -> Tensor:
        return argmax_classes(self(band))


@dataclass
class MaskAdaptedState(ImageState):
    """What :meth:`MaskAdapted.encode` keeps of an image.

    resized: (h, w) of the resized image the proposals and crops were made at.
    mask_probs: (Q, h, w) float32 sigmoid mask probabilities, on the CPU.
    class_embeddings: (Q, D) float32 proposal class embeddings (not normalised).
    region_embeddings: (V, D) float32 CLIP embeddings of the valid queries' regions.
    valid: (Q,) bool, the queries whose binary mask is not empty (V of them).
    """

    resized: tuple[int, int] = (0, 0)
    mask_probs: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))
    class_embeddings: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    region_embeddings: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    valid: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


def _check_settings(settings: MaskAdaptedConfig) -> None:
    if settings.proposal_backbone not in PROPOSAL_BUILDERS:
        raise ConfigError(f"{SECTION}.proposal_backbone: unknown backbone "
                          f"{settings.proposal_backbone!r}; one of {sorted(PROPOSAL_BUILDERS)}")
    if settings.mask_fill not in MASK_FILLS:
        raise ConfigError(f"{SECTION}.mask_fill: unknown fill {settings.mask_fill!r}; one of "
                          f"{sorted(MASK_FILLS)}")
    if settings.crop_batch < 1:
        raise ConfigError(f"{SECTION}.crop_batch must be >= 1, got {settings.crop_batch}")
    if settings.num_queries < 1:
        raise ConfigError(f"{SECTION}.num_queries must be >= 1, got {settings.num_queries}")
    if settings.stage not in STAGES:
        raise ConfigError(f"{SECTION}.stage: unknown stage {settings.stage!r}; one of {STAGES}")
    if settings.checkpoint and not Path(settings.checkpoint).expanduser().is_file():
        raise WeightsError(
            f"{SECTION}.checkpoint {settings.checkpoint} does not exist; download the authors' "
            "ovseg_R101c_vitB16_ft_mpt.pth or ovseg_swinbase_vitL14_ft_mpt.pth "
            "(facebookresearch/ov-seg) or leave it empty")


def build_proposal_network(settings: MaskAdaptedConfig, embed_dim: int,
                           text_width: int) -> MaskProposalNetwork:
    """The proposal network of ``settings.proposal_backbone`` for a CLIP of joint width
    ``embed_dim`` (seeded: an untrained network is the same every build)."""
    builder = PROPOSAL_BUILDERS[settings.proposal_backbone]
    with seeded_init():
        return builder(embed_dim=embed_dim, num_queries=settings.num_queries,
                       dropout=settings.proposal_dropout, text_width=text_width)


def build_mask_adapted(cfg) -> MaskAdapted:
    """Build :class:`MaskAdapted` from a full config (``cfg.model``, ``cfg.text``), in eval
    mode."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    settings = settings_from_config(model_cfg.mask_adapted, MaskAdaptedConfig)
    _check_settings(settings)
    clip = clip_from_config(model_cfg, device)
    text_width = int(clip.model.ln_final.weight.shape[0])
    proposals = build_proposal_network(settings, clip.embed_dim, text_width)
    model = MaskAdapted(clip, proposals, settings,
                        settings_from_config(model_cfg.inference, InferenceConfig),
                        get_templates(cfg.text.templates),
                        text_cache_dir=cfg.text.cache_dir or None)
    return model.eval()
