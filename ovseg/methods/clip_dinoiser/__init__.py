"""CLIP-DINOiser (specs/clip_dinoiser.md): MaskCLIP features pooled by learned correlations.

``model``: the settings, the network and inference; ``training``: teacher targets, losses,
data and optimizer groups (imported by the model's training hooks only when it trains).
"""

from ovseg.methods.clip_dinoiser.model import (
    ClipDinoiser,
    ClipDinoiserConfig,
    ClipDinoiserState,
    build_clip_dinoiser,
)

__all__ = ["ClipDinoiser", "ClipDinoiserConfig", "ClipDinoiserState", "build_clip_dinoiser"]
