"""Set losses of a mask proposal network (MaskFormer v1), with deep supervision.

Implements mask_adapted.md, "Stage 1: mask proposal network", the losses sentence: after
Hungarian matching (:mod:`ovseg.modeling.matcher`), cross-entropy weight 1 with the no-object
class weighted 0.1, sigmoid focal x 20 and dice x 1 on full masks (predictions bilinearly
upsampled to the ground truth's size; no point sampling); the same losses, with the same
weights, on each intermediate decoder layer's output (deep supervision, matched anew).

Normalisation, per term:

- ``loss_ce``: cross-entropy over the K + 1 classes of all B x Q queries, unmatched queries'
  target being no-object (index K); the weighted mean sum(w_i ce_i) / sum(w_i), w = 1 for a
  class and 0.1 for no-object;
- ``loss_mask``: per matched mask, the focal loss averaged over its pixels
  (alpha 0.25, gamma 2); summed over masks, divided by the number of target masks;
- ``loss_dice``: per matched mask, 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1); summed,
  divided by the number of target masks.

The number of target masks is the batch's, averaged over processes when torch.distributed is
initialised, and at least 1. Each returned term is already weighted; the total is their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ovseg.modeling.matcher import HungarianMatcher, MaskTargets


@dataclass
class MaskPredictions:
    """One decoder layer's predictions for a batch.

    class_logits: (B, Q, K + 1), no-object last.
    mask_logits: (B, Q, h, w) mask logits (the network's resolution, e.g. 1/4 of the input).
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor


def sigmoid_focal_loss(
    mask_logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-mask sigmoid focal loss, averaged over pixels.

    Args:
        mask_logits: (m, P) logits; targets: (m, P) float 0/1.

    Returns:
        (m,) float32: mean_p alpha_t (1 - p_t)^gamma bce(x, t).
    """
    mask_logits, targets = mask_logits.float(), targets.float()
    prob = mask_logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean(dim=1)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1), s = sigmoid.

    Args:
        mask_logits: (m, P) logits; targets: (m, P) float 0/1.

    Returns:
        (m,) float32.
    """
    prob, targets = mask_logits.float().sigmoid(), targets.float()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def count_target_masks(targets: Sequence[MaskTargets], device: torch.device) -> float:
    """Target masks in the batch, averaged over processes when distributed; at least 1."""
    count = torch.tensor(float(sum(len(t) for t in targets)), device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return max(float(count) / world, 1.0)


class MaskCriterion(nn.Module):
    """Matching + weighted CE / focal / dice losses, on the final and intermediate outputs.

    Args:
        matcher: the Hungarian matcher (default: costs 1 / 20 / 1).
        class_weight, focal_weight, dice_weight: loss weights (1, 20, 1).
        no_object_weight: the CE weight of the no-object class (0.1).
        alpha, gamma: the focal loss's (0.25, 2).
    """

    def __init__(self, matcher: HungarianMatcher | None = None, class_weight: float = 1.0,
                 focal_weight: float = 20.0, dice_weight: float = 1.0,
                 no_object_weight: float = 0.1, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.class_weight = class_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.alpha = alpha
        self.gamma = gamma

    def forward(
        self,
        outputs: MaskPredictions,
        targets: Sequence[MaskTargets],
        aux_outputs: Sequence[MaskPredictions] = (),
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of a batch.

        Args:
            outputs: the last decoder layer's predictions.
            targets: B images' ground truth.
            aux_outputs: the intermediate decoder layers' predictions (5 for MaskFormer),
                each matched and weighted like ``outputs``.

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` (weighted scalars), and for aux layer i
            the same names with suffix ``_i``.
        """
        num_masks = count_target_masks(targets, outputs.class_logits.device)
        losses = self.layer_losses(outputs, targets, num_masks)
        for index, aux in enumerate(aux_outputs):
            for name, value in self.layer_losses(aux, targets, num_masks).items():
                losses[f"{name}_{index}"] = value
        return losses

    def layer_losses(
        self, outputs: MaskPredictions, targets: Sequence[MaskTargets], num_masks: float
    ) -> dict[str, torch.Tensor]:
        """The three weighted losses of one decoder layer, matched on its own predictions."""
        class_logits, mask_logits = outputs.class_logits, outputs.mask_logits
        indices = self.matcher(class_logits.detach(), mask_logits.detach(), list(targets))
        return {
            "loss_ce": self.class_weight * self.classification_loss(class_logits, targets,
                                                                    indices),
            **self._mask_losses(mask_logits, targets, indices, num_masks),
        }

    def classification_loss(
        self,
        class_logits: torch.Tensor,
        targets: Sequence[MaskTargets],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Unweighted CE over (B, Q, K + 1); unmatched queries' target is no-object (K)."""
        batch, _, classes = class_logits.shape
        device = class_logits.device
        target_classes = torch.full(class_logits.shape[:2], classes - 1, dtype=torch.int64,
                                    device=device)
        for b, (queries, matched) in enumerate(indices):
            target_classes[b, queries.to(device)] = targets[b].labels.to(device)[matched.to(device)]
        weight = torch.ones(classes, device=device)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight)

    def _mask_losses(self, mask_logits, targets, indices, num_masks) -> dict[str, torch.Tensor]:
        focal, dice = [], []
        for b, (queries, matched) in enumerate(indices):
            if queries.numel() == 0:
                continue
            target = targets[b].masks[matched.to(targets[b].masks.device)]
            # full masks: the matched predictions upsampled to the ground truth's size (per
            # image; the reference pads a batch's targets to one size, which is the same for the
            # spec's fixed-size crops)
            predicted = F.interpolate(
                mask_logits[b, queries.to(mask_logits.device)][:, None].float(),
                size=target.shape[-2:], mode="bilinear", align_corners=False,
            )[:, 0].flatten(1)
            target = target.to(device=predicted.device, dtype=torch.float32).flatten(1)
            focal.append(sigmoid_focal_loss(predicted, target, self.alpha, self.gamma))
            dice.append(dice_loss(predicted, target))
        if not focal:  # no target in the batch: zero, still connected to the graph
            zero = mask_logits.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        return {
            "loss_mask": self.focal_weight * torch.cat(focal).sum() / num_masks,
            "loss_dice": self.dice_weight * torch.cat(dice).sum() / num_masks,
        }
