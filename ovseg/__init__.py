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
    """Build the method named by ``cfg.model.name`` from the registry in ``ovseg.methods``, and
    load ``cfg.model.weights`` (trained ovseg weights) into it when set, so the Python API, the
    demo and ``tools/train_net.py`` load them the same way (a missing or misfitting file is one
    ``CheckpointError`` line naming it)."""
    from ovseg.methods import build_model as _build_model

    model = _build_model(cfg)
    weights = str(cfg.model.weights or "")
    if weights:
        from ovseg.engine.checkpoint import load_trained_weights

        load_trained_weights(model, weights, include_frozen=cfg.solver.checkpoint_frozen)
    return model


__all__ = ["build_model", "get_config", "__version__"]
