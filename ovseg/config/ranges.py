"""Value ranges of the shared settings, checked when a config is loaded.

The schema types every key; this module says which values of a type make sense, so that a
`short_side -5` or a `window_batch 0` is one error naming the key and the allowed range at load
time, not a traceback deep inside a forward pass.
"""

from __future__ import annotations

from typing import Any

from ovseg.errors import ConfigError


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}: {value!r} is out of range; {allowed}")


def check_inference(section: Any, prefix: str = "model.inference") -> None:
    """``model.inference``: sizes in pixels, the window grid and its batch."""
    if section.short_side <= 0:
        _fail(f"{prefix}.short_side", section.short_side, "a positive number of pixels")
    if section.max_long_side <= 0:
        _fail(f"{prefix}.max_long_side", section.max_long_side, "a positive number of pixels")
    if section.crop < 0:
        _fail(f"{prefix}.crop", section.crop, "0 (the whole image) or a positive window side")
    if section.crop > section.max_long_side:
        _fail(f"{prefix}.crop", section.crop,
              f"at most model.inference.max_long_side ({section.max_long_side}): no resized "
              "image is that large")
    if section.crop > 0 and section.stride <= 0:
        _fail(f"{prefix}.stride", section.stride,
              "a positive number of pixels when windows are used (model.inference.crop > 0)")
    if section.crop > 0 and section.stride > section.crop:
        _fail(f"{prefix}.stride", section.stride,
              f"at most the crop ({section.crop}), or windows would leave gaps")
    if section.window_batch < 1:
        _fail(f"{prefix}.window_batch", section.window_batch, "at least 1 window per forward")
    if section.pad_multiple < 0:
        _fail(f"{prefix}.pad_multiple", section.pad_multiple, "0 (no padding) or positive")


def check_evaluation(section: Any, prefix: str = "evaluation") -> None:
    """``evaluation``: how often the resumable state is saved."""
    if section.checkpoint_every < 0:
        _fail(f"{prefix}.checkpoint_every", section.checkpoint_every,
              "0 (never save the evaluation state) or a positive number of images")


def check_ranges(cfg: Any) -> None:
    """Every range check that applies to a loaded config (its sections as the method has
    them)."""
    if "evaluation" in cfg:
        check_evaluation(cfg.evaluation)
    if "inference" in cfg.model:
        check_inference(cfg.model.inference)
    if cfg.model.max_image_pixels < 0:
        _fail("model.max_image_pixels", cfg.model.max_image_pixels,
              "0 (no limit) or a positive number of pixels")
    if "solver" in cfg and cfg.solver.lr_step_every < 1:
        _fail("solver.lr_step_every", cfg.solver.lr_step_every,
              "at least 1 iteration (1 = the schedule moves every iteration)")
