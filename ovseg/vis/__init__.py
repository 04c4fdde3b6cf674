"""Visualisation and outputs: class palette, overlays with legends, atomic label/JSON writers."""

from ovseg.vis.overlay import OVERLAY_ALPHA, draw_legend, draw_regions, legend_overlay, overlay
from ovseg.vis.palette import class_color, palette
from ovseg.vis.writers import (
    atomic_path,
    class_fractions,
    write_json,
    write_label_png,
    write_rgb_png,
)

__all__ = [
    "OVERLAY_ALPHA",
    "atomic_path",
    "class_color",
    "class_fractions",
    "draw_legend",
    "draw_regions",
    "legend_overlay",
    "overlay",
    "palette",
    "write_json",
    "write_label_png",
    "write_rgb_png",
]
