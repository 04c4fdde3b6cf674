"""MinkUNet14A / 18A: CLIP2Scene's ScanNet student, on our sparse convolutions (clip2scene.md).

The network of the reference's ``model/minkunet.py`` (MinkowskiEngine's res16unet family):
``conv0p1s1`` (kernel 3 = the reference config's ``kernel_size``, 3 -> 32) + BN + ReLU, four
stages of [kernel-2 stride-2 conv + BN + ReLU + BasicBlocks], four decoder stages of
[kernel-2 transposed conv + BN + ReLU, concatenation with the encoder skip, BasicBlocks], then
two 1x1 heads 96 -> 512 with bias: ``final`` (semantic loss and inference) and ``local``
(the reference's ``local_feature``, spatial loss). PLANES (32, 64, 128, 256, 128, 128, 96, 96),
INIT_DIM 32; LAYERS 1 per stage for 14A, 2 for 18A. Input: RGB / 127.5 - 1 in [-1, 1] on
centred 5 cm voxels, each voxel with its first point's colour (:func:`student_input`).

The authors' MinkowskiEngine checkpoint loads through :data:`AUTHOR_KEY_RENAMES` (BatchNorm
``X.bn.*`` -> ``X.*``, ``local_feature.*`` -> ``local.*``); every kernel and bias keeps
MinkowskiEngine's shape, so nothing is reshaped. :func:`load_authors_checkpoint` is strict: a
key without a partner or a wrong shape is one ``WeightsError`` line.

API::

    net = MinkUNet(MINKUNET_14A)
    x, voxels = student_input([points], [colors])  # (N, 3) metres, (N, 3) 0..255
    out = net(x)  # MinkUNetOutput: features (M, 96), final (M, 512), local (M, 512)
    load_authors_checkpoint(net, "clip2scene_scannet.pth")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ovseg.errors import WeightsError
from ovseg.io import describe_mismatch
from ovseg.layers.sparse import (
    DEFAULT_VOXEL_SIZE,
    SparseBatchNorm,
    SparseConv3d,
    SparseReLU,
    SparseTensor,
    Voxels,
    batch_coordinates,
    cat,
    voxelize,
)
from ovseg.modeling.files import read_tensor_file

MINKUNET_CONFIG_KEY = "model.clip2scene.student_weights"


@dataclass(frozen=True)
class MinkUNetPlan:
    """Widths and depths of a MinkUNet (MinkowskiEngine's class attributes)."""

    planes: tuple[int, ...] = (32, 64, 128, 256, 128, 128, 96, 96)
    layers: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1, 1)
    init_dim: int = 32
    in_channels: int = 3  # RGB
    conv0_kernel: int = 3  # the reference config's kernel_size
    head_dim: int = 512  # CLIP ViT-B/16's embedding
    bn_momentum: float = 0.05  # the reference config's bn_momentum (stage and shortcut BNs)

    def __post_init__(self) -> None:
        if len(self.planes) != 8 or len(self.layers) != 8:
            raise ValueError("a MinkUNet plan has 8 planes and 8 layer counts")


MINKUNET_14A = MinkUNetPlan()
MINKUNET_18A = MinkUNetPlan(layers=(2, 2, 2, 2, 2, 2, 2, 2))
MINKUNET_PLANS = {"MinkUNet14A": MINKUNET_14A, "MinkUNet18A": MINKUNET_18A}


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3x3 convs (no bias) with BN, a 1x1 conv + BN shortcut when
    the width changes (MinkowskiEngine's ``BasicBlock``; BN momentum 0.1 as there)."""

    def __init__(self, in_planes: int, planes: int, bn_momentum: float, backend: str):
        super().__init__()
        self.conv1 = SparseConv3d(in_planes, planes, 3, backend=backend)
        self.norm1 = SparseBatchNorm(planes)
        self.conv2 = SparseConv3d(planes, planes, 3, backend=backend)
        self.norm2 = SparseBatchNorm(planes)
        self.relu = SparseReLU()
        self.downsample = None
        if in_planes != planes:
            self.downsample = nn.Sequential(
                SparseConv3d(in_planes, planes, 1, backend=backend),
                SparseBatchNorm(planes, momentum=bn_momentum),
            )

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out.with_feats(out.feats + residual.feats))


