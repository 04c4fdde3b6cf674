"""Frozen feature extractors: the only modules that import open_clip, timm and segment_anything."""

from ovseg.encoders.clip import CLIP_MODES, TINY_CLIP, ClipDenseOutput, ClipEncoder, build_clip
from ovseg.encoders.dino import DinoEncoder, DinoFeatures, build_dino
from ovseg.encoders.sam import SamEncoder, SamFeatures, build_sam

__all__ = [
    "CLIP_MODES", "TINY_CLIP", "ClipDenseOutput", "ClipEncoder", "DinoEncoder", "DinoFeatures",
    "SamEncoder", "SamFeatures", "build_clip", "build_dino", "build_sam",
]
