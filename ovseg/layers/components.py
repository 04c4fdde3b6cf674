"""Connected components of a binary mask (8-connected), with their boxes and areas."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Components:
    """The connected components of one binary mask.

    labels: (H, W) int32; 0 outside every component, k + 1 inside component k.
    boxes: (K, 4) int64 (x0, y0, x1, y1), inclusive pixel bounds of each component.
    areas: (K,) int64 pixel counts.
    """

    labels: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray

    def __len__(self) -> int:
        return int(self.areas.shape[0])

    def box_slices(self, k: int) -> tuple[slice, slice]:
        """(rows, cols) slices of component k's box."""
        x0, y0, x1, y1 = (int(v) for v in self.boxes[k])
        return slice(y0, y1 + 1), slice(x0, x1 + 1)

    def mask_in_box(self, k: int) -> np.ndarray:
        """(box_h, box_w) bool mask of component k inside its box."""
        rows, cols = self.box_slices(k)
        return self.labels[rows, cols] == k + 1


def connected_components(mask: np.ndarray, connectivity: int = 8) -> Components:
    """Label the connected components of a binary mask.

    Args:
        mask: (H, W) bool (or any array whose non-zero pixels are the foreground).
        connectivity: 8 (diagonal neighbours join) or 4.

    Returns:
        :class:`Components`, in the order OpenCV finds them (top-down scan).
    """
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects an (H, W) mask, got {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary, connectivity=connectivity, ltype=cv2.CV_32S
    )
    stats = stats[1:].astype(np.int64)  # row 0 is the background
    x0, y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    boxes = np.stack(
        [x0, y0, x0 + stats[:, cv2.CC_STAT_WIDTH] - 1, y0 + stats[:, cv2.CC_STAT_HEIGHT] - 1],
        axis=1,
    ).reshape(count - 1, 4)
    return Components(labels=labels, boxes=boxes, areas=stats[:, cv2.CC_STAT_AREA].copy())
