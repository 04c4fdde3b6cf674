"""Mask-adapted CLIP's class ensemble and soft-mask semantic map.

Implements mask_adapted.md, "Ensemble and semantic map" and the CLIP-scores line of "Stage 2":

- CLIP region logits: 100 x cos(region, text) over the K vocabulary names plus the no-object
  embedding (:func:`clip_region_logits`); the no-object column is dropped **before** CLIP's
  softmax (:func:`clip_probabilities`).
- p_prop = softmax over K + 1 of the proposal logits, no-object column dropped afterwards (rows
  no longer sum to 1) (:func:`proposal_probabilities`).
- valid queries: p = p_prop^(1 - lambda) x p_clip^lambda; invalid queries (empty binary mask)
  keep p_prop^(1 - lambda); lambda <= 0: only the CLIP probabilities of valid queries
  (:func:`ensemble_probabilities`).
- semantic map = sum over queries of p(q, c) x sigmoid mask probability (q, h, w), soft
  (:func:`semantic_map`); resizing to the image and the argmax belong to the caller.

Lambda (CLIP_ENSEMBLE_WEIGHT) and the mask threshold per model and benchmark are data here
(:data:`CLIP_ENSEMBLE_WEIGHTS`, :data:`MASK_THRESHOLDS`) for configs to take over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovseg.errors import ConfigError

# CLIP_ENSEMBLE_WEIGHT (lambda) per released model and benchmark (catalog names). "default" is
# the value in the model's config file; the others come from the README's commands.
CLIP_ENSEMBLE_WEIGHTS: dict[str, dict[str, float]] = {
    "swin_b_vit_l14": {
        "default": 0.7,
        "ade20k_150": 0.7,
        "ade20k_847": 0.7,
        "pcontext_59": 0.6,
        "pcontext_459": 0.6,
        "voc_20": 0.45,
    },
    # guess: the R101c config's 0.7 also serves the benchmarks its README documents no value for
    "r101c_vit_b16": {"default": 0.7, "ade20k_150": 0.7},
}
# MASK_THR per released model: a pixel is in a mask when its probability is > this value
MASK_THRESHOLDS: dict[str, float] = {"swin_b_vit_l14": 0.4, "r101c_vit_b16": 0.5}
# CLIP's logit scale for region classification (fixed, not learnt)
CLIP_LOGIT_SCALE = 100.0


def clip_ensemble_weight(model: str, benchmark: str) -> float:
    """Lambda for a released ``model`` (``swin_b_vit_l14`` | ``r101c_vit_b16``) on a benchmark
    (catalog name); the model's config value where the README gives none."""
    if model not in CLIP_ENSEMBLE_WEIGHTS:
        raise ConfigError(
            f"no CLIP ensemble weight for model {model!r}; known: "
            f"{', '.join(CLIP_ENSEMBLE_WEIGHTS)}"
        )
    table = CLIP_ENSEMBLE_WEIGHTS[model]
    return table.get(benchmark, table["default"])


def clip_region_logits(
    region_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    no_object_embedding: torch.Tensor,
    scale: float = CLIP_LOGIT_SCALE,
) -> torch.Tensor:
    """Scaled cosines of regions against the vocabulary and the no-object embedding.

    Args:
        region_embeddings: (V, D) CLIP image embeddings of the V valid regions.
        text_embeddings: (K, D) text embeddings of the vocabulary.
        no_object_embedding: (D,) or (1, D).
        scale: the fixed logit scale (100).

    Returns:
        (V, K + 1) float32, the no-object column last.
    """
    texts = torch.cat([text_embeddings.float(), no_object_embedding.float().reshape(1, -1)])
    regions = F.normalize(region_embeddings.float(), dim=-1)
    return scale * regions @ F.normalize(texts, dim=-1).T


def proposal_probabilities(proposal_logits: torch.Tensor) -> torch.Tensor:
    """(Q, K + 1) proposal class logits (no-object last) -> (Q, K): softmax over all K + 1
    columns, then the no-object column dropped (rows sum to 1 - p(no object))."""
    return proposal_logits.float().softmax(dim=-1)[:, :-1]


def clip_probabilities(clip_logits: torch.Tensor) -> torch.Tensor:
    """(V, K + 1) CLIP region logits (no-object last) -> (V, K): the no-object column dropped
    **before** the softmax over the K names."""
    return clip_logits.float()[:, :-1].softmax(dim=-1)


def ensemble_probabilities(
    proposal_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    valid: torch.Tensor,
    clip_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities of the queries from the proposals' and CLIP's.

    Args:
        proposal_logits: (Q, K + 1) the proposal network's class logits, no-object last.
        clip_logits: (V, K + 1) CLIP's logits of the V valid queries, in query order
            (:func:`clip_region_logits`); V may be 0.
        valid: (Q,) bool, the queries whose binary mask is not empty (V of them).
        clip_weight: lambda (CLIP_ENSEMBLE_WEIGHT).

    Returns:
        probabilities: (Q', K) float32; lambda > 0: Q' = Q, valid rows
            p_prop^(1 - lambda) x p_clip^lambda, invalid rows p_prop^(1 - lambda);
            lambda <= 0: Q' = V, CLIP's probabilities only.
        queries: (Q,) bool, which queries the rows belong to (all when lambda > 0, ``valid``
            otherwise): pass ``mask_probs[queries]`` to :func:`semantic_map`.
    """
    valid = valid.to(device=proposal_logits.device, dtype=torch.bool)
    if clip_logits.shape[0] != int(valid.sum()):
        raise ValueError(
            f"clip_logits has {clip_logits.shape[0]} rows but {int(valid.sum())} queries are valid"
        )
    num_names = proposal_logits.shape[-1] - 1
    if clip_logits.shape[-1] != num_names + 1:
        raise ValueError(
            f"clip_logits has {clip_logits.shape[-1]} columns; expected {num_names} names + "
            "no-object"
        )
    p_clip = clip_probabilities(clip_logits.to(proposal_logits.device))
    if clip_weight <= 0:
        return p_clip, valid
    p_prop = proposal_probabilities(proposal_logits)
    # invalid queries: a CLIP factor of 1
    clip_factor = torch.ones_like(p_prop)
    clip_factor[valid] = p_clip
    probabilities = p_prop.pow(1.0 - clip_weight) * clip_factor.pow(clip_weight)
    return probabilities, torch.ones_like(valid)


def semantic_map(probabilities: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """Soft-mask semantic map: sum_q probabilities(q, c) x mask_probs(q, h, w).

    Args:
        probabilities: (Q, K) class probabilities (:func:`ensemble_probabilities`).
        mask_probs: (Q, h, w) sigmoid mask probabilities, not thresholded.

    Returns:
        (K, h, w) float32; zeros when Q = 0. The map is linear in the masks, so resizing
        (bilinear) commutes with it: a caller may resize a band of mask rows and apply this.
    """
    return torch.einsum("qk,qhw->khw", probabilities.float(), mask_probs.float())
