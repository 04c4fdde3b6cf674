"""Sparse 3D convolution on voxel coordinates: one interface, a pure-PyTorch and a spconv backend.

A :class:`SparseTensor` is MinkowskiEngine's: ``coords`` (M, 4) int32 rows ``(batch, x, y, z)``
in units of the finest voxel, multiples of the tensor's ``stride``; ``feats`` (M, C). Three
convolutions, all with MinkowskiEngine's kernel layout ``(K^3, C_in, C_out)`` (the offset index
runs x fastest: ``k = ix + K*iy + K^2*iz``; odd K is centred, even K spans ``[0, K)``;
a 1x1 stride-1 kernel is ``(C_in, C_out)``, a bias ``(1, C_out)``):

- stride 1 ("submanifold"): output on the input's coordinates,
  ``out[p] = sum_k in[p + o_k * s] @ W[k]``;
- stride 2 (downsampling; kernel 2 in MinkUNet): output coordinates
  ``floor(p / 2s) * 2s``, ``out[P] = sum_k in[P + o_k * s] @ W[k]``;
- transposed, stride 2 (upsampling): output on the finer coordinate set (the one the input
  was downsampled from, remembered in the tensors' shared :class:`CoordinateCache`),
  ``out[Q] += in[P] @ W[k]`` for ``Q = P + o_k * s_out`` (the downsampling map, reversed).

On a fully occupied grid these are ``conv3d(padding=K//2)``, ``conv3d(stride=2)`` and
``conv_transpose3d(stride=2)`` with :func:`dense_weight` (tests/test_sparse.py pins it).

The torch backend hashes ``(batch, x, y, z)`` into one int64 key, finds neighbours with
``searchsorted`` on the sorted keys, and runs gather -> matmul -> scatter-add per kernel
offset; its backward recomputes the gathers instead of storing them. Kernel maps are cached per
coordinate set, so a network builds each once per forward. The spconv backend
(``spconv_backend.py``) runs stride-1 and strided convolutions through spconv when it is
installed; transposed convolutions always take the torch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ovseg.layers.sparse import spconv_backend

BACKENDS = ("auto", "torch", "spconv")


# --------------------------------------------------------------------------- coordinates


@dataclass(eq=False)
class CoordinateCache:
    """The coordinate sets of one batch by stride, and the kernel maps between them; shared by
    every tensor a network derives from one input (MinkowskiEngine's coordinate manager)."""

    coords: dict[int, Tensor] = field(default_factory=dict)  # stride -> (M, 4) int32
    indices: dict[int, CoordinateIndex] = field(default_factory=dict)
    maps: dict[tuple, KernelMap] = field(default_factory=dict)

    def index(self, stride: int) -> CoordinateIndex:
        if stride not in self.indices:
            self.indices[stride] = CoordinateIndex(self.coords[stride], stride)
        return self.indices[stride]


@dataclass(eq=False)
class SparseTensor:
    """Features on sparse voxel coordinates (MinkowskiEngine's ``SparseTensor``).

    coords: (M, 4) int32 ``(batch, x, y, z)``, finest-voxel units, multiples of ``stride``.
    feats: (M, C) float features, row i at ``coords[i]``.
    stride: the tensor stride (1 at the input, 2, 4, ... after downsampling).
    cache: coordinate sets and kernel maps shared with the tensors derived from this one.
    """

    coords: Tensor
    feats: Tensor
    stride: int = 1
    cache: CoordinateCache = field(default_factory=CoordinateCache, repr=False)

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"SparseTensor coords must be (M, 4) (batch, x, y, z), got "
                             f"{tuple(self.coords.shape)}")
        if self.feats.dim() != 2 or len(self.feats) != len(self.coords):
            raise ValueError(f"SparseTensor feats must be (M, C) with M = {len(self.coords)} "
                             f"coordinates, got {tuple(self.feats.shape)}")
        known = self.cache.coords.setdefault(self.stride, self.coords)
        if known is not self.coords and not (
            known.shape == self.coords.shape and torch.equal(known, self.coords)
        ):
            raise ValueError(f"SparseTensor at stride {self.stride} has other coordinates than "
                             "its cache holds for that stride; start a new CoordinateCache")

    def with_feats(self, feats: Tensor) -> SparseTensor:
        """The same coordinates with other (M, C') features."""
        return replace(self, feats=feats)

    @property
    def device(self) -> torch.device:
        return self.feats.device


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Concatenate the features of tensors on the same coordinates (MinkowskiEngine's
    ``me.cat``): (M, C1), (M, C2) -> (M, C1 + C2)."""
    first = tensors[0]
    for other in tensors[1:]:
        if other.stride != first.stride or other.coords is not first.coords and not (
            torch.equal(other.coords, first.coords)
        ):
            raise ValueError("cat: sparse tensors lie on different coordinates "
                             f"(strides {first.stride} and {other.stride})")
    return first.with_feats(torch.cat([t.feats for t in tensors], dim=1))


class CoordinateIndex:
    """Lookup of ``(batch, x, y, z)`` rows in one coordinate set by int64 keys + searchsorted.

    Coordinates are divided by the set's stride and shifted to start at 0 inside the set's
    bounding box, so a key is a mixed-radix number; queries outside the box, or not on the
    stride's lattice, are misses.
    """

    def __init__(self, coords: Tensor, stride: int):
        grid = coords.long()
        grid = torch.cat([grid[:, :1], torch.div(grid[:, 1:], stride, rounding_mode="floor")], 1)
        self.stride = stride
        self.count = len(grid)
        if self.count == 0:
            self.low = torch.zeros(4, dtype=torch.long, device=coords.device)
            self.high = self.low - 1
        else:
            self.low, self.high = grid.min(0).values, grid.max(0).values
        self.size = (self.high - self.low + 1).clamp(min=1)
        if math.prod(self.size.tolist()) >= 2 ** 62:
            raise ValueError(f"coordinates span {self.size.tolist()} cells, too many for an "
                             "int64 key; are they voxel indices (not metres)?")
        keys = self._encode(grid)
        self.sorted_keys, self.order = keys.sort()

    def _encode(self, grid: Tensor) -> Tensor:
        rel = grid - self.low
        size = self.size
        return ((rel[:, 0] * size[1] + rel[:, 1]) * size[2] + rel[:, 2]) * size[3] + rel[:, 3]

    def lookup(self, query: Tensor) -> Tensor:
        """Row of each (Q, 4) query (finest-voxel units) in the set; -1 where absent."""
        query = query.long()
        if self.count == 0 or len(query) == 0:
            return torch.full((len(query),), -1, dtype=torch.long, device=query.device)
        spatial = query[:, 1:]
        on_lattice = (spatial % self.stride == 0).all(1)
        grid = torch.cat([query[:, :1],
                          torch.div(spatial, self.stride, rounding_mode="floor")], 1)
        inside = on_lattice & ((grid >= self.low) & (grid <= self.high)).all(1)
        keys = self._encode(torch.minimum(torch.maximum(grid, self.low), self.high))
        position = torch.searchsorted(self.sorted_keys, keys).clamp(max=self.count - 1)
        found = inside & (self.sorted_keys[position] == keys)
        return torch.where(found, self.order[position], torch.full_like(position, -1))


def kernel_offsets(kernel_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(K^3, 3) int64 offsets in MinkowskiEngine's order (x fastest); odd K centred, even K
    from 0."""
    start = -(kernel_size // 2) if kernel_size % 2 else 0
    axis = torch.arange(start, start + kernel_size, device=device)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=1)


