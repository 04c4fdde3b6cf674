"""Band-at-a-time bilinear resizing equals one whole-map F.interpolate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg.layers.chunked_resize import BandResizer, bilinear_matrix


@pytest.mark.parametrize("size", [(40, 61), (7, 9), (13, 200), (13, 17)])
@pytest.mark.parametrize("band_rows", [1, 5, 64])
def test_bands_equal_one_whole_map_interpolation(size, band_rows):
    maps = torch.randn(5, 13, 17, generator=torch.Generator().manual_seed(0))
    whole = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    bands = torch.cat([band for _, band in BandResizer(maps, size).bands(band_rows)], dim=1)
    assert bands.shape == whole.shape
    # float32 rounding: the weights are computed in another order than ATen's
    torch.testing.assert_close(bands, whole, atol=1e-5, rtol=1e-5)


def test_the_row_matrix_is_1d_bilinear_interpolation():
    column = torch.randn(11, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(column[None, None], size=29, mode="linear", align_corners=False)
    torch.testing.assert_close(bilinear_matrix(29, 11) @ column, expected[0, 0])
