"""Methods by name: ``ovseg.build_model(cfg)`` looks ``cfg.model.name`` up in ``METHODS``.

Each entry pairs a builder with the settings dataclass that sits beside the method's code and
names the shared sections of ``cfg.model`` it reads; ``ovseg.get_config`` builds a config's
schema from it. Adding a method is one module and one line here.
"""

from __future__ import annotations

from ovseg.config.method import Method
from ovseg.errors import ConfigError
from ovseg.methods.base import Prediction
from ovseg.methods.clip2scene import Clip2SceneConfig, build_clip2scene
from ovseg.methods.clip_dinoiser import ClipDinoiserConfig, build_clip_dinoiser
from ovseg.methods.cloc import ClocConfig, build_cloc
from ovseg.methods.dense_clip import (
    DenseClip,
    DenseClipConfig,
    PamrConfig,
    build_dense_clip,
    dense_clip_encoders,
)
from ovseg.methods.linear_probe import build_linear_probe
from ovseg.methods.mask_adapted import MaskAdaptedConfig, build_mask_adapted
from ovseg.methods.sam_refine import RefineConfig
from ovseg.methods.trident import TridentConfig, build_trident

METHODS: dict[str, Method] = {
    "clip2scene": Method(build_clip2scene, Clip2SceneConfig, reads=("clip",)),
    "clip_dinoiser": Method(build_clip_dinoiser, ClipDinoiserConfig,
                            reads=("clip", "dino", "inference")),
    "cloc": Method(build_cloc, ClocConfig, reads=("clip",)),
    "dense_clip": Method(build_dense_clip, DenseClipConfig,
                         reads=("clip", "dino", "sam", "inference"),
                         extra={"pamr": PamrConfig, "refine": RefineConfig},
                         encoders=dense_clip_encoders),
    "linear_probe": Method(build_linear_probe, reads=("clip", "inference")),
    "mask_adapted": Method(build_mask_adapted, MaskAdaptedConfig, reads=("clip", "inference")),
    "trident": Method(build_trident, TridentConfig, reads=("clip", "dino", "sam", "inference"),
                      extra={"refine": RefineConfig}),
}


def build_model(cfg):
    """Build the method ``cfg.model.name`` from a config made by :func:`ovseg.get_config`."""
    name = cfg.model.name
    if name not in METHODS:
        raise ConfigError(f"model.name: unknown method {name!r}; one of {sorted(METHODS)}")
    model = METHODS[name].build(cfg)
    if hasattr(model, "max_image_pixels"):  # the 2D methods: their input size limit
        model.max_image_pixels = int(cfg.model.max_image_pixels)
    return model


__all__ = ["METHODS", "DenseClip", "Method", "Prediction", "build_model"]
