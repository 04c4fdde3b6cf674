"""CLOC: promptable region embeddings from CLIP's ViT tokens (specs/cloc.md).

    image (H, W, 3) -> resize the long side to ``image_size``, pad bottom/right to a square
    -> CLIP's image tower up to the end of its last block: f_I' (1 + N, W), before ln_post/proj
    -> Prompter(prompt tokens, f_I') -> region embeddings (R, D), L2-normalised
    region recognition: argmax cosine with the class names' text embeddings (no templates)

Beyond the paper [ours]: point prompts, a promptable dense map (a point prompt at every patch,
:meth:`Cloc.predict`) and a zero-shot baseline, RoIAlign-pooled dense CLIP features of any
training-free last-block mode inside the box (``region_extractor: roi_align``).

Training (``ovseg.methods.cloc.training``) and region evaluation (``ovseg.methods.cloc.
evaluation``) are imported by the hooks below only when used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.weights import seeded_init
from ovseg.errors import ConfigError
from ovseg.layers.attention import LAST_BLOCK_VARIANTS, vanilla_last_block
from ovseg.layers.labels import argmax_classes, class_probabilities
from ovseg.layers.resize import check_image, image_tensor
from ovseg.methods.base import ImageState, Prediction, labels_in_bands
from ovseg.methods.common import clip_from_config, settings_from_config
from ovseg.methods.device import resolve_device
from ovseg.modeling.prompter import (
    POOLING_SCOPES,
    Prompter,
    PrompterConfig,
    PromptError,
    normalize_boxes,
    normalize_points,
)
from ovseg.text import as_vocabulary

logger = logging.getLogger(__name__)

SECTION = "model.cloc"
REGION_EXTRACTORS = ("prompter", "roi_align")
# the training-free last-block modes the RoIAlign baseline can pool (proxy needs a DINO model)
BASELINE_MODES = ("vanilla", "maskclip", "sclip", "naclip")
REGION_TASKS = ("recognition", "retrieval")


@dataclass
class RegionSetConfig:
    """A COCO-format region file registered by name (``datasets.train`` / ``datasets.test``).

    annotations: the COCO JSON (boxes; ``caption`` per annotation or its category name);
    image_dir: where its images' ``file_name`` (or the tail of ``coco_url``, LVIS) lie;
    captions: an optional COCO captions JSON of the same images ("" = none, or the images'
    own ``caption`` field); task: ``recognition`` (mAcc over categories) or ``retrieval``
    (recall@k between regions and their captions). Relative paths are under datasets.root.
    """

    name: str = ""
    annotations: str = ""
    image_dir: str = ""
    captions: str = ""
    task: str = "recognition"


@dataclass
class ClocConfig:
    """``cfg.model.cloc``: the Prompter, the region extractor, the losses and the region sets.
    [paper] marks the paper's values; every other field is ours (spec "[ours]")."""

    image_size: int = 224  # [paper] B/16 at 224 (L/14, H/14 at 336): long side, then padded
    pooling: str = "all"  # ours (unverified in the paper): average "all" tokens or "prompt" only
    mlp_ratio: float = 4.0  # ours: the Prompter layer's FFN width / W
    pe_temperature: float = 10000.0  # ours: the sinusoidal encoding's frequency base
    box_head_hidden: int = 0  # ours: the box head's hidden width; 0 = the embedding dim
    # ours: "prompter" (the trained Prompter) or "roi_align" (the zero-shot baseline)
    region_extractor: str = "prompter"
    baseline_mode: str = "maskclip"  # ours: the baseline's dense CLIP mode (dense_clip.md)
    roi_output_size: int = 7  # ours: RoIAlign bins per side, then averaged
    prompt_batch: int = 256  # ours: prompts per Prompter pass (bounds memory)
    dense_logit_scale: float = 100.0  # ours: softmax(scale * cos) of the dense map
    # ---- training (ovseg.methods.cloc.training) ------------------------------------------------
    train_encoders: bool = False  # ours: fine-tune CLIP too (the paper trains from scratch)
    regions_per_image: int = 4  # [paper] M, regions sampled per image
    negative_text_threshold: float = 0.9  # [paper] drop negatives whose captions' cosine > this
    region_loss_weight: float = 1.0  # [paper] lambda = this x the fraction with region text
    share_temperature: bool = True  # ours (unverified): L_CLOC uses L_CLIP's temperature
    init_temperature: float = 0.07  # ours: CLIP's initial tau
    grounding_squared: bool = True  # ours (unverified): the grounding L2 is squared
    region_text: str = "caption"  # ours: "caption" (category name where absent) | "category"
    region_sets: list[RegionSetConfig] = field(default_factory=list)


