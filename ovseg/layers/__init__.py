"""Small shared ops: resizing, sliding-window inference and stitching, mask refinement."""

from ovseg.layers.pamr import PAMR
from ovseg.layers.resize import rescale_size, resize_image, resize_logits
from ovseg.layers.windows import (
    Window,
    centred_padding,
    cut_windows,
    sliding_window_logits,
    stitch_windows,
    window_counts,
    window_grid,
)

__all__ = [
    "PAMR",
    "Window",
    "centred_padding",
    "cut_windows",
    "rescale_size",
    "resize_image",
    "resize_logits",
    "sliding_window_logits",
    "stitch_windows",
    "window_counts",
    "window_grid",
]
