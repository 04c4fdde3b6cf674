"""Config schema of the Trident method (specs/trident.md): every default of the spec is a field.

``model.trident`` holds the method's numbers; the encoders come from ``model.clip``,
``model.dino`` and ``model.sam``. The per-benchmark values (short side, stride, cos_fac,
thresholds) are set by the files in ``configs/trident/``; the defaults here are the authors'
code defaults where the spec names one, else the VOC-21 row.
"""

from __future__ import annotations

from dataclasses import dataclass

TRIDENT_COMPAT = ("fixed", "reference")


@dataclass
class TridentConfig:
    # step 0: mmseg keep-ratio resize to (max_long_side, short_side), then sides to multiples of
    # the CLIP patch, each at least `crop`
    short_side: int = 448
    max_long_side: int = 2048
    # step 1: sliding windows (the last one shifted inward, no padding)
    crop: int = 336
    stride: int = 224
    window_batch: int = 8  # windows per CLIP/DINO forward: bounds memory, not the image size
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
    # step 8: SAM refinement of the coarse labels (the one on/off switch)
    refine: bool = True
    coarse_thresh: float = 0.10  # ct: pixels and classes below it are not refined
    min_component: int = 225  # pixels (at half resolution) of the smallest refined component
    iou_thresh: float = 0.8  # keep SAM's mask when its predicted IoU is above this
    mask_prompt_scale: float = 0.005  # mask prompt = probability x this where probability > ct
    # "fixed": the spec's known faults corrected; "reference": refinement prompts scaled from
    # the half-resolution size and the mask prompt passed unbatched, as the authors' code does
    compat: str = "fixed"
