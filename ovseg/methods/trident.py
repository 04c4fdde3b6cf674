"""Trident: splice sub-image CLIP+DINO features, aggregate them with SAM, refine with SAM.

Training-free open-vocabulary segmentation (arXiv 2411.09219; ``specs/trident.md``). One image:

0. scale: mmseg keep-ratio resize, sides to multiples of the CLIP patch (``scale_image``);
1. windows: 336 crops, mmseg slide placement (``trident_windows``);
2. per window, CLIP's last block attends with DINO's similarity, m over all windows
   (``proxy_window_features``);
3. splice the windows' features on the CLIP grid of the whole image (``splice_windows``);
4. aggregate the spliced features with SAM's attention correlation (``sam_correlation``,
   ``aggregate_with_sam``); Cityscapes aggregates each image half on its own
   (``cityscapes_halves``, step 7);
5. score with the text classifier (``score_with_text``), upsample, softmax over all names;
6. a class scores the max over its names (``ovseg.layers.labels``), threshold to label 0;
8. refine the labels with SAM prompted by each connected component (``model.refine``,
   :mod:`ovseg.methods.sam_refine`, which any 2D method may use).

Memory is bounded by the window batch (CLIP/DINO) and the SAM row chunk (attention), not by
the image size; full-resolution maps are built a band of rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.config.schema import InferenceConfig
from ovseg.encoders.clip import ClipEncoder
from ovseg.encoders.dino import DinoEncoder
from ovseg.encoders.sam import SamEncoder, SamFeatures, attention_in_chunks
from ovseg.errors import ConfigError
from ovseg.layers.attention import proxy_last_block
from ovseg.layers.labels import class_probabilities as scored_classes
from ovseg.layers.labels import labels_from_probabilities
from ovseg.layers.resize import check_image, image_tensor, rescale_size, resize_image
from ovseg.layers.windows import Window, cut_windows, splice_windows, window_grid
from ovseg.methods.base import ImageState, Prediction, labels_in_bands
from ovseg.methods.common import (
    TextClassifiers,
    clip_from_config,
    dino_from_config,
    sam_from_config,
    settings_from_config,
)
from ovseg.methods.device import resolve_device
from ovseg.methods.sam_refine import RefineConfig, SamRefiner, check_refine_settings
from ovseg.text import Vocabulary, as_vocabulary, get_templates


@dataclass
class TridentConfig:
    """``cfg.model.trident``: every default of specs/trident.md after the resize and windows.

    Steps 0-1 (short side, max long side, crop 336, stride, window batch) are read from
    ``cfg.model.inference``, the one place every 2D method keeps them; the Trident values are
    set by ``configs/trident/trident_vitb16.yaml``. The per-benchmark values (short side, stride,
    cos_fac, thresholds) are set by the files in ``configs/trident/``; the defaults here are the
    authors' code defaults where the spec names one, else the VOC-21 row.
    """

    # step 2: ProxyCLIP attention from DINO, A = softmax(gamma * (S - beta * m)), m over all windows
    gamma: float = 3.0
    beta: float = 1.2
    # step 4: SAM correlation. Per query t_i = min(cos_fac * mean cos, cos_cap); keep cos > t_i
    cos_fac: float = 1.2
    cos_cap: float = 0.9
    # false (Cityscapes, ADE20K): a negative t_i becomes neg_cos_value
    refine_neg_cos: bool = True
    neg_cos_value: float = 0.6
    sam_chunk_rows: int = 512  # SAM query rows per attention chunk: bounds its memory
    # steps 5-6: softmax(logit_scale * cos) over all names; top probability < prob_thd -> label 0
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    # step 7: SAM on the left and right halves of the image (Cityscapes)
    cityscapes_halves: bool = False
    # step 8 (SAM refinement) is cfg.model.refine (ovseg.methods.sam_refine.RefineConfig),
    # which any 2D method may turn on; Trident's configs turn it on


# ---- step 0: scale ---------------------------------------------------------------------------
def processed_size(height: int, width: int, patch: int, min_side: int) -> tuple[int, int]:
    """Size of the CLIP input after the mmseg resize (step 0's second half), as the reference
    computes it.

    Sides that are both multiples of ``patch`` stay as they are (even below ``min_side``).
    Otherwise the long side goes to the next multiple of ``patch``; each side becomes
    ``int(side * target_long / long_side)`` (truncated), rounded up to a multiple of ``patch``
    only when that integer is not one already, and at least ``min_side``. (Rounding the exact
    product up instead gives another size for ~14 % of sizes, e.g. 336x351 -> 352x352 where the
    reference has 336x352.)

    Args:
        height, width: the mmseg-resized size.
        patch: the CLIP patch size p (16 or 14).
        min_side: the crop (336); a multiple of ``patch``.

    Returns:
        (H', W'), both multiples of ``patch``.
    """
    if height % patch == 0 and width % patch == 0:
        return height, width
    long_side = max(height, width)
    target_long = -(-long_side // patch) * patch

    def scaled(side: int) -> int:
        # int(side * target_long / long_side) in exact integers (the quotient is < 2**14, so
        # the float division of the reference truncates to the same integer)
        new_side = side * target_long // long_side
        return -(-new_side // patch) * patch

    return max(scaled(height), min_side), max(scaled(width), min_side)


def scale_image(image: np.ndarray, clip: ClipEncoder, inference: InferenceConfig) -> torch.Tensor:
    """Step 0: an (H, W, 3) uint8 RGB image -> (1, 3, H', W') CLIP-normalised float32 input.

    mmseg's keep-ratio resize to (max_long_side, short_side) (cv2 bilinear, mmcv rounding),
    then :func:`processed_size` with the crop as the smallest side.
    """
    size = rescale_size(*image.shape[:2], inference.short_side, inference.max_long_side,
                        min_side=clip.patch_size)
    pixels = image_tensor(image, size, clip.mean.device).float()
    target = processed_size(*size, clip.patch_size, inference.crop)
    if target != size:
        # guess: the second resize is torch bilinear (align_corners=False) on the tensor; it
        # commutes with the per-channel normalisation, so it may come before it
        pixels = F.interpolate(pixels, size=target, mode="bilinear", align_corners=False)
    return clip.normalize(pixels)


# ---- step 1: windows -------------------------------------------------------------------------
def trident_windows(height: int, width: int, crop: int, stride: int, patch: int) -> list[Window]:
    """Step 1: the windows of the processed image, in pixels, row-major.

    Per axis ceil((L - crop) / stride) + 1 windows, the last shifted inward to the border, no
    padding; a side shorter than the crop gets one window covering it (mmseg slide placement,
    :func:`ovseg.layers.window_grid`). Every bound is a multiple of ``patch``, so windows sit
    on the CLIP grid.

    Returns:
        list of (y0, x0, y1, x1).
    """
    for name, value in (("height", height), ("width", width), ("crop", crop),
                        ("stride", stride)):
        if value % patch:
            raise ConfigError(
                f"Trident needs the {name} ({value}) to be a multiple of the CLIP patch size "
                f"{patch}; set model.inference.crop/stride to multiples of {patch}"
            )
    return window_grid(height, width, crop, stride)


def to_patch_grid(windows: Sequence[Window], patch: int) -> list[Window]:
    """Pixel windows -> the same windows in CLIP patch units."""
    return [(y0 // patch, x0 // patch, y1 // patch, x1 // patch) for y0, x0, y1, x1 in windows]


# ---- step 2: CLIP with DINO proxy attention --------------------------------------------------
def proxy_similarity_mean(token_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """m: the mean of DINO's cosine similarity S over every entry of every window.

    Args:
        token_batches: (B_k, N', C) DINO tokens of all windows of one image, in batches.

    Returns:
        () float32 scalar.
    """
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for tokens in token_batches:
        normed = F.normalize(tokens.float(), dim=-1)
        total = total + (normed @ normed.transpose(1, 2)).sum(dtype=torch.float64).cpu()
        count += tokens.shape[0] * tokens.shape[1] ** 2
    return (total / count).float()


def proxy_window_features(
    clip: ClipEncoder,
    dino: DinoEncoder,
    x: torch.Tensor,
    windows: Sequence[Window],
    *,
    window_batch: int,
    gamma: float,
    beta: float,
) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """Step 2: CLIP's last-block output of every window, attention from DINO.

    DINO runs first over all windows (in batches of ``window_batch``, keeping only its tokens),
    so that m (:func:`proxy_similarity_mean`) covers every window of the image; then CLIP runs
    batch by batch with A = softmax(gamma * (S - beta * m)), entries < 0 masked, v from
    in_proj(ln_1 x) resized to DINO's grid, out = out_proj(A v): no residual, no FFN. Where
    DINO's grid differs from CLIP's (H/14), the output is resized bilinearly to CLIP's grid.

    Args:
        x: (1, 3, H', W') CLIP-normalised processed image.
        windows: pixel windows of :func:`trident_windows`.

    Yields:
        (windows of the batch in CLIP patch units, (B, W, h, w) float32 last-block outputs on
        the CLIP grid of the windows), before ln_post.
    """
    batches = [list(windows[i:i + window_batch]) for i in range(0, len(windows), window_batch)]
    tokens: list[torch.Tensor] = []
    dino_grid: tuple[int, int] = (0, 0)
    for batch in batches:
        # re-normalised from the CLIP input's statistics (model.clip.normalize) to DINO's
        features = dino(dino.renormalize(cut_windows(x, batch), *clip.input_stats))
        tokens.append(features.tokens)
        dino_grid = tuple(features.grid)
    mean = proxy_similarity_mean(tokens)
    patch = clip.patch_size
    for batch, batch_tokens in zip(batches, tokens, strict=True):
        crops = cut_windows(x, batch)
        last, _ = proxy_last_block(
            clip(crops), clip, proxy_tokens=batch_tokens, proxy_grid=dino_grid, gamma=gamma,
            beta=beta, mean=mean,
        )
        maps = last.transpose(1, 2).reshape(last.shape[0], last.shape[2], *dino_grid).float()
        clip_grid = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        if tuple(maps.shape[-2:]) != clip_grid:
            maps = F.interpolate(maps, size=clip_grid, mode="bilinear", align_corners=False)
        yield to_patch_grid(batch, patch), maps


# ---- step 4: SAM correlation -----------------------------------------------------------------
def sam_input_image(image: np.ndarray, patch: int) -> np.ndarray:
    """Step 4's input: the image at its original size with each side rounded up to a multiple
    of the CLIP patch (cv2 bilinear); returned as is when both sides are multiples already."""
    height, width = image.shape[:2]
    size = (-(-height // patch) * patch, -(-width // patch) * patch)
    if size == (height, width):
        return image
    return resize_image(image, size)


def valid_sam_grid(input_size: tuple[int, int], sam_patch: int) -> tuple[int, int]:
    """(hs, ws) = floor(side / p) of SAM's input frame: the cells that hold image, not padding."""
    # guess: a frame side under one patch keeps one cell (the reference would get an empty grid)
    return max(input_size[0] // sam_patch, 1), max(input_size[1] // sam_patch, 1)


def correlation_thresholds(
    query_values: torch.Tensor,
    value_sum: torch.Tensor,
    count: int,
    *,
    cos_fac: float,
    cos_cap: float = 0.9,
    refine_neg_cos: bool = True,
    neg_cos_value: float = 0.6,
) -> torch.Tensor:
    """t_i = min(cos_fac * mean over heads and j of cos_h(i, j), cos_cap); with
    ``refine_neg_cos`` false a negative t_i becomes ``neg_cos_value``.

    The mean of cosines is n_hi . (sum_j n_hj) / N, so no N x N matrix is needed for it.

    Args:
        query_values: (heads, R, d) L2-normalised values of the R queries.
        value_sum: (heads, d) sum of the L2-normalised values of all N tokens.
        count: N.

    Returns:
        (R,) float32.
    """
    heads = query_values.shape[0]
    mean = torch.einsum("hrd,hd->r", query_values, value_sum) / (heads * count)
    threshold = (cos_fac * mean).clamp(max=cos_cap)
    if not refine_neg_cos:
        threshold = torch.where(threshold < 0, torch.full_like(threshold, neg_cos_value), threshold)
    return threshold


def _kept_attention(
    attention: torch.Tensor,
    normed_values: torch.Tensor,
    query_index: torch.Tensor,
    threshold: torch.Tensor,
) -> torch.Tensor:
    """Sum over heads of attn_h(i, j) where cos_h(i, j) > t_i, the diagonal always: (R, N).

    ``attention`` (heads, R, N) is overwritten (it is the caller's temporary); a sum instead of
    a mean over heads, as the rows are normalised afterwards anyway.
    """
    cosine = normed_values[:, query_index] @ normed_values.transpose(1, 2)  # (heads, R, N)
    keep = cosine > threshold[None, :, None]
    del cosine
    # cos(i, i) = 1 > t_i already; forcing it keeps rows of zero value vectors normalisable
    keep[:, torch.arange(query_index.shape[0], device=keep.device), query_index] = True
    return attention.mul_(keep).sum(dim=0)


def sam_correlation(
    attention: torch.Tensor,
    values: torch.Tensor,
    query_index: torch.Tensor,
    *,
    cos_fac: float,
    cos_cap: float = 0.9,
    refine_neg_cos: bool = True,
    neg_cos_value: float = 0.6,
) -> torch.Tensor:
    """Rows of SAM's correlation matrix C (step 4's rule).

    cos_h(i, j) = cosine of head h's values; t_i = min(cos_fac * mean over heads and j of
    cos_h(i, j), cos_cap), and with ``refine_neg_cos`` false a negative t_i becomes
    ``neg_cos_value`` (:func:`correlation_thresholds`). attn_h(i, j) is kept where
    cos_h(i, j) > t_i (the diagonal always), the heads are averaged and each row is normalised
    to sum 1.

    Args:
        attention: (heads, R, N) SAM softmax attention of R query tokens over the N tokens.
        values: (heads, N, d) SAM values of the N tokens.
        query_index: (R,) int64 index in [0, N) of each query token.

    Returns:
        (R, N) float32, rows summing to 1.
    """
    normed = F.normalize(values.float(), dim=-1)
    threshold = correlation_thresholds(
        normed[:, query_index], normed.sum(dim=1), normed.shape[1], cos_fac=cos_fac,
        cos_cap=cos_cap, refine_neg_cos=refine_neg_cos, neg_cos_value=neg_cos_value,
    )
    kept = _kept_attention(attention.float().clone(), normed, query_index, threshold)
    return kept / kept.sum(dim=-1, keepdim=True)


def aggregate_with_sam(
    canvas: torch.Tensor, features: SamFeatures, sam_patch: int, settings: TridentConfig
) -> torch.Tensor:
    """Step 4: F' = C F on SAM's valid grid, C from SAM's last global attention.

    The canvas is resized bilinearly to the valid grid hs x ws (:func:`valid_sam_grid`); SAM's
    attention (softmax over the whole padded grid, with rel-pos) and values are cropped to it.
    C is built ``settings.sam_chunk_rows`` query rows at a time (:func:`attention_in_chunks`),
    so every head's full N x N map is never held at once; each chunk's rows of C are used for
    their rows of F' and dropped. Same result as :func:`sam_correlation` on all rows.

    Args:
        canvas: (D, h, w) spliced features (before ln_post).
        features: SAM features of one image (batch 1) with ``input_size`` set.

    Returns:
        (D, hs, ws) float32 on the canvas's device.
    """
    if features.input_size is None:
        raise ValueError("aggregate_with_sam needs SamFeatures.input_size (SamEncoder.preprocess)")
    hs, ws = valid_sam_grid(features.input_size, sam_patch)
    gh, gw = features.grid
    hs, ws = min(hs, gh), min(ws, gw)
    dim = canvas.shape[0]
    device = features.last_global_v.device
    flat = F.interpolate(canvas[None].float(), size=(hs, ws), mode="bilinear", align_corners=False)
    flat = flat[0].flatten(1).T.to(device)  # (Nv, D)
    valid = (torch.arange(hs)[:, None] * gw + torch.arange(ws)[None, :]).flatten()
    normed = F.normalize(features.last_global_v[0][:, valid.to(device)].float(), dim=-1)
    value_sum = normed.sum(dim=1)
    heads = normed.shape[0]
    out = torch.empty_like(flat)
    chunk = max(settings.sam_chunk_rows // gw, 1) * gw  # whole grid rows per chunk
    for rows, attention in attention_in_chunks(features, chunk):
        y0 = rows.start // gw
        if y0 >= hs:
            break  # the rest are padding rows
        y1 = min(rows.stop // gw, hs)
        attention = attention[0].reshape(heads, -1, gw, gh, gw)[:, : y1 - y0, :ws, :hs, :ws]
        attention = attention.reshape(heads, (y1 - y0) * ws, hs * ws).float()
        query = torch.arange(y0 * ws, y1 * ws, device=device)
        threshold = correlation_thresholds(
            normed[:, query], value_sum, hs * ws, cos_fac=settings.cos_fac,
            cos_cap=settings.cos_cap, refine_neg_cos=settings.refine_neg_cos,
            neg_cos_value=settings.neg_cos_value,
        )
        kept = _kept_attention(attention, normed, query, threshold)
        # row-normalise after the product: (R, D) divisions instead of (R, Nv)
        out[query] = (kept @ flat) / kept.sum(dim=-1, keepdim=True)
    return out.T.reshape(dim, hs, ws).to(canvas.device)


# ---- step 7: Cityscapes halves ---------------------------------------------------------------
def image_halves(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves of an (H, W, 3) image, split at W // 2 (the right one is wider
    by a column when W is odd)."""
    split = image.shape[1] // 2
    return np.ascontiguousarray(image[:, :split]), np.ascontiguousarray(image[:, split:])


def canvas_split_column(canvas_width: int, image_width: int, left_width: int) -> int:
    """The canvas column matching the image's split column (equal to half for even splits)."""
    # guess: for unequal halves the canvas is split in proportion to the image halves (floor)
    return canvas_width * left_width // image_width


def cityscapes_halves(
    canvas: torch.Tensor,
    halves: Sequence[SamFeatures],
    split: int,
    sam_patch: int,
    settings: TridentConfig,
) -> torch.Tensor:
    """Step 7: aggregate each half of the canvas with its own image half's SAM, join by width.

    Args:
        canvas: (D, h, w) spliced features of the whole image.
        halves: SAM features of the left and right image halves.
        split: the canvas column where the right half starts (:func:`canvas_split_column`).

    Returns:
        (D, hs, ws_left + ws_right) float32; 2 * ws for equal halves. Where the halves' valid
        grids differ in height, both are resized bilinearly to the taller one.
    """
    if len(halves) != 2:
        raise ValueError(f"cityscapes_halves needs SAM features of 2 halves, got {len(halves)}")
    parts = [
        aggregate_with_sam(canvas[:, :, :split], halves[0], sam_patch, settings),
        aggregate_with_sam(canvas[:, :, split:], halves[1], sam_patch, settings),
    ]
    height = max(part.shape[1] for part in parts)
    parts = [
        part if part.shape[1] == height else F.interpolate(
            part[None], size=(height, part.shape[2]), mode="bilinear", align_corners=False
        )[0]
        for part in parts
    ]
    return torch.cat(parts, dim=2)


# ---- steps 5-6: score ------------------------------------------------------------------------
def score_with_text(
    features: torch.Tensor, clip: ClipEncoder, text: torch.Tensor
) -> torch.Tensor:
    """Step 5: ln_post, proj, L2 norm, cosine with the text classifier.

    Args:
        features: (D, h, w) aggregated last-block features (CLIP width D).
        text: (N_names, E) L2-normalised text classifier.

    Returns:
        (N_names, h, w) float32 cosines.
    """
    dim, height, width = features.shape
    projected = F.normalize(clip.project(features.flatten(1).T), dim=-1)
    cosine = projected @ text.to(projected.device, projected.dtype).T
    return cosine.T.reshape(-1, height, width).float()


def class_probabilities(
    cosine: torch.Tensor, size: tuple[int, int], logit_scale: float, vocabulary: Vocabulary
) -> torch.Tensor:
    """Steps 5-6 at the output size, as a whole map (tests; ``predict`` works in bands):
    upsample the cosines bilinearly, softmax(logit_scale * cos) over all names, max over each
    class's names (the background's several words, and any foreground synonyms alike).

    Args:
        cosine: (N_names, h, w) on SAM's grid.
        size: (H, W) of the original image.

    Returns:
        (C, H, W) float32 on the CPU.
    """
    return Prediction(
        np.zeros(size, dtype=np.uint8), vocabulary.class_names, cosine,
        partial(scored_classes, vocabulary=vocabulary, logit_scale=logit_scale),
    ).probabilities()


# ---- the model -------------------------------------------------------------------------------
class Trident(nn.Module):
    """Training-free Trident segmentor: ``predict(image, vocabulary) -> Prediction``."""

    # the largest input predict takes (None = the default); build_model sets
    # cfg.model.max_image_pixels
    max_image_pixels: int | None = None

    def __init__(
        self,
        clip: ClipEncoder,
        dino: DinoEncoder,
        sam: SamEncoder,
        settings: TridentConfig,
        inference: InferenceConfig,
        templates: list[str],
        text_cache_dir: str | None = None,
        refine: RefineConfig | None = None,
    ):
        super().__init__()
        patch = clip.patch_size
        for key in ("crop", "stride"):
            value = getattr(inference, key)
            if value <= 0 or value % patch:
                raise ConfigError(
                    f"model.inference.{key}: {value} must be a positive multiple of the CLIP "
                    f"patch size {patch} for Trident"
                )
        if inference.pad_multiple:
            raise ConfigError(
                f"model.inference.pad_multiple: {inference.pad_multiple}; Trident's windows sit "
                "on the CLIP grid and are never padded: set it to 0"
            )
        if inference.window_batch < 1:
            raise ConfigError("model.inference.window_batch must be at least 1")
        if settings.sam_chunk_rows < 1:
            raise ConfigError("model.trident.sam_chunk_rows must be at least 1")
        self.clip = clip
        self.dino = dino
        self.sam = sam
        self.settings = settings
        self.inference = inference
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)
        refine = refine or RefineConfig()
        check_refine_settings(refine)
        self.refiner = SamRefiner(sam, refine) if refine.enabled else None

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    def spliced_features(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: (1, 3, H', W') processed image -> (D, H'/p, W'/p) spliced canvas."""
        settings, inference = self.settings, self.inference
        patch = self.clip.patch_size
        height, width = x.shape[-2:]
        windows = trident_windows(height, width, inference.crop, inference.stride, patch)
        batches = proxy_window_features(
            self.clip, self.dino, x, windows, window_batch=inference.window_batch,
            gamma=settings.gamma, beta=settings.beta,
        )
        return splice_windows(batches, (height // patch, width // patch))

    def sam_features(self, image: np.ndarray) -> SamFeatures:
        """SAM's encoder on an (H, W, 3) uint8 image (ResizeLongestSide, padding)."""
        x, input_size = self.sam.preprocess(image)
        return self.sam(x, input_size)

    def aggregate(
        self, canvas: torch.Tensor, sam_image: np.ndarray
    ) -> tuple[torch.Tensor, SamFeatures | None]:
        """Step 4 (or 7 with ``cityscapes_halves``): (D, hs, ws) aggregated features, and the
        whole image's SAM features when they were computed."""
        settings = self.settings
        if not settings.cityscapes_halves:
            features = self.sam_features(sam_image)
            return aggregate_with_sam(canvas, features, self.sam.patch_size, settings), features
        left, right = image_halves(sam_image)
        halves = [self.sam_features(left), self.sam_features(right)]
        split = canvas_split_column(canvas.shape[-1], sam_image.shape[1], left.shape[1])
        return cityscapes_halves(canvas, halves, split, self.sam.patch_size, settings), None

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> TridentState:
        """Steps 0-4 (and 7) of an (H, W, 3) uint8 RGB image: all that does not depend on the
        vocabulary (CLIP, DINO and SAM forwards), kept for :meth:`predict`."""
        image = check_image(image, "Trident", self.max_image_pixels)
        canvas = self.spliced_features(scale_image(image, self.clip, self.inference))
        sam_image = sam_input_image(image, self.clip.patch_size)
        aggregated, features = self.aggregate(canvas, sam_image)
        del canvas
        if self.refiner is not None and features is None:
            features = self.sam_features(sam_image)  # Cityscapes: SAM again on the whole image
        return TridentState(
            size=(int(image.shape[0]), int(image.shape[1])), aggregated=aggregated,
            sam_features=features if self.refiner is not None else None,
            sam_image_size=(int(sam_image.shape[0]), int(sam_image.shape[1])),
        )

    @torch.inference_mode()
    def predict(
        self,
        image: np.ndarray | TridentState,
        vocabulary,
        classifier: torch.Tensor | None = None,
    ) -> Prediction:
        """Segment an image, or the :class:`TridentState` of one, into the classes of
        ``vocabulary``.

        Args:
            image: (H, W, 3) uint8 RGB, or ``encode(image)`` (then no encoder runs again).
            vocabulary: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list;
                every class may list several names (VOC's background words included) and
                scores their max.
            classifier: (N_names, E) L2-normalised text embeddings of the vocabulary's names,
                precomputed; None = from the text encoder (cached per vocabulary).

        Returns:
            :class:`Prediction`: labels (H, W) int64; the scores are the name cosines on SAM's
            grid, whose bands are the class probabilities of steps 5-6; after refinement (when
            on) the bands are the refined scores the labels were taken from.
        """
        state = image if isinstance(image, TridentState) else self.encode(image)
        vocabulary = as_vocabulary(vocabulary)
        settings = self.settings
        text = self.text_classifier(vocabulary.names) if classifier is None else classifier
        cosine = score_with_text(state.aggregated, self.clip, text).cpu()
        to_probabilities = partial(scored_classes, vocabulary=vocabulary,
                                   logit_scale=settings.logit_scale)
        labels = labels_in_bands(
            cosine, state.size,
            lambda band: labels_from_probabilities(to_probabilities(band), settings.prob_thd),
            num_classes=len(vocabulary.class_names),
        )
        prediction = Prediction(labels.numpy(), vocabulary.class_names, cosine, to_probabilities)
        if self.refiner is not None:
            prediction = self.refiner(prediction, state.sam_features, state.sam_image_size)
        return prediction


@dataclass
class TridentState(ImageState):
    """What :meth:`Trident.encode` keeps of an image.

    aggregated: (D, hs, ws) float32 CLIP features after the splice and SAM aggregation (step 4),
        before ln_post; the vocabulary only enters after them.
    sam_features: SAM features of the whole image for the refinement (None when it is off);
    sam_image_size: (Hs, Ws) of the image SAM was given (step 4's input).
    """

    aggregated: torch.Tensor = None  # type: ignore[assignment]
    sam_features: SamFeatures | None = None
    sam_image_size: tuple[int, int] = (0, 0)


def build_trident(cfg) -> Trident:
    """Build :class:`Trident` from a full config (``cfg.model``, ``cfg.text``)."""
    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    return Trident(
        clip_from_config(model_cfg, device),
        dino_from_config(model_cfg, device),
        sam_from_config(model_cfg, device),
        settings_from_config(model_cfg.trident, TridentConfig),
        settings_from_config(model_cfg.inference, InferenceConfig),
        get_templates(cfg.text.templates),
        text_cache_dir=cfg.text.cache_dir or None,
        refine=settings_from_config(model_cfg.refine, RefineConfig),
    )
