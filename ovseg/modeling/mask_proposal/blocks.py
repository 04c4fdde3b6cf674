"""Small layers of the mask proposal network, named so that detectron2 checkpoints map onto them.

- :class:`FrozenBatchNorm2d`: batch norm with fixed statistics and affine terms, all buffers
  (``weight``, ``bias``, ``running_mean``, ``running_var``; eps 1e-5), detectron2's ``FrozenBN``;
- :class:`ConvNorm`: a ``Conv2d`` whose normalisation is its child ``norm`` and whose optional
  activation follows it (detectron2's ``layers.Conv2d``), so a key reads ``conv.weight`` and
  ``conv.norm.weight`` as in the authors' files;
- :func:`make_norm`: ``FrozenBN`` / ``BN`` / ``GN`` (32 groups, detectron2's ``get_norm``) / none;
- :class:`MLP`: Linear layers with ReLU between them, ``layers.N`` (DETR's MLP);
- the two initialisations of caffe2 that detectron2 uses (``c2_xavier_fill``, ``c2_msra_fill``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("FrozenBN", "BN", "GN", "")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (no gradient, no update).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(norm: str, channels: int, gn_groups: int = 32) -> nn.Module | None:
    """The normalisation layer named ``norm`` for ``channels`` channels (None for "")."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(gn_groups, channels)
    if norm == "":
        return None
    raise ValueError(f"unknown norm {norm!r}; one of {', '.join(repr(n) for n in NORMS)}")


class ConvNorm(nn.Conv2d):
    """Conv2d -> optional ``norm`` child -> optional activation (detectron2's Conv2d).

    Args:
        norm: a module applied after the convolution (its keys sit under ``.norm``) or None.
        activation: a function applied last (e.g. ``F.relu``) or None.
        other arguments: those of ``nn.Conv2d``.
    """

    def __init__(self, *args, norm: nn.Module | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Conv2d | nn.Linear) -> None:
    """caffe2's XavierFill: kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_msra_fill(module: nn.Conv2d | nn.Linear) -> None:
    """caffe2's MSRAFill: kaiming-normal, fan-out, ReLU gain; zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MLP(nn.Module):
    """``num_layers`` Linear layers, ReLU after all but the last: in -> hidden ... -> out.

    Args:
        in_dim, hidden_dim, out_dim: widths; num_layers: Linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x
