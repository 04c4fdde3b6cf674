"""Frozen feature extractors: the only modules that import open_clip, timm and segment_anything."""

from ovseg.encoders.clip import TINY_CLIP, ClipEncoder, ClipIntermediates, build_clip
from ovseg.encoders.dino import DinoEncoder, DinoFeatures, build_dino
from ovseg.encoders.sam import SamEncoder, SamFeatures, SamSize, build_sam

__all__ = [
    "TINY_CLIP", "ClipEncoder", "ClipIntermediates", "DinoEncoder", "DinoFeatures",
    "SamEncoder", "SamFeatures", "SamSize", "build_clip", "build_dino", "build_sam",
]
