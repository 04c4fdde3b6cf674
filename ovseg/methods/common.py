"""Pieces every method builds the same way: encoders from config, settings, text classifiers."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ovseg.text import build_text_classifier


def settings_from_config(node, kind):
    """A config section as its schema dataclass (plain Python values, no OmegaConf nodes)."""
    return kind(**OmegaConf.to_container(node, resolve=True))


def encoder_dtype(model_cfg) -> torch.dtype:
    """The dtype of the frozen image encoders, ``cfg.model.precision`` (fp32 | fp16 | bf16).

    Raises:
        ConfigError: an unknown value.
    """
    from ovseg.encoders.precision import precision_dtype

    return precision_dtype(str(model_cfg.precision))


def clip_from_config(model_cfg, device: torch.device):
    """The CLIP encoder of ``cfg.model.clip`` on ``device``, its image tower in
    ``cfg.model.precision``."""
    from ovseg.encoders import build_clip

    dtype = encoder_dtype(model_cfg)
    return build_clip(model_cfg.clip, device).set_precision(dtype)


def dino_from_config(model_cfg, device: torch.device):
    """The DINO encoder of ``cfg.model.dino`` on ``device``, in ``cfg.model.precision``."""
    from ovseg.encoders import build_dino

    dtype = encoder_dtype(model_cfg)
    return build_dino(model_cfg.dino, device).set_precision(dtype)


def sam_from_config(model_cfg, device: torch.device):
    """The SAM encoder of ``cfg.model.sam`` (a named or a custom size) on ``device``, its image
    encoder in ``cfg.model.precision`` (prompt encoder and mask decoder fp32)."""
    from ovseg.encoders import build_sam

    dtype = encoder_dtype(model_cfg)
    return build_sam(model_cfg.sam, device).set_precision(dtype)


class TextClassifiers:
    """Text classifiers of one CLIP, one per list of names: kept in memory and on disk.

    ``classifiers(names)`` -> (N_names, D) normalised, template-averaged embeddings on the
    CLIP's device; a vocabulary seen before costs no text-encoder forward.
    """

    def __init__(self, clip, templates: list[str], cache_dir: str | None = None):
        self.clip = clip
        self.templates = templates
        self.cache_dir = cache_dir
        self._in_memory: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, names: list[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._in_memory:
            self._in_memory[key] = build_text_classifier(
                self.clip.encode_text, names, self.templates, model_id=self.clip.name,
                cache_dir=self.cache_dir,
            ).to(self.clip.mean.device)
        return self._in_memory[key]
