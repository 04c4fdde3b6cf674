"""ovseg: open-vocabulary dense prediction with CLIP, DINO and SAM."""

from __future__ import annotations

__version__ = "0.1.0"


def get_config(path_or_name, overrides=()):
    """Load a YAML config (with ``_base_`` inheritance) and apply ``KEY VALUE`` overrides.

    The config holds the sections of the method ``model.name`` names, and only those.
    """
    from ovseg.config import get_config as _get_config
    from ovseg.methods import METHODS

    return _get_config(path_or_name, overrides, METHODS)


def build_model(cfg):
    """Build the method named by ``cfg.model.name`` from the registry in ``ovseg.methods``."""
    from ovseg.methods import build_model as _build_model

    return _build_model(cfg)


__all__ = ["build_model", "get_config", "__version__"]
