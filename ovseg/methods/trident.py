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
6. a class scores the max over its names (``apply_background_rule``), threshold to label 0;
8. refine the labels with SAM prompted by each connected component (``refine_with_sam``).

Memory is bounded by the window batch (CLIP/DINO) and the SAM row chunk (attention), not by
the image size; full-resolution maps are built a band of rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.config.trident_schema import TRIDENT_COMPAT, TridentConfig
from ovseg.encoders.clip import OPENAI_MEAN, OPENAI_STD, ClipEncoder
from ovseg.encoders.dino import DinoEncoder
from ovseg.encoders.sam import SamEncoder, SamFeatures, attention_in_chunks
from ovseg.errors import ConfigError
from ovseg.layers.chunked_resize import map_resized_bands
from ovseg.layers.components import connected_components
from ovseg.layers.resize import rescale_size, resize_image
from ovseg.layers.sam_prompts import (
    best_point,
    box_prompt,
    longest_side_shape,
    mask_prompt,
    point_prompt,
    prompt_scale,
)
from ovseg.layers.windows import Window, cut_windows, window_counts, window_grid
from ovseg.methods.base import Prediction
from ovseg.methods.common import (
    TextClassifiers,
    clip_from_config,
    dino_from_config,
    settings_from_config,
)
from ovseg.methods.dense_clip import labels_from_probabilities
from ovseg.methods.device import resolve_device
from ovseg.text import Vocabulary, as_vocabulary, get_templates
from ovseg.text.vocabulary import max_over_synonyms

# rows of a full-resolution map built at a time (class probabilities, the refined labels)
BAND_ROWS = 64