@dataclass(eq=False)
class KernelMap:
    """Which input row feeds which output row through each kernel offset."""

    pairs: list[tuple[Tensor, Tensor] | None]  # per offset (in_rows, out_rows); None = identity
    num_in: int
    num_out: int
    out_coords: Tensor  # (num_out, 4) int32
    out_stride: int


def _neighbour_pairs(neighbours: Tensor) -> list[tuple[Tensor, Tensor] | None]:
    """Per-offset (in_rows, out_rows) of an (M_out, K^3) neighbour table (-1 = none)."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    rows = torch.arange(len(neighbours), device=neighbours.device)
    for k in range(neighbours.shape[1]):
        column = neighbours[:, k]
        if bool((column == rows).all()):
            pairs.append(None)  # the centre of a stride-1 kernel: every row feeds itself
            continue
        hit = column >= 0
        pairs.append((column[hit], rows[hit]))
    return pairs


def downsampled_coords(coords: Tensor, stride: int) -> Tensor:
    """Unique ``floor(coords / 2s) * 2s`` of (M, 4) coordinates at ``stride`` s, sorted."""
    spatial = torch.div(coords[:, 1:].long(), 2 * stride, rounding_mode="floor") * (2 * stride)
    rows = torch.cat([coords[:, :1].long(), spatial], 1)
    return torch.unique(rows, dim=0).to(torch.int32)


def kernel_map(x: SparseTensor, kernel_size: int, stride: int = 1,
               transposed: bool = False) -> KernelMap:
    """The (cached) kernel map of a convolution of ``x``; see the module docstring."""
    if stride not in (1, 2):
        raise ValueError(f"sparse convolution stride must be 1 or 2, got {stride}")
    cache = x.cache
    key = (x.stride, kernel_size, stride, transposed)
    if key in cache.maps:
        return cache.maps[key]
    offsets = kernel_offsets(kernel_size, x.coords.device)
    if transposed and stride == 2:
        out_stride = x.stride // 2
        if x.stride % 2 or out_stride not in cache.coords:
            raise ValueError(f"transposed convolution of a stride-{x.stride} tensor needs the "
                             f"stride-{out_stride} coordinates it was downsampled from")
        out_coords = cache.coords[out_stride]
        step = out_stride  # Q = P + o * s_out  =>  P = Q - o * s_out
        sign = -1
    elif stride == 2:
        out_stride = x.stride * 2
        if out_stride not in cache.coords:
            cache.coords[out_stride] = downsampled_coords(x.coords, x.stride)
        out_coords = cache.coords[out_stride]
        step, sign = x.stride, 1
    else:
        out_stride, out_coords, step, sign = x.stride, x.coords, x.stride, 1
    query = out_coords.long()[:, None, :].repeat(1, len(offsets), 1)
    query[:, :, 1:] += sign * step * offsets[None]
    neighbours = cache.index(x.stride).lookup(query.reshape(-1, 4)).view(len(out_coords), -1)
    result = KernelMap(_neighbour_pairs(neighbours) if stride == 1 and not transposed
                       else [(c[c >= 0], torch.nonzero(c >= 0).squeeze(1))
                             for c in neighbours.t()],
                       len(x.coords), len(out_coords), out_coords, out_stride)
    cache.maps[key] = result
    return result


# --------------------------------------------------------------------------- torch backend


class _GatherMatmulScatter(torch.autograd.Function):
    """out[o] += feats[i] @ weight[k] over a kernel map; backward recomputes the gathers."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
        out = feats.new_zeros(kmap.num_out, weight.shape[-1])
        for k, pair in enumerate(kmap.pairs):
            if pair is None:
                out.addmm_(feats, weight[k])
            elif len(pair[0]):
                out.index_add_(0, pair[1], feats.index_select(0, pair[0]) @ weight[k])
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        grad_feats = torch.zeros_like(feats) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for k, pair in enumerate(kmap.pairs):
            if pair is None:
                g, rows_in = grad_out, None
            elif len(pair[0]):
                g, rows_in = grad_out.index_select(0, pair[1]), pair[0]
            else:
                continue
            if grad_feats is not None:
                contribution = g @ weight[k].t()
                if rows_in is None:
                    grad_feats += contribution
                else:
                    grad_feats.index_add_(0, rows_in, contribution)
            if grad_weight is not None:
                source = feats if rows_in is None else feats.index_select(0, rows_in)
                grad_weight[k] = source.t() @ g
        return grad_feats, grad_weight, None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"spconv"`` for a requested backend: ``"auto"`` = spconv on a CUDA
    device when it is installed, torch otherwise; ``"spconv"`` raises
    :class:`~ovseg.layers.sparse.spconv_backend.SparseBackendError` when it is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"sparse backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "spconv":
        spconv_backend.require_spconv()
        return "spconv"
    if backend == "auto" and torch.device(device).type == "cuda" and (
        spconv_backend.spconv_available()
    ):
        return "spconv"
    return "torch"


