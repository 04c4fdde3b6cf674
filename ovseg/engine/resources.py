"""How much memory one process of a run needs, estimated before any process starts.

``--num-gpus N`` on a machine without GPUs starts N CPU processes, each with its own copy of
the model; the launcher compares N times this estimate with the memory available and refuses
clearly instead of letting the kernel kill a worker an hour in.

The estimate is a floor, not a measurement: the frozen encoders' parameters (a local weights
file's size, else the architecture built on PyTorch's ``meta`` device, which allocates nothing)
plus a fixed allowance for the runtime and activations.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# the Python runtime, torch, a batch's activations and the text classifiers of one process
RUNTIME_BYTES = 1 << 30


def _local_file_bytes(spec: str) -> int | None:
    path = Path(spec.strip()).expanduser() if spec.strip() else None
    return path.stat().st_size if path is not None and path.is_file() else None


def _meta_parameter_bytes(encoder: str, section) -> int:
    """Bytes of the encoder's parameters in float32, built on the meta device (0 when the
    architecture cannot be built that way: the estimate stays a floor)."""
    arch = str(section.arch)
    try:
        if encoder == "clip":
            import open_clip

            from ovseg.encoders.clip import register_tiny_configs

            register_tiny_configs()
            model = open_clip.create_model(arch, device="meta")
        elif encoder == "dino":
            import timm

            if not timm.is_model(arch):
                return 0  # the tiny test models: a few MB
            with torch.device("meta"):
                model = timm.create_model(arch, pretrained=False)
        elif encoder == "sam":
            from segment_anything import sam_model_registry

            if arch not in ("vit_b", "vit_l", "vit_h"):
                return 0
            with torch.device("meta"):
                model = sam_model_registry[arch]()
        else:
            return 0
    except Exception as error:  # an estimate must never stop a run
        logger.debug("no memory estimate for %s %s: %s", encoder, arch, error)
        return 0
    return sum(p.numel() for p in model.parameters()) * 4


def process_memory_bytes(cfg) -> tuple[int, str]:
    """(bytes, what they are made of) that one process of ``cfg`` needs at least."""
    from ovseg.methods import METHODS

    total, parts = RUNTIME_BYTES, []
    method = METHODS.get(str(cfg.model.name))
    encoders = method.built_encoders(cfg) if method is not None else ("clip", "dino", "sam")
    for encoder in encoders:
        section = cfg.model.get(encoder)
        if section is None:
            continue
        size = _local_file_bytes(str(section.weights))
        if size is None:
            size = _meta_parameter_bytes(encoder, section)
        if size:
            total += size
            parts.append(f"{encoder} {section.arch} {size / 2**30:.1f} GiB")
    trained = _local_file_bytes(str(cfg.model.get("weights", "") or ""))
    if trained:
        total += trained
        parts.append(f"model.weights {trained / 2**30:.1f} GiB")
    parts.append(f"runtime {RUNTIME_BYTES / 2**30:.0f} GiB")
    return total, " + ".join(parts)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

