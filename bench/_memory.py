"""Peak memory of one prediction, measured inside a child process (shared by the benchmarks)."""

from __future__ import annotations

import json
import resource

import numpy as np
import torch


def print_peak_memory_of_predict(model, side: int, vocabulary: str, device: str) -> None:
    """Run ``model.predict`` on a random side x side image; print {"peak_mib": ...} as JSON.

    CPU: the process's max resident set (so call it in a fresh process); CUDA: peak allocated.
    """
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model.predict(image, vocabulary)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))
