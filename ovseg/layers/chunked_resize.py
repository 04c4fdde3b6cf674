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


def resized_row_bands(
    maps: torch.Tensor, size: tuple[int, int], band_rows: int = 256
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (row slice, (C, rows, W) band) of ``maps`` (C, h, w) resized bilinearly to ``size``."""
    height, width = size
    channels, h, w = maps.shape
    maps = maps.float()
    if (h, w) == (height, width):
        for start in range(0, height, band_rows):
            rows = slice(start, min(start + band_rows, height))
            yield rows, maps[:, rows]
        return
    along_w = bilinear_matrix(width, w, maps.device)  # (W, w)
    along_h = bilinear_matrix(height, h, maps.device)  # (H, h)
    for start in range(0, height, band_rows):
        rows = slice(start, min(start + band_rows, height))
        band = torch.einsum("rh,chw->crw", along_h[rows], maps)
        yield rows, band @ along_w.T


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