class MinkUNetOutput(NamedTuple):
    """Per-voxel outputs, rows in the input's coordinate order."""

    features: Tensor  # (M, planes[7]) block8 output
    final: Tensor  # (M, head_dim): semantic loss and inference
    local: Tensor  # (M, head_dim): spatial loss


class MinkUNet(nn.Module):
    """MinkowskiEngine's MinkUNet (res16unet) with CLIP2Scene's two 1x1 heads.

    Args:
        plan: widths and depths (:data:`MINKUNET_14A`, :data:`MINKUNET_18A`).
        backend: sparse-convolution backend, "torch", "spconv" or "auto".
    """

    def __init__(self, plan: MinkUNetPlan = MINKUNET_14A, backend: str = "torch"):
        super().__init__()
        self.plan = plan
        planes, layers, momentum = plan.planes, plan.layers, plan.bn_momentum

        def conv(cin: int, cout: int, kernel: int, stride: int = 1, transposed: bool = False,
                 bias: bool = False) -> SparseConv3d:
            return SparseConv3d(cin, cout, kernel, stride, bias, transposed, backend)

        def norm(width: int) -> SparseBatchNorm:
            return SparseBatchNorm(width, momentum=momentum)

        def stage(cin: int, width: int, count: int) -> nn.Sequential:
            blocks = [BasicBlock(cin, width, momentum, backend)]
            blocks += [BasicBlock(width, width, momentum, backend) for _ in range(count - 1)]
            return nn.Sequential(*blocks)

        init = plan.init_dim
        self.conv0p1s1 = conv(plan.in_channels, init, plan.conv0_kernel)
        self.bn0 = norm(init)
        self.conv1p1s2 = conv(init, init, 2, 2)
        self.bn1 = norm(init)
        self.block1 = stage(init, planes[0], layers[0])
        self.conv2p2s2 = conv(planes[0], planes[0], 2, 2)
        self.bn2 = norm(planes[0])
        self.block2 = stage(planes[0], planes[1], layers[1])
        self.conv3p4s2 = conv(planes[1], planes[1], 2, 2)
        self.bn3 = norm(planes[1])
        self.block3 = stage(planes[1], planes[2], layers[2])
        self.conv4p8s2 = conv(planes[2], planes[2], 2, 2)
        self.bn4 = norm(planes[2])
        self.block4 = stage(planes[2], planes[3], layers[3])
        self.convtr4p16s2 = conv(planes[3], planes[4], 2, 2, transposed=True)
        self.bntr4 = norm(planes[4])
        self.block5 = stage(planes[4] + planes[2], planes[4], layers[4])
        self.convtr5p8s2 = conv(planes[4], planes[5], 2, 2, transposed=True)
        self.bntr5 = norm(planes[5])
        self.block6 = stage(planes[5] + planes[1], planes[5], layers[5])
        self.convtr6p4s2 = conv(planes[5], planes[6], 2, 2, transposed=True)
        self.bntr6 = norm(planes[6])
        self.block7 = stage(planes[6] + planes[0], planes[6], layers[6])
        self.convtr7p2s2 = conv(planes[6], planes[7], 2, 2, transposed=True)
        self.bntr7 = norm(planes[7])
        self.block8 = stage(planes[7] + init, planes[7], layers[7])
        self.final = conv(planes[7], plan.head_dim, 1, bias=True)
        self.local = conv(planes[7], plan.head_dim, 1, bias=True)
        self.relu = SparseReLU()

    def forward(self, x: SparseTensor) -> MinkUNetOutput:
        """Per-voxel features and heads of a stride-1 (M, in_channels) sparse tensor."""
        if x.stride != 1 or x.feats.shape[1] != self.plan.in_channels:
            raise ValueError(f"MinkUNet expects a stride-1 tensor with {self.plan.in_channels} "
                             f"channels, got stride {x.stride}, {x.feats.shape[1]} channels")
        relu = self.relu
        out_p1 = relu(self.bn0(self.conv0p1s1(x)))
        out_b1p2 = self.block1(relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(relu(self.bn4(self.conv4p8s2(out_b3p8))))
        out = relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(cat(out, out_b3p8))
        out = relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(cat(out, out_b2p4))
        out = relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(cat(out, out_b1p2))
        out = relu(self.bntr7(self.convtr7p2s2(out)))
        features = self.block8(cat(out, out_p1))
        return MinkUNetOutput(features.feats, self.final(features).feats,
                              self.local(features).feats)


def build_minkunet(name: str = "MinkUNet14A", backend: str = "torch",
                   **overrides) -> MinkUNet:
    """A MinkUNet by MinkowskiEngine's class name; ``overrides`` replace plan fields
    (``planes=(8,) * 8`` for a tiny test network)."""
    if name not in MINKUNET_PLANS:
        raise ValueError(f"unknown MinkUNet {name!r}; known: {', '.join(MINKUNET_PLANS)}")
    return MinkUNet(replace(MINKUNET_PLANS[name], **overrides), backend)


# --------------------------------------------------------------------------- input


def student_input(points: list[Tensor], colors: list[Tensor],
                  voxel_size: float = DEFAULT_VOXEL_SIZE) -> tuple[SparseTensor, list[Voxels]]:
    """The student's input batch as the reference builds it.

    Args:
        points: per scene (N_i, 3) float coordinates in metres (centred here).
        colors: per scene (N_i, 3) RGB in 0..255 (any dtype); scaled to [-1, 1].
        voxel_size: 0.05 for ScanNet.

    Returns:
        the stride-1 sparse tensor ((sum M_i, 4) coordinates, (sum M_i, 3) float32 features,
        each voxel with its first point's colour) and each scene's :class:`Voxels` (its
        ``point_to_voxel`` indexes that scene's rows, starting at 0).
    """
    if len(points) != len(colors):
        raise ValueError(f"student_input: {len(points)} clouds but {len(colors)} colour sets")
    voxels = [voxelize(p, voxel_size, centre=True) for p in points]
    coords = batch_coordinates([v.coords for v in voxels])
    feats = torch.cat([c[v.voxel_to_point].float() / 127.5 - 1.0
                       for c, v in zip(colors, voxels, strict=True)])
    return SparseTensor(coords, feats), voxels


# --------------------------------------------------------------------------- authors' weights

# (pattern of the authors' key, our key) in order; the first that matches renames the key
AUTHOR_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    # MinkowskiBatchNorm wraps torch's BatchNorm1d as ``.bn``
    (r"^(.*(?:bn\d|bntr\d|norm\d|downsample\.1))\.bn\.(.*)$", r"\1.\2"),
    (r"^local_feature\.(.*)$", r"local.\1"),
)
# keys of the authors' network that ours has no use for: the fine-tuning classifier and the
# text embeddings of their 'source_free' mode (inference gets text from our classifier)
AUTHOR_KEYS_DROPPED: tuple[str, ...] = ("classifier.kernel", "classifier.bias",
                                        "text_embeddings")
