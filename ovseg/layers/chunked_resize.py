"""Bilinear resizing as two interpolation matrices, so large outputs can be built in row chunks.

``bilinear_matrix(out, in) @ x`` equals ``F.interpolate(mode="bilinear", align_corners=False)``
along one axis; the rows of the output can then be produced a band at a time, which keeps the
memory of a (C, H, W) upsampling to one band plus the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def bilinear_matrix(out_size: int, in_size: int, device=None) -> torch.Tensor:
    """(out_size, in_size) float32 weights of 1-D bilinear resizing, align_corners=False."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (src - low).float()
    weights = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(device)


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
            self.along_w = bilinear_matrix(self.size[1], maps.shape[2], maps.device)  # (W, w)

    def rows(self, rows: slice) -> torch.Tensor:
        """(C, len(rows), W) float32: rows ``rows`` (step 1) of the resized map."""
        if self.identity:
            return self.maps[:, rows]
        band = torch.einsum("rh,chw->crw", self.along_h[rows], self.maps)
        return band @ self.along_w.T

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