def sparse_conv(x: SparseTensor, kernel: Tensor, kernel_size: int, stride: int = 1,
                transposed: bool = False, bias: Tensor | None = None,
                backend: str = "torch") -> SparseTensor:
    """Sparse convolution of ``x`` with a MinkowskiEngine-layout ``kernel``.

    Args:
        x: the input (M, C_in) features at stride s.
        kernel: (K^3, C_in, C_out), or (C_in, C_out) for a 1x1 stride-1 kernel.
        kernel_size: K.
        stride: 1 (output on x's coordinates) or 2 (down, or up when ``transposed``).
        transposed: upsample onto the stride-s/2 coordinates x was made from.
        bias: (1, C_out) or (C_out,), added to every output row.
        backend: "torch", "spconv" or "auto" (see :func:`resolve_backend`).

    Returns:
        (M_out, C_out) features at stride s, 2s or s/2.
    """
    if kernel.dim() == 2:
        if kernel_size != 1 or stride != 1:
            raise ValueError("a (C_in, C_out) kernel is a 1x1 stride-1 convolution")
        out = x.with_feats(x.feats @ kernel)
    else:
        if kernel.shape[0] != kernel_size ** 3 or kernel.shape[1] != x.feats.shape[1]:
            raise ValueError(f"kernel {tuple(kernel.shape)} does not fit kernel size "
                             f"{kernel_size} and {x.feats.shape[1]} input channels")
        chosen = resolve_backend(backend, x.device)
        kmap = kernel_map(x, kernel_size, stride, transposed)
        if chosen == "spconv" and not transposed:
            feats = _spconv_feats(x, kernel, kernel_size, stride, kmap)
        else:
            feats = _GatherMatmulScatter.apply(x.feats, kernel, kmap)
        out = SparseTensor(kmap.out_coords, feats, kmap.out_stride, x.cache)
    if bias is not None:
        out = out.with_feats(out.feats + bias.reshape(1, -1))
    return out


