"""Hungarian matching of predicted masks to ground-truth masks (MaskFormer v1).

Implements mask_adapted.md, "Stage 1: mask proposal network", the matching sentence: cost =
1 x (-p_class) + 20 x sigmoid focal (alpha 0.25, gamma 2) + 1 x dice, the ground-truth masks
nearest-downsampled to the prediction's size, solved with scipy's ``linear_sum_assignment``.

- p_class: softmax over the K + 1 class logits (no-object last), at each target's class;
- focal: the sigmoid focal loss of a predicted mask against a target mask, averaged over the
  pixels: mean_p [alpha t (1 - s)^gamma bce(x, 1) + (1 - alpha)(1 - t) s^gamma bce(x, 0)];
- dice: 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1), s = sigmoid(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


@dataclass
class MaskTargets:
    """The ground truth of one image.

    labels: (n,) int64 class indices in [0, K).
    masks: (n, H, W) bool or float 0/1 masks at the image's (label's) resolution.
    """

    labels: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def pairwise_focal_cost(
    mask_logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss of every prediction against every target, averaged over pixels.

    Args:
        mask_logits: (Q, P) mask logits, flattened pixels.
        targets: (n, P) float 0/1 target masks on the same pixels.

    Returns:
        (Q, n) float32.
    """
    mask_logits, targets = mask_logits.float(), targets.float()
    prob = mask_logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(
        mask_logits, torch.ones_like(mask_logits), reduction="none"
    )
    negative = (1 - alpha) * prob**gamma * F.binary_cross_entropy_with_logits(
        mask_logits, torch.zeros_like(mask_logits), reduction="none"
    )
    cost = positive @ targets.T + negative @ (1 - targets).T
    return cost / mask_logits.shape[1]


def pairwise_dice_cost(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1) of every prediction against every
    target, s = sigmoid(mask_logits).

    Args:
        mask_logits: (Q, P); targets: (n, P) float 0/1.

    Returns:
        (Q, n) float32.
    """
    prob, targets = mask_logits.float().sigmoid(), targets.float()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def optimal_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, n) cost matrix (Q >= n: every target gets a
    query). Returns (query indices, target indices), (min(Q, n),) int64 each, queries
    increasing."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().float().numpy())
    return (torch.as_tensor(np.asarray(rows), dtype=torch.int64),
            torch.as_tensor(np.asarray(cols), dtype=torch.int64))


class HungarianMatcher:
    """Matches each image's targets to queries by the weighted class + focal + dice cost.

    Args:
        class_weight, focal_weight, dice_weight: the cost weights (1, 20, 1).
        alpha, gamma: the focal cost's (0.25, 2).
    """

    def __init__(self, class_weight: float = 1.0, focal_weight: float = 20.0,
                 dice_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0):
        self.class_weight = class_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: MaskTargets
    ) -> torch.Tensor:
        """The (Q, n) matching cost of one image.

        Args:
            class_logits: (Q, K + 1), no-object last.
            mask_logits: (Q, h, w) mask logits at the prediction's resolution.
            targets: n targets; their masks are nearest-resized to (h, w).
        """
        num_queries = class_logits.shape[0]
        if len(targets) == 0:
            return class_logits.new_zeros((num_queries, 0), dtype=torch.float32)
        prob = class_logits.float().softmax(-1)
        class_cost = -prob[:, targets.labels.to(prob.device)]
        target_masks = F.interpolate(
            targets.masks[:, None].to(device=mask_logits.device, dtype=torch.float32),
            size=mask_logits.shape[-2:], mode="nearest",
        )[:, 0]
        predictions, target_masks = mask_logits.flatten(1), target_masks.flatten(1)
        focal = pairwise_focal_cost(predictions, target_masks, self.alpha, self.gamma)
        dice = pairwise_dice_cost(predictions, target_masks)
        return (self.class_weight * class_cost + self.focal_weight * focal
                + self.dice_weight * dice)

    @torch.no_grad()
    def __call__(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[MaskTargets]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match a batch.

        Args:
            class_logits: (B, Q, K + 1); mask_logits: (B, Q, h, w); targets: B of them.

        Returns:
            per image, (query indices, target indices), each (n_b,) int64 on the CPU.
        """
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {class_logits.shape[0]}")
        return [
            optimal_assignment(self.cost_matrix(class_logits[b], mask_logits[b], target))
            for b, target in enumerate(targets)
        ]