# prefixes of the authors' files: Lightning's ``state_dict`` holds ``model_points.*``
AUTHOR_PREFIXES: tuple[str, ...] = ("module.", "model_points.", "model.")
AUTHOR_WRAPPERS: tuple[str, ...] = ("model_points", "state_dict", "model_state", "model")


def author_key_to_ours(key: str) -> str:
    """Our state-dict key of one key of the authors' MinkowskiEngine MinkUNet."""
    for pattern, target in AUTHOR_KEY_RENAMES:
        renamed, hits = re.subn(pattern, target, key)
        if hits:
            return renamed
    return key


def our_key_to_author(key: str, model: nn.Module) -> str:
    """The authors' key of one of our keys (``bn0.weight`` -> ``bn0.bn.weight``)."""
    module_name, _, leaf = key.rpartition(".")
    if isinstance(model.get_submodule(module_name), SparseBatchNorm):
        return f"{module_name}.bn.{leaf}"
    if module_name == "local":
        return f"local_feature.{leaf}"
    return key


def author_key_map(model: MinkUNet) -> dict[str, str]:
    """``{authors' key: our key}`` for every tensor of ``model``'s state dict."""
    return {our_key_to_author(key, model): key for key in model.state_dict()}


def strip_author_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The student's tensors of an authors' file: ``model_points.*`` only when that prefix is
    there (a Lightning file also holds the image model), then ``module.``/``model.`` dropped."""
    if any(key.startswith("model_points.") for key in state):
        state = {k: v for k, v in state.items() if k.startswith("model_points.")}
    stripped = {}
    for key, value in state.items():
        for prefix in AUTHOR_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    return stripped


def plan_from_state(state: Mapping[str, Tensor], name: str = "MinkUNet14A") -> MinkUNetPlan:
    """The plan ``name`` (its depths) with the widths a state dict under our names holds.

    MinkowskiEngine kernels are (k^3, in, out) ((in, out) for k = 1): ``conv0p1s1`` gives
    ``init_dim``, each stage's first ``conv1`` its plane, ``final`` the ``head_dim`` (the
    widths a config can set: ``student_init_dim``, ``student_planes``, the CLIP's embedding).
    The input channels and kernel sizes stay the plan's, and so does a width the state lacks:
    a strict load then names the key.
    """
    plan = MINKUNET_PLANS[name]
    widths: dict = {}
    conv0 = state.get("conv0p1s1.kernel")
    if conv0 is not None and conv0.dim() == 3:
        widths["init_dim"] = int(conv0.shape[2])
    planes = list(plan.planes)
    for stage in range(8):
        kernel = state.get(f"block{stage + 1}.0.conv1.kernel")
        if kernel is not None and kernel.dim() == 3:
            planes[stage] = int(kernel.shape[2])
    final = state.get("final.kernel")
    if final is not None and final.dim() == 2:
        widths["head_dim"] = int(final.shape[1])
    return replace(plan, planes=tuple(planes), **widths)


def load_authors_checkpoint(model: MinkUNet, source: str | Path | Mapping[str, Tensor],
                            config_key: str = MINKUNET_CONFIG_KEY) -> MinkUNet:
    """Load the authors' MinkowskiEngine MinkUNet weights into ``model``, strictly.

    Args:
        model: the MinkUNet of the same plan (14A for the released ScanNet student).
        source: a weights file (``.pth``/``.ckpt``/``.safetensors``, wrapped under
            ``model_points``/``state_dict``/... or not) or a state dict.
        config_key: the config key named in errors.

    Raises:
        WeightsError: one line listing the keys without a partner and the wrong shapes.
    """
    if isinstance(source, Mapping):
        state, where = dict(source), "state dict"
    else:
        state = read_tensor_file(source, config_key=config_key, what="MinkUNet checkpoint",
                                 wrappers=AUTHOR_WRAPPERS)
        where = f"file {Path(source).expanduser()}"
    state = strip_author_prefixes(state)
    mapped = {author_key_to_ours(k): v for k, v in state.items()
              if k not in AUTHOR_KEYS_DROPPED}
    own = model.state_dict()
    problems = describe_mismatch(own, own, mapped, listed=8)
    if problems:
        raise WeightsError(
            f"MinkUNet checkpoint ({where}) does not fit {type(model).__name__} "
            f"planes={model.plan.planes} layers={model.plan.layers}: " + "; ".join(problems) +
            f" (keys after renaming the authors' names; set {config_key} to CLIP2Scene's "
            "MinkowskiEngine MinkUNet14A checkpoint)"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=True)
    return model