def _spconv_feats(x: SparseTensor, kernel: Tensor, kernel_size: int, stride: int,
                  kmap: KernelMap) -> Tensor:
    """spconv's output features, rows in the order of ``kmap.out_coords``."""
    coords, feats = spconv_backend.spconv_conv(x.coords, x.feats, x.stride, kernel,
                                               kernel_size, stride)
    if stride == 1:
        return feats
    rows = CoordinateIndex(coords, kmap.out_stride).lookup(kmap.out_coords)
    if bool((rows < 0).any()) or len(coords) != kmap.num_out:
        raise RuntimeError("spconv's strided output coordinates differ from the kernel map's")
    return feats.index_select(0, rows)


def dense_weight(kernel: Tensor, kernel_size: int, transposed: bool = False) -> Tensor:
    """A MinkowskiEngine-layout (K^3, C_in, C_out) kernel as torch's dense weight with spatial
    axes (x, y, z): ``conv3d``'s (C_out, C_in, K, K, K), or with ``transposed``
    ``conv_transpose3d``'s (C_in, C_out, K, K, K)."""
    k = kernel_size
    grid = kernel.reshape(k, k, k, kernel.shape[1], kernel.shape[2])  # (z, y, x, in, out)
    if transposed:
        return grid.permute(3, 4, 2, 1, 0).contiguous()
    return grid.permute(4, 3, 2, 1, 0).contiguous()


# --------------------------------------------------------------------------- modules


class SparseConv3d(nn.Module):
    """A sparse 3D convolution with MinkowskiEngine's parameters (``kernel``, ``bias``).

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: K (1, 2, 3, 5, ...).
        stride: 1, or 2 (downsampling; upsampling with ``transposed``).
        bias: add a learned (1, C_out) bias.
        transposed: MinkowskiEngine's ``MinkowskiConvolutionTranspose``.
        backend: "torch", "spconv" or "auto".
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = False, transposed: bool = False, backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"sparse backend must be one of {BACKENDS}, got {backend!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.transposed = kernel_size, stride, transposed
        self.backend = backend
        volume = kernel_size ** 3
        # MinkowskiEngine stores a 1x1 stride-1 kernel as a plain matrix
        shape = (in_channels, out_channels) if volume == 1 and stride == 1 else (
            volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(1, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MinkowskiEngine's init: uniform(+-1/sqrt(fan)), fan over C_out for a transposed conv
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_size ** 3
        bound = 1.0 / math.sqrt(fan)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_conv(x, self.kernel, self.kernel_size, self.stride, self.transposed,
                           self.bias, self.backend)

    def extra_repr(self) -> str:
        kind = "transposed, " if self.transposed else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"{kind}stride={self.stride}, bias={self.bias is not None}")


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the (M, C) features of a sparse tensor."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.with_feats(super().forward(x.feats))


class SparseReLU(nn.Module):
    """ReLU on the features of a sparse tensor."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(torch.relu(x.feats))
