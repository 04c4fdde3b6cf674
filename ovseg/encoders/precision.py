"""Inference precision of the frozen encoders: ``model.precision`` fp32 | fp16 | bf16.

The references run CLIP, DINO and SAM's image encoder in fp16 on GPUs. Here the image sides of
the encoders are cast (``ClipEncoder.set_precision`` and its DINO and SAM siblings); inputs are
cast to the weights' dtype inside each encoder, and what the methods compute from the
encoders' outputs (cosines, probabilities, SAM's prompt encoder and mask decoder, CLIP's text
tower) stays float32. fp32, the default, changes no arithmetic.
"""

from __future__ import annotations

import torch

from ovseg.errors import ConfigError

CONFIG_KEY = "model.precision"
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def precision_dtype(name: str) -> torch.dtype:
    """The encoder dtype of a ``model.precision`` value. Every value runs on a CPU too (with
    the pinned torch; bf16 is fast there, fp16 about as slow as fp32).

    Raises:
        ConfigError: an unknown value (one line naming the key and the allowed values).
    """
    if name not in PRECISIONS:
        raise ConfigError(
            f"{CONFIG_KEY}: unknown precision {name!r}; one of {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[name]