class Cloc(nn.Module):
    """CLOC: a CLIP and a Prompter (specs/cloc.md).

    Args:
        clip: the CLIP encoder (frozen unless ``train_encoders``).
        settings: ``model.cloc``.
        text_cache_dir: unused (class names are encoded without templates, kept in memory).
    """

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(self, clip: ClipEncoder, settings: ClocConfig):
        super().__init__()
        check_settings(settings, clip.patch_size)
        self.clip = clip
        self.settings = settings
        with seeded_init():  # an untrained Prompter is the same every build
            self.prompter = Prompter(PrompterConfig(
                width=clip.width, embed_dim=clip.embed_dim, mlp_ratio=settings.mlp_ratio,
                pooling=settings.pooling, pe_temperature=settings.pe_temperature,
                box_head_hidden=settings.box_head_hidden))
            # log(1 / tau), CLIP's parametrisation; the region one is used unless shared
            scale = math.log(1.0 / settings.init_temperature)
            self.logit_scale = nn.Parameter(torch.tensor(scale))
            self.region_logit_scale = nn.Parameter(torch.tensor(scale))
        self.prompter.to(self.device)
        self.logit_scale.data = self.logit_scale.data.to(self.device)
        self.region_logit_scale.data = self.region_logit_scale.data.to(self.device)
        self._class_text: dict[tuple[str, ...], Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    # ---- training hooks (ovseg.methods.cloc.training) ----------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        # both temperatures, so that every checkpoint has the same keys (a shared run leaves
        # the region one unused, at its initial value)
        params = [*self.prompter.parameters(), self.logit_scale, self.region_logit_scale]
        if self.settings.train_encoders:
            params += list(self.clip.model.parameters())
        return params

    def loss(self, batch):
        from ovseg.methods.cloc.training import cloc_loss

        return cloc_loss(self, batch)

    def train_dataset(self, cfg):
        from ovseg.methods.cloc.training import build_train_dataset

        return build_train_dataset(self, cfg)

    def collate(self, samples):
        from ovseg.methods.cloc.training import collate

        return collate(samples)

    def evaluate_benchmark(self, name: str, cfg, output_dir):
        """Region recognition or retrieval on the region set ``name`` (the engine's hook)."""
        from ovseg.methods.cloc.evaluation import evaluate_region_set

        return evaluate_region_set(self, name, cfg, output_dir)

    # ---- image -------------------------------------------------------------------------------
    def image_input(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> (1, 3, S, S) CLIP-normalised input (long side resized to
        S = ``image_size``, zero-padded at the bottom and right after normalisation) and the
        resized (h, w)."""
        image = check_image(image, "Cloc", self.max_image_pixels)
        side = self.settings.image_size
        height, width = image.shape[:2]
        scale = side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = self.clip.normalize(image_tensor(image, size, self.device))
        return F.pad(x, (0, side - size[1], 0, side - size[0])), size

    def image_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) CLIP-normalised inputs -> f_I' (B, 1 + N, W), the tokens after the last
        block before ln_post and proj, and the image embeddings (B, D) (CLIP's own pooling)."""
        out = self.clip(x)
        tokens, _ = vanilla_last_block(out, self.clip)
        return tokens, out.cls_token

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> ClocState:
        """Everything of an image that does not depend on the prompts or the vocabulary."""
        image = check_image(image, "Cloc", self.max_image_pixels)
        x, resized = self.image_input(image)
        tokens, embedding = self.image_tokens(x)
        side = self.settings.image_size // self.clip.patch_size
        return ClocState(size=(int(image.shape[0]), int(image.shape[1])), resized=resized,
                         tokens=tokens.float(), image_embedding=embedding.float(),
                         grid=(side, side), pixels=x)

    def dense_features(self, state: ClocState) -> Tensor:
        """(1, D, g, g) L2-normalised dense CLIP features of the padded input (``baseline_mode``
        last block, ln_post, proj), the RoIAlign baseline's map; computed once per state."""
        if state.dense is None:
            variant = LAST_BLOCK_VARIANTS[self.settings.baseline_mode]
            tokens, grid = variant(self.clip(state.pixels), self.clip)
            patches = self.clip.project(tokens)[:, -grid[0] * grid[1]:].float()
            patches = F.normalize(patches, dim=-1)
            state.dense = patches.transpose(1, 2).reshape(1, -1, *grid)
        return state.dense

    # ---- regions -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_regions(
        self,
        image: np.ndarray | ClocState,
        boxes=None,
        points=None,
        normalized: bool = False,
        extractor: str | None = None,
    ) -> Tensor:
        """L2-normalised region embeddings of box and/or point prompts of one image.

        Args:
            image: (H, W, 3) uint8 RGB, or ``encode(image)``.
            boxes: (R_b, 4) xyxy, pixels of the image (or [0, 1] of it when ``normalized``);
                boxes partly outside are clipped to the image.
            points: (R_p, 2) xy, pixels (or [0, 1]); each one prompt.
            extractor: "prompter" | "roi_align"; None = ``region_extractor``. The RoIAlign
                baseline takes boxes only.

        Returns:
            (R_b + R_p, D) float32 on the model's device, boxes first.

        Raises:
            PromptError: no prompt, a box outside the image or of zero area, a point outside.
        """
        state = image if isinstance(image, ClocState) else self.encode(image)
        extractor = extractor or self.settings.region_extractor
        if boxes is None and points is None:
            raise PromptError("no prompt given: pass boxes=(R, 4) and/or points=(R, 2)")
        parts = []
        if boxes is not None:
            norm_boxes = normalize_boxes(boxes, state.size, normalized).to(self.device)
            if extractor == "roi_align":
                parts.append(self.roi_align_regions(state, norm_boxes))
            else:
                parts.append(self.prompt_regions(state.tokens, self.prompter.box_tokens,
                                                 norm_boxes))
        if points is not None:
            if extractor == "roi_align":
                raise PromptError("the RoIAlign baseline takes box prompts only")
            norm_points = normalize_points(points, state.size, normalized).to(self.device)
            parts.append(self.prompt_regions(state.tokens, self.prompter.point_tokens,
                                             norm_points))
        return F.normalize(torch.cat(parts), dim=-1)

    def prompt_regions(self, tokens: Tensor, to_tokens, prompts: Tensor) -> Tensor:
        """(R, D) Prompter outputs for R prompts of one image's tokens (1, 1 + N, W), in
        chunks of ``prompt_batch``; ``to_tokens`` turns a chunk into prompt tokens."""
        step = self.settings.prompt_batch
        return torch.cat([self.prompter(to_tokens(prompts[i:i + step]), tokens)
                          for i in range(0, prompts.shape[0], step)])

    def roi_align_regions(self, state: ClocState, boxes: Tensor) -> Tensor:
        """The zero-shot baseline: (R, D) RoIAlign of the dense CLIP features in each box
        ((R, 4) normalised to the padded input)."""
        dense = self.dense_features(state)
        return roi_pool(dense, boxes * dense.shape[-1], self.settings.roi_output_size)

    def class_text(self, names: list[str]) -> Tensor:
        """(N_names, D) L2-normalised text embeddings of the names as they are (the paper uses
        no prompt templates), kept per name list."""
        key = tuple(names)
        if key not in self._class_text:
            self._class_text[key] = F.normalize(self.clip.encode_text(list(names)), dim=-1)
        return self._class_text[key]

    @torch.no_grad()
    def classify_regions(self, image, vocabulary, boxes=None, points=None,
                         normalized: bool = False) -> tuple[Tensor, Tensor]:
        """Region recognition: per prompt, the class whose name is most similar.

        Returns:
            (R,) int64 class indices into the vocabulary's classes and (R, C) float32 class
            cosines (max over each class's synonyms), both on the CPU.
        """
        vocabulary = as_vocabulary(vocabulary)
        regions = self.embed_regions(image, boxes=boxes, points=points, normalized=normalized)
        cosine = regions @ self.class_text(vocabulary.names).T.to(regions)
        index = vocabulary.name_to_class.to(cosine.device)
        per_class = torch.full((cosine.shape[0], vocabulary.num_classes), -2.0,
                               device=cosine.device)
        per_class = per_class.scatter_reduce(1, index.expand_as(cosine), cosine, "amax")
        return per_class.argmax(1).cpu(), per_class.cpu()

    # ---- dense map [ours] ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: np.ndarray | ClocState, vocabulary) -> Prediction:
        """A promptable dense map [ours]: a point prompt at the centre of every patch of the
        image, each classified like a region.

        Returns:
            a :class:`Prediction` whose scores are (C, h, w) class probabilities on the patch
            grid of the image (softmax of ``dense_logit_scale`` x cosine, max over synonyms).
        """
        state = image if isinstance(image, ClocState) else self.encode(image)
        vocabulary = as_vocabulary(vocabulary)
        patch = self.clip.patch_size
        rows = max(1, math.ceil(state.resized[0] / patch))
        cols = max(1, math.ceil(state.resized[1] / patch))
        side = self.settings.image_size
        ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * patch / side
        xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * patch / side
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1).to(self.device)
        regions = F.normalize(self.prompt_regions(state.tokens, self.prompter.point_tokens,
                                                  points), dim=-1)
        cosine = (regions @ self.class_text(vocabulary.names).T.to(regions)).T
        scores = class_probabilities(cosine.reshape(-1, rows, cols), vocabulary,
                                     self.settings.dense_logit_scale).float().cpu()
        labels = labels_in_bands(scores, state.size, argmax_classes,
                                 num_classes=len(vocabulary.class_names))
        return Prediction(labels.numpy(), vocabulary.class_names, scores, lambda band: band)


