"""Mask-adapted CLIP (OVSeg, specs/mask_adapted.md): mask proposals classified by a CLIP adapted
to masked images, ensembled with the proposals' own classes.

``model``: the settings, the network and inference; ``training``: the three training stages
(proposals, CLIP fine-tuning, mask prompt tuning), imported by the model's training hooks only.
"""

from ovseg.methods.mask_adapted.model import (
    MaskAdapted,
    MaskAdaptedConfig,
    MaskAdaptedState,
    build_mask_adapted,
)

__all__ = ["MaskAdapted", "MaskAdaptedConfig", "MaskAdaptedState", "build_mask_adapted"]
