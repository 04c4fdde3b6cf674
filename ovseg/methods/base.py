"""What every method's ``predict`` returns, and the interface a dense predictor offers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Prediction:
    """A dense open-vocabulary prediction for one image.

    labels: (H, W) int64, an index into ``classes`` for every pixel of the input image.
    logits: (C, H, W) float32 class scores (after max over each class's synonyms).
    classes: the C display names, in vocabulary order.
    """

    labels: np.ndarray
    logits: torch.Tensor
    classes: list[str]
