"""Tests of the dense-inference path: resize helpers, window grid, cut/stitch, sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.layers import (
    centred_padding,
    cut_windows,
    rescale_size,
    resize_image,
    resize_logits,
    sliding_window_logits,
    stitch_windows,
    window_counts,
    window_grid,
)


def _dyadic_map(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # Random values with few mantissa bits: sums of up to thousands of them and their division
    # by the overlap count are exact in float32, so the stitching can be checked to the bit.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-512, 512, shape, generator=gen).float() / 8


def _rows_cols(grid):
    return sorted({w[0] for w in grid}), sorted({w[1] for w in grid})


# ---------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("size", "short", "long", "expected"),
    [
        ((400, 600), 336, 2048, (336, 504)),
        ((600, 400), 336, 2048, (504, 336)),
        # The long side caps the factor: 2048 / 5000 = 0.4096 -> 100 * 0.4096 = 40.96 -> 41.
        ((100, 5000), 336, 2048, (41, 2048)),
        # 500 * 336 / 333 = 504.50... rounds half up to 505.
        ((333, 500), 336, 2048, (336, 505)),
        ((336, 336), 336, 2048, (336, 336)),
        # Upscaling: 224 * 448 / 224 = 448, 300 * 2 = 600.
        ((224, 300), 448, 2048, (448, 600)),
        ((1024, 2048), 560, 2048, (560, 1120)),
    ],
)
def test_rescale_size_hand_computed(size, short, long, expected):
    assert rescale_size(*size, short_side=short, max_long_side=long) == expected


def test_rescale_size_rejects_empty_image():
    with pytest.raises(ValueError, match="positive"):
        rescale_size(0, 10, 336, 2048)


def test_resize_image_takes_height_width():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = resize_image(image, (10, 45))
    assert out.shape == (10, 45, 3) and out.dtype == np.uint8
    flat = np.full((20, 30, 3), 77, dtype=np.uint8)
    assert (resize_image(flat, (31, 7)) == 77).all()


def test_resize_logits_no_op_and_bilinear():
    logits = torch.randn(2, 3, 5, 7)
    assert resize_logits(logits, (5, 7)) is logits
    out = resize_logits(logits, (10, 21))
    expected = F.interpolate(logits, size=(10, 21), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 10, 21)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------- grid


def test_window_grid_reference_case():
    grid = window_grid(400, 600, 224, 112)
    rows, cols = _rows_cols(grid)
    assert rows == [0, 112, 176]
    assert cols == [0, 112, 224, 336, 376]
    assert len(grid) == 15
    assert grid[0] == (0, 0, 224, 224)
    assert grid[4] == (0, 376, 224, 600)  # row-major: the first row's last window
    assert grid[-1] == (176, 376, 400, 600)
    assert all(y1 - y0 == 224 and x1 - x0 == 224 for y0, x0, y1, x1 in grid)


def test_window_grid_hand_written():
    # 336 crop, 112 stride on 336 x 500: one row; columns 0, 112, then 224 -> shifted to 164.
    assert window_grid(336, 500, 336, 112) == [
        (0, 0, 336, 336),
        (0, 112, 336, 448),
        (0, 164, 336, 500),
    ]
    # Side exactly crop + stride: no shift needed.
    assert _rows_cols(window_grid(336, 336, 224, 112)) == ([0, 112], [0, 112])
    # Side one pixel longer than crop: a second window shifted back to start at 1.
    assert _rows_cols(window_grid(225, 224, 224, 112)) == ([0, 1], [0])


def test_window_grid_image_smaller_than_crop():
    assert window_grid(100, 150, 224, 112) == [(0, 0, 100, 150)]
    # Only one side smaller: that side is whole, the other slides.
    assert window_grid(100, 400, 224, 112) == [
        (0, 0, 100, 224),
        (0, 112, 100, 336),
        (0, 176, 100, 400),
    ]


def test_window_grid_whole_image_and_pairs():
    assert window_grid(123, 456, 0, 112) == [(0, 0, 123, 456)]
    assert window_grid(123, 456, -1, 0) == [(0, 0, 123, 456)]
    grid = window_grid(300, 500, (224, 300), (100, 150))
    rows, cols = _rows_cols(grid)
    assert rows == [0, 76] and cols == [0, 150, 200]
    assert all((y1 - y0, x1 - x0) == (224, 300) for y0, x0, y1, x1 in grid)


def test_window_grid_rejects_gaps_and_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        window_grid(400, 400, 100, 200)
    with pytest.raises(ValueError, match="stride"):
        window_grid(400, 400, 100, 0)
    with pytest.raises(ValueError, match="crop"):
        window_grid(400, 400, (1, 2, 3), 1)


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride"),
    [(400, 600, 224, 112), (57, 91, 20, 7), (64, 64, 16, 16), (50, 33, 64, 8), (90, 70, 30, 29)],
)
def test_window_grid_covers_image_inside(height, width, crop, stride):
    grid = window_grid(height, width, crop, stride)
    counts = window_counts(grid, (height, width))
    assert counts.shape == (1, 1, height, width)
    assert bool((counts >= 1).all())
    assert all(0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width for y0, x0, y1, x1 in grid)
    assert len(set(grid)) == len(grid)


# ---------------------------------------------------------------------------- cut / stitch


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride"),
    [
        (400, 600, 224, 112),
        (57, 91, 20, 7),
        (64, 64, 16, 16),
        (50, 33, 64, 8),
        (90, 70, (30, 20), (10, 5)),
        (40, 40, 0, 0),
    ],
)
def test_cut_then_stitch_is_exact(height, width, crop, stride):
    grid = window_grid(height, width, crop, stride)
    x = _dyadic_map((1, 4, height, width), seed=height)
    windows = cut_windows(x, grid)
    win_h, win_w = grid[0][2] - grid[0][0], grid[0][3] - grid[0][1]
    assert windows.shape == (len(grid), 4, win_h, win_w)
    y0, x0, y1, x1 = grid[-1]
    assert torch.equal(windows[-1], x[0, :, y0:y1, x0:x1])
    out = stitch_windows(windows, grid, (height, width))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out - x).abs().max().item() == 0


def test_stitch_averages_overlaps():
    grid = window_grid(1, 3, (1, 2), (1, 1))  # windows over columns 0-1 and 1-2
    maps = torch.tensor([[[[1.0, 2.0]]], [[[4.0, 8.0]]]])
    out = stitch_windows(maps, grid, (1, 3))
    assert out.tolist() == [[[[1.0, 3.0, 8.0]]]]


def test_stitch_rejects_maps_not_at_window_size():
    grid = window_grid(40, 40, 20, 10)
    with pytest.raises(ValueError, match="window size"):
        stitch_windows(torch.zeros(len(grid), 2, 10, 10), grid, (40, 40))


# ---------------------------------------------------------------------------- sliding windows


class _Recorder:
    """A predict_windows that records what it is given."""

    def __init__(self, fn):
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(windows.shape))
        return self.fn(windows)


def _half_resolution(windows: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(windows, 2)


def test_identity_predictor_reproduces_image():
    image = _dyadic_map((1, 3, 150, 230), seed=1)
    out = sliding_window_logits(image, lambda w: w, crop=64, stride=40, window_batch=4)
    assert out.dtype == torch.float32
    assert torch.equal(out, image)


def test_half_resolution_predictor_reproduces_linear_map():
    # avg-pool by 2 then bilinear (align_corners=False) upsampling by 2 returns a linear ramp
    # exactly, except on each window's first and last row/column, where the upsampling clamps.
    height, width, crop, stride = 96, 136, 32, 16
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1)
    ramp = 0.5 * ys - 0.25 * xs + 3.0
    image = torch.stack([ramp, -ramp, 2 * ramp])[None]
    out = sliding_window_logits(image, _half_resolution, crop=crop, stride=stride)
    assert out.shape == (1, 3, height, width)

    exact = torch.ones(height, width, dtype=torch.bool)
    for y0, x0, y1, x1 in window_grid(height, width, crop, stride):
        exact[y0, x0:x1] = exact[y1 - 1, x0:x1] = False
        exact[y0:y1, x0] = exact[y0:y1, x1 - 1] = False
    assert exact.sum() > height * width // 2
    assert torch.allclose(out[..., exact], image[..., exact], atol=1e-4, rtol=0)
    # A constant map is reproduced everywhere.
    flat = torch.full((1, 3, height, width), 0.75)
    assert torch.equal(
        sliding_window_logits(flat, _half_resolution, crop=crop, stride=stride), flat
    )


def test_upsampling_is_per_window_bilinear():
    image = torch.randn(1, 3, 70, 110, generator=torch.Generator().manual_seed(2))
    grid = window_grid(70, 110, 48, 24)
    expected_maps = F.interpolate(
        _half_resolution(cut_windows(image, grid)),
        size=(48, 48),
        mode="bilinear",
        align_corners=False,
    )
    expected = stitch_windows(expected_maps, grid, (70, 110))
    out = sliding_window_logits(image, _half_resolution, crop=48, stride=24, window_batch=5)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_result_independent_of_window_batch():
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 130, 170, generator=gen)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)

    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.tanh(conv(windows))

    outs = []
    for batch in (1, 3, 100):
        recorder = _Recorder(predict)
        outs.append(sliding_window_logits(image, recorder, crop=64, stride=32, window_batch=batch))
        n_windows = len(window_grid(130, 170, 64, 32))
        assert sum(shape[0] for shape in recorder.shapes) == n_windows
        assert max(shape[0] for shape in recorder.shapes) <= batch
        assert all(shape[1:] == (3, 64, 64) for shape in recorder.shapes)
    assert outs[0].shape == (1, 5, 130, 170)
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)
    assert torch.allclose(outs[0], outs[2], atol=1e-6, rtol=0)


def test_predictor_gets_at_most_window_batch():
    recorder = _Recorder(lambda w: w[:, :1])
    sliding_window_logits(
        torch.zeros(1, 3, 400, 600), recorder, crop=224, stride=112, window_batch=4
    )
    assert [shape[0] for shape in recorder.shapes] == [4, 4, 4, 3]


def test_whole_image_is_one_window():
    recorder = _Recorder(_half_resolution)
    image = torch.randn(1, 3, 50, 70)
    out = sliding_window_logits(image, recorder, crop=0, stride=0)
    assert recorder.shapes == [(1, 3, 50, 70)]
    expected = F.interpolate(
        F.avg_pool2d(image, 2), size=(50, 70), mode="bilinear", align_corners=False
    )
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_centred_padding():
    assert centred_padding(224, 224, 56) == (0, 0, 0, 0)
    assert centred_padding(40, 70, 56) == (21, 21, 8, 8)
    assert centred_padding(50, 57, 56) == (27, 28, 3, 3)
    assert centred_padding(50, 57, 0) == (0, 0, 0, 0)


def test_padded_windows_with_identity_match_unpadded():
    image = _dyadic_map((1, 3, 150, 230), seed=4)
    recorder = _Recorder(lambda w: 2 * w + 1)
    padded = sliding_window_logits(image, recorder, crop=100, stride=50, pad_multiple=56)
    assert all(h % 56 == 0 and w % 56 == 0 for *_, h, w in recorder.shapes)
    assert recorder.shapes[0][-2:] == (112, 112)
    plain = sliding_window_logits(image, lambda w: 2 * w + 1, crop=100, stride=50)
    assert torch.equal(padded, plain)


def test_padding_is_centred_zeros():
    seen: list[torch.Tensor] = []

    def predict(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows)
        return windows

    image = torch.ones(1, 3, 40, 70)
    out = sliding_window_logits(image, predict, crop=224, stride=112, pad_multiple=56)
    (window,) = seen
    assert window.shape == (1, 3, 56, 112)
    assert torch.equal(window[..., 8:48, 21:91], torch.ones(1, 3, 40, 70))
    assert window.sum().item() == 3 * 40 * 70  # everything else is zero padding
    assert torch.equal(out, image)


def test_padded_half_resolution_crops_the_window_part():
    # Half-resolution logits of a padded window are upsampled to the padded size and the window
    # part is cut out, not the top-left corner.
    image = torch.randn(1, 3, 40, 70, generator=torch.Generator().manual_seed(5))
    out = sliding_window_logits(image, _half_resolution, crop=0, stride=0, pad_multiple=56)
    padded = F.pad(image, (21, 21, 8, 8))
    full = F.interpolate(
        F.avg_pool2d(padded, 2), size=(56, 112), mode="bilinear", align_corners=False
    )
    assert torch.allclose(out, full[..., 8:48, 21:91], atol=1e-6, rtol=0)


def test_sliding_window_rejects_bad_predictor_output():
    with pytest.raises(ValueError, match="predict_windows"):
        sliding_window_logits(torch.zeros(1, 3, 64, 64), lambda w: w[:1], crop=32, stride=32)
    with pytest.raises(ValueError, match="window_batch"):
        sliding_window_logits(
            torch.zeros(1, 3, 64, 64), lambda w: w, crop=32, stride=32, window_batch=0
        )
