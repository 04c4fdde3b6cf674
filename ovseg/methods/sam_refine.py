"""SAM refinement of a coarse dense prediction: Trident's step 8, after any 2D method.

specs/trident.md step 8. The coarse labels and class probabilities go to half resolution
(nearest / bilinear); pixels whose top probability is under ct are left out; every class whose
max probability reaches ct is refined, background included. Each 8-connected component of at
least ``min_component`` pixels prompts SAM with its box, one positive point at its highest
probability and the class's mask prompt, single-mask output; all components of a class go
through the decoder in one batched call (at most ``decoder_batch`` prompts a call). A mask
whose predicted IoU is above ``iou_thresh`` is accepted.

The merge is at full resolution, as the reference does it: each accepted mask's logits go to
SAM's image frame (segment_anything's ``postprocess_masks``), then bilinearly to the image size;
per class, the score is the max over its accepted masks of sigmoid(logit) x the class's
full-resolution probability, inside the union of those masks (logit > 0); a pixel inside any
union takes the argmax of these scores; every other pixel keeps its coarse label. The merge is
made a band of rows at a time, so memory stays bounded by the band whatever the image size.

Rejected components (the two ``compat`` rules):
- ``reference``: the authors' ``map_failed_regions`` compares after taking the maximum, so it
  never changes a label: a rejected component keeps its coarse label unless an accepted mask of
  another class covers it, and then that mask decides.
- ``fixed`` (default): the rule the reference meant: inside a rejected component of class c,
  where an accepted mask of another class covers a pixel, class c competes with its coarse
  probability (it wins where that is higher than the other classes' refined scores).
``reference`` also reproduces the authors' prompt frame (scaled from the half-resolution size,
not SAM's actual input size) and their unbatched mask prompt (specs/trident.md, known faults).

After refinement the prediction's scores are the ones its labels were taken from: the refined
class scores where a mask decided, the coarse probabilities elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.encoders.sam import SamEncoder, SamFeatures
from ovseg.errors import ConfigError
from ovseg.layers.chunked_resize import bilinear_matrix, chained_bilinear_rows
from ovseg.layers.components import connected_components
from ovseg.layers.labels import argmax_classes
from ovseg.layers.sam_prompts import (
    best_point,
    box_prompt,
    longest_side_shape,
    mask_prompt,
    point_prompt,
    prompt_scale,
)
from ovseg.methods.base import Prediction, band_rows_for

REFINE_COMPAT = ("fixed", "reference")


@dataclass
class RefineConfig:
    """``cfg.model.refine``: SAM refinement of any 2D method's labels (specs/trident.md step 8).

    Trident's configs turn it on with the per-benchmark ct; any other dense method may too.
    """

    enabled: bool = False  # the one switch
    coarse_thresh: float = 0.10  # ct: pixels and classes below it are not refined
    min_component: int = 225  # pixels (at half resolution) of the smallest refined component
    iou_thresh: float = 0.8  # accept SAM's mask when its predicted IoU is above this
    mask_prompt_scale: float = 0.005  # mask prompt = probability x this where probability > ct
    decoder_batch: int = 64  # prompts per SAM decoder call: bounds its memory, not the masks
    # "fixed": known faults corrected; "reference": the authors' prompt frame, unbatched mask
    # prompt and rejected-component rule (see the module docstring)
    compat: str = "fixed"


def check_refine_settings(settings: RefineConfig) -> None:
    """One-line ConfigErrors for refinement settings out of range."""
    if settings.compat not in REFINE_COMPAT:
        raise ConfigError(f"model.refine.compat: {settings.compat!r} is not one of {REFINE_COMPAT}")
    if settings.decoder_batch < 1:
        raise ConfigError(f"model.refine.decoder_batch: {settings.decoder_batch}; at least 1")
    if settings.min_component < 1:
        raise ConfigError(f"model.refine.min_component: {settings.min_component}; at least 1")
    if not 0.0 <= settings.coarse_thresh <= 1.0:
        raise ConfigError(
            f"model.refine.coarse_thresh: {settings.coarse_thresh}; a probability in [0, 1]"
        )


# ---- half resolution -------------------------------------------------------------------------
def nearest_index(out_size: int, in_size: int) -> torch.Tensor:
    """Source index of each output cell of a nearest resize: floor(i * in / out)."""
    return torch.arange(out_size) * in_size // out_size


def half_size(height: int, width: int) -> tuple[int, int]:
    """Step 8's working size: half of each side, at least 1."""
    # guess: half size floors, as scale_factor=0.5 does
    return max(height // 2, 1), max(width // 2, 1)


def half_resolution_bands(
    bands: Iterable[tuple[slice, torch.Tensor]], size: tuple[int, int]
) -> torch.Tensor:
    """Bilinear (align_corners=False) downsampling of a (C, H, W) map given a band of rows at a
    time to :func:`half_size`: (C, h, w) float32, without the whole map ever in memory.

    Columns go through ``F.interpolate`` per band; each half-size row is the weighted sum of
    its two source rows, added as their band arrives.
    """
    height, width = size
    out_h, out_w = half_size(height, width)
    weights = bilinear_matrix(out_h, height)  # (h, H): at most two non-zeros per row
    out: torch.Tensor | None = None
    for rows, band in bands:
        band = band.float()
        columns = F.interpolate(band[None], size=(band.shape[1], out_w), mode="bilinear",
                                align_corners=False)[0]  # (C, rows, w)
        if out is None:
            out = torch.zeros((band.shape[0], out_h, out_w), dtype=torch.float32)
        part = weights[:, rows]  # (h, rows)
        touched = part.abs().sum(dim=1).nonzero().flatten()
        out[:, touched] += torch.einsum("hr,crw->chw", part[touched], columns)
    assert out is not None
    return out


def half_resolution(
    labels: torch.Tensor, probs: torch.Tensor | Iterable[tuple[slice, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8's input: labels (nearest) and probabilities (bilinear) at half the size.

    Args:
        labels: (H, W) int64; probs: (C, H, W) float32, or its bands as (row slice, (C, rows,
            W)) pairs (:meth:`Prediction.bands`), so that the full map need not exist.

    Returns:
        (h, w) int64 and (C, h, w) float32, (h, w) = :func:`half_size`.
    """
    height, width = labels.shape
    if isinstance(probs, torch.Tensor):
        probs = [(slice(0, height), probs)]
    half_probs = half_resolution_bands(probs, (height, width))
    out_h, out_w = half_probs.shape[1:]
    rows, cols = nearest_index(out_h, height), nearest_index(out_w, width)
    return labels[rows[:, None], cols[None, :]], half_probs


# ---- SAM decoding ----------------------------------------------------------------------------
@dataclass
class ClassMasks:
    """What SAM answered for one class.

    index: the class; logits: (K, s, s) float32 low-resolution logits of its accepted masks
    (s = SAM's input side / 4); rejected: (h, w) bool, the pixels of its rejected components at
    half resolution (None when every component was accepted).
    """

    index: int
    logits: torch.Tensor
    rejected: torch.Tensor | None = None


def decode_class_masks(
    sam: SamEncoder,
    features: SamFeatures,
    labels: torch.Tensor,
    probs: torch.Tensor,
    settings: RefineConfig,
) -> list[ClassMasks]:
    """Prompt SAM with every large confident component of every refined class.

    Args:
        sam: decodes with ``predict_masks`` (B prompt sets a call).
        features: SAM features of the whole image, ``input_size`` set.
        labels: (h, w) int64 coarse labels; probs: (C, h, w) float32 class probabilities
            (both at half resolution).

    Returns:
        one :class:`ClassMasks` per class that had a component to refine, in class order.
    """
    height, width = labels.shape
    threshold = settings.coarse_thresh
    reference = settings.compat == "reference"
    # the reference scales prompts from the half-resolution size resized to SAM's long side
    frame = longest_side_shape(height, width, sam.img_size) if reference else features.input_size
    scale = prompt_scale((height, width), frame)
    confident = probs.amax(dim=0) >= threshold
    answers = []
    for index in range(probs.shape[0]):
        class_probs = probs[index]
        if float(class_probs.max()) < threshold:
            continue
        components = connected_components(((labels == index) & confident).numpy())
        large = [k for k in range(len(components)) if components.areas[k] >= settings.min_component]
        if not large:
            continue
        mask_input = mask_prompt(class_probs, frame, sam.img_size, threshold,
                                 settings.mask_prompt_scale)
        accepted: list[torch.Tensor] = []
        rejected = torch.zeros((height, width), dtype=torch.bool)
        for start in range(0, len(large), settings.decoder_batch):
            chunk = large[start:start + settings.decoder_batch]
            boxes, points = [], []
            for k in chunk:
                rows, cols = components.box_slices(k)
                inside = torch.from_numpy(components.mask_in_box(k))
                points.append(best_point(class_probs[rows, cols], inside, (cols.start, rows.start)))
                boxes.append(box_prompt(components.boxes[k], scale))
            coords = torch.cat([point_prompt(point, scale)[0] for point in points])
            point_labels = torch.ones((len(chunk), 1), dtype=torch.int64)
            # the reference passes the mask prompt unbatched, (1, s, s), shared by the batch
            masks_in = mask_input[0] if reference else mask_input.expand(len(chunk), -1, -1, -1)
            logits, iou = sam.predict_masks(features, coords, point_labels, torch.cat(boxes),
                                            masks_in, multimask_output=False)
            keep = (iou[:, 0].float() > settings.iou_thresh).cpu()
            accepted.append(logits[:, 0].float().cpu()[keep])
            for k, kept in zip(chunk, keep.tolist(), strict=True):
                if not kept:
                    rows, cols = components.box_slices(k)
                    rejected[rows, cols] |= torch.from_numpy(components.mask_in_box(k))
        answers.append(ClassMasks(index, torch.cat(accepted),
                                  rejected if bool(rejected.any()) else None))
    return answers


# ---- the merge at full resolution ------------------------------------------------------------
@dataclass
class Refinement:
    """SAM's answers for one image and how to bring them to the image's full resolution.

    classes: per refined class, its accepted masks and rejected components;
    size: (H, W) of the image; half: (h, w), where the components live;
    sam_size: S, SAM's square input side; input_size: (h_in, w_in), the resized image inside
        it; sam_image_size: (Hs, Ws) of the image SAM was given (segment_anything's
        ``original_size``), from which the masks are resized bilinearly to ``size``;
    compat: the rejected-component rule.
    """

    classes: list[ClassMasks]
    size: tuple[int, int]
    half: tuple[int, int]
    sam_size: int
    input_size: tuple[int, int]
    sam_image_size: tuple[int, int]
    compat: str = "fixed"

    def mask_logits(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """(K, len(rows), W) logits at full resolution of (K, s, s) low-resolution ones: up to
        S x S, cut to the input frame, to SAM's image size, to the image size; all bilinear
        (align_corners=False), rows through one chained weight matrix, columns by
        ``F.interpolate`` on the band (which leaves the rows as they are)."""
        side = logits.shape[-1]
        (height, width), (image_h, image_w) = self.size, self.sam_image_size
        (in_h, in_w), big = self.input_size, self.sam_size
        row_weights = chained_bilinear_rows(rows, [(height, image_h), (image_h, in_h),
                                                   (big, side)])
        band = torch.einsum("rh,khw->krw", row_weights, logits)[None]  # (1, K, r, s)
        r = band.shape[2]
        band = F.interpolate(band, size=(r, big), mode="bilinear", align_corners=False)
        band = band[..., :in_w]
        for target in (image_w, width):
            if band.shape[-1] != target:
                band = F.interpolate(band, size=(r, target), mode="bilinear", align_corners=False)
        return band[0]

    def mask_bands(self, rows: slice) -> list[tuple[int, torch.Tensor]]:
        """(class, (K, len(rows), W) full-resolution logits of its accepted masks) of a band,
        for every class with accepted masks."""
        return [(masks.index, self.mask_logits(masks.logits, rows))
                for masks in self.classes if masks.logits.shape[0]]

    def merge(
        self,
        rows: slice,
        coarse: torch.Tensor,
        mask_bands: list[tuple[int, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined scores of a band.

        Args:
            rows: the band's rows at full resolution.
            coarse: (C, rows, W) float32 coarse class probabilities of the band.
            mask_bands: :meth:`mask_bands` of the band, when already made.

        Returns:
            scores (C, rows, W) float32: where a mask decided, per class the max over its
            accepted masks of sigmoid(logit) x probability inside their union, else 0 (with
            ``fixed``, a rejected component's class at least its coarse probability); the
            coarse probabilities elsewhere; and decided (rows, W) bool.
        """
        refined = torch.zeros_like(coarse)
        decided = torch.zeros(coarse.shape[1:], dtype=torch.bool)
        for index, logits in mask_bands if mask_bands is not None else self.mask_bands(rows):
            union = (logits > 0).any(dim=0)
            score = torch.sigmoid(logits).amax(dim=0) * coarse[index]
            refined[index] = torch.where(union, score, torch.zeros_like(score))
            decided |= union
        if self.compat == "fixed":
            source_rows = nearest_index(self.size[0], self.half[0])[rows]
            source_cols = nearest_index(self.size[1], self.half[1])
            for masks in self.classes:
                if masks.rejected is None:
                    continue
                inside = masks.rejected[source_rows][:, source_cols] & decided
                refined[masks.index] = torch.where(
                    inside, torch.maximum(refined[masks.index], coarse[masks.index]),
                    refined[masks.index],
                )
        return torch.where(decided, refined, coarse), decided


@dataclass
class RefinedPrediction(Prediction):
    """A :class:`Prediction` after SAM refinement: its bands (and probabilities) are the refined
    scores its labels were taken from (:meth:`Refinement.merge`)."""

    refinement: Refinement | None = field(default=None, repr=False, compare=False)

    def band(self, rows: slice) -> torch.Tensor:
        coarse = super().band(rows)
        if self.refinement is None:
            return coarse
        return self.refinement.merge(rows, coarse)[0]

    def bands(self, band_rows: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        for rows, coarse in super().bands(band_rows):
            if self.refinement is None:
                yield rows, coarse
            else:
                yield rows, self.refinement.merge(rows, coarse)[0]


class SamRefiner:
    """Refines any method's :class:`Prediction` with SAM (it holds a reference to the method's
    SAM encoder, which the method registers as its own submodule)."""

    def __init__(self, sam: SamEncoder, settings: RefineConfig):
        check_refine_settings(settings)
        self.sam = sam
        self.settings = settings

    def image_features(self, image: np.ndarray) -> SamFeatures:
        """SAM's encoder on an (H, W, 3) uint8 image (ResizeLongestSide, padding)."""
        x, input_size = self.sam.preprocess(image)
        return self.sam(x, input_size)

    def __call__(
        self, prediction: Prediction, features: SamFeatures, sam_image_size: tuple[int, int]
    ) -> RefinedPrediction:
        """Refine ``prediction``.

        Args:
            prediction: the coarse prediction (labels and class probabilities).
            features: SAM features of the image SAM was given, ``input_size`` set.
            sam_image_size: (Hs, Ws) of that image (Trident: the image with its sides rounded
                up to the CLIP patch; other methods: the image itself).

        Returns:
            labels refined where an accepted mask decided; scores the refined ones there.
        """
        size = prediction.size
        coarse_labels = torch.from_numpy(prediction.labels)
        half_labels, half_probs = half_resolution(coarse_labels, prediction.bands())
        answers = decode_class_masks(self.sam, features, half_labels, half_probs, self.settings)
        refinement = Refinement(
            answers, size, tuple(half_labels.shape), self.sam.img_size,
            tuple(features.input_size), tuple(sam_image_size), self.settings.compat,
        )
        labels = coarse_labels.clone()
        band_rows = band_rows_for(prediction.scores.shape[0], size[1])  # as prediction.bands()
        for start in range(0, size[0], band_rows):
            rows = slice(start, min(start + band_rows, size[0]))
            mask_bands = refinement.mask_bands(rows)
            if not any(bool((logits > 0).any()) for _, logits in mask_bands):
                continue  # no accepted mask reaches these rows: the coarse labels stay
            scores, decided = refinement.merge(rows, prediction.band(rows), mask_bands)
            labels[rows] = torch.where(decided, argmax_classes(scores), labels[rows])
        return RefinedPrediction(labels.numpy(), prediction.classes, prediction.scores,
                                 prediction.to_probabilities, refinement=refinement)
