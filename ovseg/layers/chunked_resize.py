"""Bilinear resizing as two interpolation matrices, so large outputs can be built in row chunks.

``bilinear_matrix(out, in) @ x`` equals ``F.interpolate(mode="bilinear", align_corners=False)``
along one axis; the rows of the output can then be produced a band at a time, which keeps the
memory of a (C, H, W) upsampling to one band plus the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def bilinear_matrix(out_size: int, in_size: int, device=None) -> torch.Tensor:
    """(out_size, in_size) float32 weights of 1-D bilinear resizing, align_corners=False."""
    return bilinear_rows(out_size, in_size, slice(0, out_size)).to(device)


def bilinear_rows(out_size: int, in_size: int, rows: slice) -> torch.Tensor:
    """(len(rows), in_size) float32: rows ``rows`` (step 1) of :func:`bilinear_matrix`."""
    scale = in_size / out_size
    index = torch.arange(rows.start, rows.stop, dtype=torch.float64)
    src = ((index + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (src - low).float()
    weights = torch.zeros(index.shape[0], in_size)
    positions = torch.arange(index.shape[0])
    weights.index_put_((positions, low), 1 - frac, accumulate=True)
    weights.index_put_((positions, high), frac, accumulate=True)
    return weights


def chained_bilinear_rows(rows: slice, chain: list[tuple[int, int]]) -> torch.Tensor:
    """Weights of output rows ``rows`` through a chain of 1-D bilinear resizes.

    chain: [(out_0, in_0), (out_1, in_1), ...] from the output back to the source: resize k
    maps ``in_k`` rows to ``out_k``; its input is the first ``in_k`` rows of resize k+1's
    output (``in_k <= out_{k+1}``: a crop, as SAM's postprocessing cuts its padding).

    Returns:
        (len(rows), in_last) float32; only the source rows the band needs are ever touched, so
        the cost is the band's, not the map's.
    """
    out_size, in_size = chain[0]
    weights = bilinear_rows(out_size, in_size, rows)
    for out_size, in_size in chain[1:]:
        used = weights.abs().sum(dim=0).nonzero().flatten()
        low, high = int(used.min()), int(used.max()) + 1
        if high > out_size:
            raise ValueError(f"resize chain {chain}: {high} rows needed of a {out_size}-row map")
        weights = weights[:, low:high] @ bilinear_rows(out_size, in_size, slice(low, high))
    return weights


class BandResizer:
    """``maps`` (C, h, w) resized bilinearly (align_corners=False) to ``size``, a band of rows at
    a time: any band costs C x rows x W floats, never the whole (C, H, W) map.

    A given band is computed the same way whichever other bands are asked for, so results that
    are built band by band do not depend on the order of the requests.
    """

    def __init__(self, maps: torch.Tensor, size: tuple[int, int]):
        self.maps = maps.float()
        self.size = (int(size[0]), int(size[1]))
        self.identity = tuple(maps.shape[-2:]) == self.size
        if not self.identity:
            self.along_h = bilinear_matrix(self.size[0], maps.shape[1], maps.device)  # (H, h)

    def rows(self, rows: slice) -> torch.Tensor:
        """(C, len(rows), W) float32: rows ``rows`` (step 1) of the resized map."""
        if self.identity:
            return self.maps[:, rows]
        weights = self.along_h[rows]
        # the band's rows read two source rows each: touch only those (a thin band over the
        # whole (C, h, w) map would read all of it, thousands of times at 12000^2)
        used = weights.abs().sum(dim=0).nonzero().flatten()
        low, high = int(used.min()), int(used.max()) + 1
        band = torch.einsum("rh,chw->crw", weights[:, low:high], self.maps[:, low:high])
        if band.shape[-1] == self.size[1]:
            return band
        # along the width, linear interpolation of each row: the dense (W, w) matrix product
        # would spend C x rows x w x W multiply-adds on weights that are zero but two a row
        # (minutes for 150 classes at 12000^2 on a CPU)
        return F.interpolate(band, size=self.size[1], mode="linear", align_corners=False)

    def bands(self, band_rows: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (row slice, (C, rows, W) band) from the top, ``band_rows`` rows at a time."""
        height = self.size[0]
        for start in range(0, height, band_rows):
            rows = slice(start, min(start + band_rows, height))
            yield rows, self.rows(rows)


def resized_row_bands(
    maps: torch.Tensor, size: tuple[int, int], band_rows: int = 256
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (row slice, (C, rows, W) band) of ``maps`` (C, h, w) resized bilinearly to ``size``."""
    yield from BandResizer(maps, size).bands(band_rows)


def map_resized_bands(
    maps: torch.Tensor,
    size: tuple[int, int],
    transform: Callable[[torch.Tensor], torch.Tensor],
    channels_out: int,
    band_rows: int = 256,
) -> torch.Tensor:
    """``transform`` of ``maps`` (C, h, w) resized bilinearly to ``size``, one band at a time.

    transform: (C, rows, W) -> (channels_out, rows, W), applied per band (it must act on each
    pixel alone, e.g. a softmax over channels). Returns (channels_out, H, W) float32 on the CPU.
    """
    out = torch.empty((channels_out, *size), dtype=torch.float32)
    for rows, band in resized_row_bands(maps, size, band_rows):
        out[:, rows] = transform(band).cpu()
    return out