def roi_pool(features: Tensor, boxes: Tensor, output_size: int) -> Tensor:
    """RoIAlign-pooled features, one vector per box.

    Args:
        features: (1, D, h, w) a feature map.
        boxes: (R, 4) xyxy in the map's cell units (0 .. w, 0 .. h), pixel-edge convention
            (``aligned``: a box (0, 0, 2, 2) covers exactly cells [0, 2) x [0, 2)).
        output_size: bins per side, averaged.

    Returns:
        (R, D) float32, L2-normalised.
    """
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1).float()
    pooled = roi_align(features.float(), rois, output_size, spatial_scale=1.0,
                       sampling_ratio=2, aligned=True)
    return F.normalize(pooled.mean(dim=(2, 3)), dim=-1)


def check_settings(settings: ClocConfig, patch_size: int) -> None:
    """Raise a ConfigError naming the first bad field of ``model.cloc``."""
    if settings.image_size <= 0 or settings.image_size % patch_size:
        raise ConfigError(f"{SECTION}.image_size must be a positive multiple of the patch size "
                          f"{patch_size}, got {settings.image_size}")
    if settings.pooling not in POOLING_SCOPES:
        raise ConfigError(f"{SECTION}.pooling: one of {POOLING_SCOPES}, got {settings.pooling!r}")
    if settings.region_extractor not in REGION_EXTRACTORS:
        raise ConfigError(f"{SECTION}.region_extractor: one of {REGION_EXTRACTORS}, got "
                          f"{settings.region_extractor!r}")
    if settings.baseline_mode not in BASELINE_MODES:
        raise ConfigError(f"{SECTION}.baseline_mode: one of {BASELINE_MODES}, got "
                          f"{settings.baseline_mode!r}")
    if settings.region_text not in ("caption", "category"):
        raise ConfigError(f"{SECTION}.region_text: caption or category, got "
                          f"{settings.region_text!r}")
    for name in ("regions_per_image", "prompt_batch", "roi_output_size"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{SECTION}.{name} must be >= 1, got {getattr(settings, name)}")
    for entry in settings.region_sets:
        if entry.task not in REGION_TASKS:
            raise ConfigError(f"{SECTION}.region_sets {entry.name!r}: task one of "
                              f"{REGION_TASKS}, got {entry.task!r}")


@dataclass
class ClocState(ImageState):
    """What :meth:`Cloc.encode` keeps of an image.

    resized: (h, w) of the resized image inside the padded S x S input; tokens: (1, 1 + N, W)
    f_I'; image_embedding: (1, D) CLIP's pooled embedding; grid: (g, g) patch grid; pixels:
    (1, 3, S, S) the model input (for the baseline's dense map); dense: that map, once made.
    """

    resized: tuple[int, int] = (0, 0)
    tokens: Tensor | None = None
    image_embedding: Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    pixels: Tensor | None = None
    dense: Tensor | None = None


def build_cloc(cfg) -> Cloc:
    """Build :class:`Cloc` from a full config (``cfg.model.clip``, ``cfg.model.cloc``)."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    settings = settings_from_config(model_cfg.cloc, ClocConfig)
    settings.region_sets = [RegionSetConfig(**entry) if isinstance(entry, dict) else entry
                            for entry in settings.region_sets]
    clip = clip_from_config(model_cfg, device)
    if settings.train_encoders:
        clip.model.requires_grad_(True)
    return Cloc(clip, settings)
