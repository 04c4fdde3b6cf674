"""Resolve the configured device string, with a clear error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from ovseg.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cuda"`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.device: {name!r} is not a device (cpu, cuda, cuda:1, auto)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but no CUDA GPU is available; use cpu")
    return device
