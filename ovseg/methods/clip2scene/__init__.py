"""CLIP2Scene (specs/clip2scene.md): a MinkUNet student distilled from MaskCLIP on ScanNet.

``model``: the settings, the student, the frozen teacher and zero-shot 3D inference;
``training``: scenes with paired frames, the losses and the self-training switch (imported
by the model's training hooks only when it trains).
"""

from ovseg.methods.clip2scene.model import Clip2Scene, Clip2SceneConfig, build_clip2scene

__all__ = ["Clip2Scene", "Clip2SceneConfig", "build_clip2scene"]
