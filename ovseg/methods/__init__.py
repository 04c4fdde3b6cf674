"""Methods by name: ``ovseg.build_model(cfg)`` looks ``cfg.model.name`` up in ``METHODS``."""

from __future__ import annotations

from collections.abc import Callable

from ovseg.errors import ConfigError
from ovseg.methods.base import Prediction
from ovseg.methods.dense_clip import DenseClip, build_dense_clip
from ovseg.methods.linear_probe import build_linear_probe
from ovseg.methods.trident import build_trident

METHODS: dict[str, Callable] = {
    "dense_clip": build_dense_clip,
    "linear_probe": build_linear_probe,
    "trident": build_trident,
}


def build_model(cfg):
    """Build the method ``cfg.model.name`` from a config made by :func:`ovseg.get_config`."""
    name = cfg.model.name
    if name not in METHODS:
        raise ConfigError(f"model.name: unknown method {name!r}; one of {sorted(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["METHODS", "DenseClip", "Prediction", "build_model"]