# ---- step 0: scale ---------------------------------------------------------------------------
def processed_size(height: int, width: int, patch: int, min_side: int) -> tuple[int, int]:
    """Size of the CLIP input after the mmseg resize (step 0's second half).

    Sides that are both multiples of ``patch`` stay as they are (even below ``min_side``).
    Otherwise the long side goes to the next multiple of ``patch``, the short side scales with
    it and is rounded up to a multiple of ``patch``, and each side is at least ``min_side``.

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

    def rounded_up(side: int) -> int:
        # side * target_long / long_side, rounded up to a multiple of patch, in exact integers
        return -(-side * target_long // (long_side * patch)) * patch

    return max(rounded_up(height), min_side), max(rounded_up(width), min_side)


def scale_image(image: np.ndarray, clip: ClipEncoder, settings: TridentConfig) -> torch.Tensor:
    """Step 0: an (H, W, 3) uint8 RGB image -> (1, 3, H', W') CLIP-normalised float32 input.

    mmseg's keep-ratio resize to (max_long_side, short_side) (cv2 bilinear, mmcv rounding),
    then :func:`processed_size`.
    """
    size = rescale_size(*image.shape[:2], settings.short_side, settings.max_long_side)
    resized = resize_image(image, size)
    pixels = torch.from_numpy(np.ascontiguousarray(resized)).to(clip.mean.device)
    pixels = pixels.permute(2, 0, 1)[None].float()
    target = processed_size(*size, clip.patch_size, settings.crop)
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
                f"{patch}; set model.trident.crop/stride to multiples of {patch}"
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
        features = dino(dino.renormalize(cut_windows(x, batch), OPENAI_MEAN, OPENAI_STD))
        tokens.append(features.tokens)
        dino_grid = tuple(features.grid)
    mean = proxy_similarity_mean(tokens)
    patch = clip.patch_size
    for batch, batch_tokens in zip(batches, tokens, strict=True):
        crops = cut_windows(x, batch)
        out = clip(
            crops, "proxy", proxy_tokens=batch_tokens, proxy_grid=dino_grid,
            proxy_gamma=gamma, proxy_beta=beta, proxy_mean=mean,
        )
        last = out.last_block_output
        maps = last.transpose(1, 2).reshape(last.shape[0], last.shape[2], *dino_grid).float()
        clip_grid = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        if tuple(maps.shape[-2:]) != clip_grid:
            maps = F.interpolate(maps, size=clip_grid, mode="bilinear", align_corners=False)
        yield to_patch_grid(batch, patch), maps


# ---- step 3: splice --------------------------------------------------------------------------
def splice_windows(
    batches: Iterable[tuple[Sequence[Window], torch.Tensor]], size: tuple[int, int]
) -> torch.Tensor:
    """Step 3: sum window maps at their offsets on one canvas and divide by the cover count.

    Batches are added as they come, so only one batch of windows is alive beside the canvas.

    Args:
        batches: (windows, maps) pairs; windows (y0, x0, y1, x1) in canvas cells, maps
            (B, D, y1 - y0, x1 - x0), one per window.
        size: (h, w) of the canvas.

    Returns:
        (D, h, w) float32 on the maps' device.
    """
    canvas: torch.Tensor | None = None
    placed: list[Window] = []
    for windows, maps in batches:
        if canvas is None:
            canvas = torch.zeros((maps.shape[1], *size), dtype=torch.float32, device=maps.device)
        for window_map, (y0, x0, y1, x1) in zip(maps, windows, strict=True):
            canvas[:, y0:y1, x0:x1] += window_map.float()
        placed.extend(windows)
    if canvas is None:
        raise ValueError("splice_windows got no windows")
    counts = window_counts(placed, size, canvas.device)[0]
    if bool((counts == 0).any()):
        raise ValueError("the windows leave canvas cells uncovered")
    return canvas.div_(counts)


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


def apply_background_rule(name_probabilities: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """Step 6: each class takes the max of its names' probabilities (the background's several
    words, and any foreground synonyms alike).

    Args:
        name_probabilities: (N_names, ...) softmax over all names.

    Returns:
        (C, ...) class probabilities.
    """
    return max_over_synonyms(
        name_probabilities, vocabulary.name_to_class.to(name_probabilities.device),
        vocabulary.num_classes,
    )


def class_probabilities(
    cosine: torch.Tensor, size: tuple[int, int], logit_scale: float, vocabulary: Vocabulary
) -> torch.Tensor:
    """Steps 5-6 at the output size: upsample the cosines bilinearly, softmax(logit_scale * cos)
    over all names, max over each class's names; a band of rows at a time.

    Args:
        cosine: (N_names, h, w) on SAM's grid.
        size: (H, W) of the original image.

    Returns:
        (C, H, W) float32 on the CPU.
    """
    return map_resized_bands(
        cosine, size,
        lambda band: apply_background_rule((logit_scale * band).softmax(dim=0), vocabulary),
        vocabulary.num_classes, BAND_ROWS,
    )


def thresholded_labels(probs: torch.Tensor, prob_thd: float) -> torch.Tensor:
    """Step 6's argmax of (C, H, W) probabilities, pixels under ``prob_thd`` -> 0: (H, W) int64,
    a band of rows at a time (the full-size temporaries would outweigh the labels)."""
    labels = torch.empty(probs.shape[1:], dtype=torch.int64)
    for start in range(0, probs.shape[1], BAND_ROWS):
        rows = slice(start, min(start + BAND_ROWS, probs.shape[1]))
        labels[rows] = labels_from_probabilities(probs[:, rows], prob_thd)
    return labels


# ---- step 8: refinement ----------------------------------------------------------------------
def nearest_index(out_size: int, in_size: int) -> torch.Tensor:
    """Source index of each output cell of a nearest resize: floor(i * in / out)."""
    return torch.arange(out_size) * in_size // out_size


def half_resolution(
    labels: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8's input: labels (nearest) and probabilities (bilinear) at half the size.

    Args:
        labels: (H, W) int64; probs: (C, H, W) float32.

    Returns:
        (h, w) int64 and (C, h, w) float32, (h, w) = (H // 2, W // 2), at least 1.
    """
    height, width = labels.shape
    # guess: half size floors, as scale_factor=0.5 does
    size = (max(height // 2, 1), max(width // 2, 1))
    half_probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    rows, cols = nearest_index(size[0], height), nearest_index(size[1], width)
    return labels[rows[:, None], cols[None, :]], half_probs


def refine_with_sam(
    sam: SamEncoder,
    features: SamFeatures,
    labels: torch.Tensor,
    probs: torch.Tensor,
    settings: TridentConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8: SAM refinement of coarse labels, one decoder call per connected component.

    Pixels whose top probability is below ct are left out; every class whose max probability
    reaches ct is refined, background included. Each 8-connected component of at least
    ``min_component`` pixels prompts SAM with its box, one positive point at its highest
    probability and the class's mask prompt (:func:`ovseg.layers.sam_prompts.mask_prompt`),
    single-mask output. A mask with predicted IoU > ``iou_thresh`` is kept: on its pixels
    (logit > 0) the class scores sigmoid(logit) x probability, max over the class's kept masks.
    A rejected component's pixels score the coarse probability instead. Every pixel scored
    this way takes the argmax of the scores; the others keep the coarse label.

    Args:
        sam: the encoder whose ``predict_masks`` / ``postprocess_masks`` decode the prompts.
        features: SAM features of the whole image, ``input_size`` set.
        labels: (h, w) int64 coarse labels; probs: (C, h, w) float32 class probabilities
            (both at half resolution).

    Returns:
        refined (h, w) int64 labels and (h, w) bool, the pixels the refinement decided.
    """
    height, width = labels.shape
    threshold = settings.coarse_thresh
    if settings.compat == "reference":
        # the authors' frame: the half-resolution size resized to SAM's long side
        frame = longest_side_shape(height, width, sam.img_size)
    else:
        frame = features.input_size
    scale = prompt_scale((height, width), frame)
    confident = probs.amax(dim=0) >= threshold
    # the argmax over classes of each class's max score, kept as a running best so that no
    # (C, h, w) score tensor is needed; classes come in order and only a higher score wins,
    # so ties go to the lower class index as an argmax would
    best_score = torch.full((height, width), -1.0)
    refined = labels.clone()
    decided = torch.zeros((height, width), dtype=torch.bool)
    for index in range(probs.shape[0]):
        class_probs = probs[index]
        if float(class_probs.max()) < threshold:
            continue
        components = connected_components(((labels == index) & confident).numpy())
        large = [k for k in range(len(components)) if components.areas[k] >= settings.min_component]
        if not large:
            continue
        mask_input = mask_prompt(
            class_probs, frame, sam.img_size, threshold, settings.mask_prompt_scale
        )
        if settings.compat == "reference":
            mask_input = mask_input[0]  # unbatched (1, 256, 256), as the authors pass it
        for k in large:
            rows, cols = components.box_slices(k)
            inside = torch.from_numpy(components.mask_in_box(k))
            point = best_point(class_probs[rows, cols], inside, (cols.start, rows.start))
            coords, point_labels = point_prompt(point, scale)
            mask_logits, iou = sam.predict_masks(
                features, coords, point_labels, box_prompt(components.boxes[k], scale),
                mask_input, multimask_output=False,
            )
            if float(iou.flatten()[0]) > settings.iou_thresh:
                logit = sam.postprocess_masks(mask_logits[:, :1], features.input_size,
                                              (height, width))
                logit = logit[0, 0].float().cpu()
                region = logit > 0  # SAM's mask threshold
                score = torch.sigmoid(logit) * class_probs
                _take_higher(best_score, refined, region, score, index)
                decided |= region
            else:  # a rejected component competes with its coarse probability
                _take_higher(best_score[rows, cols], refined[rows, cols], inside,
                             class_probs[rows, cols], index)
                decided[rows, cols] |= inside
    return refined, decided


def _take_higher(
    best_score: torch.Tensor, best_label: torch.Tensor, region: torch.Tensor,
    score: torch.Tensor, index: int,
) -> None:
    """Where ``region`` holds and ``score`` beats ``best_score``: take it and label ``index``
    (in place; the first two may be views)."""
    better = region & (score > best_score)
    best_score[better] = score[better]
    best_label[better] = index


def merge_refined_labels(
    labels: torch.Tensor, refined: torch.Tensor, decided: torch.Tensor
) -> torch.Tensor:
    """Write half-resolution refined labels into full-resolution labels, in place.

    Args:
        labels: (H, W) int64 coarse labels at the original size (modified).
        refined: (h, w) int64; decided: (h, w) bool, from :func:`refine_with_sam`.

    Returns:
        ``labels``: nearest-upsampled refined labels where the refinement decided, else as is.
    """
    height, width = labels.shape
    rows = nearest_index(height, refined.shape[0])
    cols = nearest_index(width, refined.shape[1])
    for start in range(0, height, BAND_ROWS):
        band = slice(start, min(start + BAND_ROWS, height))
        source = rows[band]
        labels[band] = torch.where(decided[source][:, cols], refined[source][:, cols],
                                   labels[band])
    return labels


# ---- the model -------------------------------------------------------------------------------
class Trident(nn.Module):
    """Training-free Trident segmentor: ``predict(image, vocabulary) -> Prediction``."""

    def __init__(
        self,
        clip: ClipEncoder,
        dino: DinoEncoder,
        sam: SamEncoder,
        settings: TridentConfig,
        templates: list[str],
        text_cache_dir: str | None = None,
    ):
        super().__init__()
        if settings.compat not in TRIDENT_COMPAT:
            raise ConfigError(
                f"model.trident.compat: {settings.compat!r} is not one of {TRIDENT_COMPAT}"
            )
        patch = clip.patch_size
        for key in ("crop", "stride"):
            value = getattr(settings, key)
            if value <= 0 or value % patch:
                raise ConfigError(
                    f"model.trident.{key}: {value} must be a positive multiple of the CLIP "
                    f"patch size {patch}"
                )
        for key in ("window_batch", "sam_chunk_rows"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"model.trident.{key} must be at least 1")
        self.clip = clip
        self.dino = dino
        self.sam = sam
        self.settings = settings
        self.text_classifier = TextClassifiers(clip, templates, text_cache_dir)

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device

    def spliced_features(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: (1, 3, H', W') processed image -> (D, H'/p, W'/p) spliced canvas."""
        settings = self.settings
        patch = self.clip.patch_size
        height, width = x.shape[-2:]
        windows = trident_windows(height, width, settings.crop, settings.stride, patch)
        batches = proxy_window_features(
            self.clip, self.dino, x, windows, window_batch=settings.window_batch,
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
    def predict(self, image: np.ndarray, vocabulary) -> Prediction:
        """Segment an (H, W, 3) uint8 RGB image into the classes of ``vocabulary``.

        ``vocabulary``: a Vocabulary, an inline string ("cat, dog; puppy, sky") or a list; every
        class may list several names (VOC's background words included) and scores their max.

        Returns:
            :class:`Prediction`: labels (H, W) int64 after refinement (when on); logits (C, H, W)
            float32 class probabilities of steps 5-6 (before refinement).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Trident.predict expects an (H, W, 3) uint8 RGB image, got {image.shape} "
                f"{image.dtype}"
            )
        vocabulary = as_vocabulary(vocabulary)
        settings = self.settings
        text = self.text_classifier(vocabulary.names)
        size = (int(image.shape[0]), int(image.shape[1]))
        canvas = self.spliced_features(scale_image(image, self.clip, settings))
        sam_image = sam_input_image(image, self.clip.patch_size)
        aggregated, features = self.aggregate(canvas, sam_image)
        del canvas
        cosine = score_with_text(aggregated, self.clip, text)
        probs = class_probabilities(cosine, size, settings.logit_scale, vocabulary)
        labels = thresholded_labels(probs, settings.prob_thd)
        if settings.refine:
            if features is None:  # Cityscapes: SAM is set again on the whole image
                features = self.sam_features(sam_image)
            half_labels, half_probs = half_resolution(labels, probs)
            refined, decided = refine_with_sam(self.sam, features, half_labels, half_probs,
                                               settings)
            labels = merge_refined_labels(labels, refined, decided)
        return Prediction(labels.numpy(), probs, vocabulary.class_names)


def build_trident(cfg) -> Trident:
    """Build :class:`Trident` from a full config (``cfg.model``, ``cfg.text``)."""
    from ovseg.encoders import build_sam

    model_cfg = cfg.model
    device = resolve_device(model_cfg.device)
    return Trident(
        clip_from_config(model_cfg, device),
        dino_from_config(model_cfg, device),
        build_sam(model_cfg.sam.arch, model_cfg.sam.weights).to(device),
        settings_from_config(model_cfg.trident, TridentConfig),
        get_templates(cfg.text.templates),
        text_cache_dir=cfg.text.cache_dir or None,
    )
