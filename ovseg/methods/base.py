"""What every method's ``predict`` returns, and what its ``encode`` keeps of an image.

Output memory is bounded by construction: a :class:`Prediction` holds the full-resolution
labels and the scores at the method's working resolution; class probabilities at the input
resolution are made a band of rows at a time on request, never as a whole (C, H, W) map unless
asked for with :meth:`Prediction.probabilities`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ovseg.layers.chunked_resize import BandResizer

# rows of the input resolution made at a time when labels or probabilities are built in bands,
# at most: wide images or many names get fewer, so that a band holds about BAND_ELEMENTS floats
BAND_ROWS = 64
BAND_ELEMENTS = 1 << 22


def label_dtype(num_classes: int) -> torch.dtype:
    """The integer type of a label map over ``num_classes`` classes: uint8 up to 255 classes,
    int16 up to 32767, int32 beyond. One byte a pixel instead of int64's eight keeps a
    12000x12000 result at 137 MiB (1.1 GiB as int64), within the bounded-memory promise."""
    if num_classes <= 255:
        return torch.uint8
    if num_classes <= 32767:
        return torch.int16
    return torch.int32


def band_rows_for(channels: int, width: int) -> int:
    """Rows per band for a (channels, rows, width) map: at most :data:`BAND_ROWS`, at least 1,
    about :data:`BAND_ELEMENTS` floats a band (16 MiB in float32)."""
    return max(1, min(BAND_ROWS, BAND_ELEMENTS // max(channels * width, 1)))


@dataclass
class ImageState:
    """Everything a method computes of one image that does not depend on the vocabulary.

    ``model.encode(image)`` returns one (each method a subclass with its own fields);
    ``model.predict(state, vocabulary)`` scores it without any encoder forward.

    size: (H, W) of the input image.
    """

    size: tuple[int, int]


@dataclass
class Prediction:
    """A dense open-vocabulary prediction for one image.

    labels: (H, W) **numpy** array at the input resolution, an index into ``classes``, of
        the smallest integer type that holds it (:func:`label_dtype`: uint8 up to 255 classes;
        cast with ``.astype(np.int64)`` before arithmetic that may leave that range).
    classes: the C display names, in vocabulary order.
    scores: (K, h, w) float32 **torch** tensor on the CPU at the method's working resolution
        (dense_clip: the stitched name cosines of the resized image; Trident: the name cosines
        on SAM's grid; linear probe: the stitched class logits).
    to_probabilities: turns a (K, rows, W) band of ``scores`` resized to the input width into
        (C, rows, W) class probabilities (softmax over names, max over synonyms, ...).

    :meth:`band` and :meth:`bands` give (C, rows, W) float32 torch class probabilities at the
    input resolution; :meth:`probabilities` (and its old name ``logits``) the whole (C, H, W)
    map, which costs C x H x W floats.
    """

    labels: np.ndarray
    classes: list[str]
    scores: torch.Tensor
    to_probabilities: Callable[[torch.Tensor], torch.Tensor]
    _resizer: BandResizer | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        dtype = torch.empty((), dtype=label_dtype(len(self.classes))).numpy().dtype
        if self.labels.dtype != dtype:  # methods build them so; this keeps the contract
            self.labels = self.labels.astype(dtype)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    def _resized(self) -> BandResizer:
        if self._resizer is None:
            self._resizer = BandResizer(self.scores, self.size)
        return self._resizer

    def band(self, rows: slice) -> torch.Tensor:
        """(C, len(rows), W) float32 class probabilities of rows ``rows`` (step 1)."""
        return self.to_probabilities(self._resized().rows(rows)).cpu()

    def bands(self, band_rows: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (row slice, (C, rows, W) class probabilities) from the top of the image;
        ``band_rows`` None = the bands the labels were made in (:func:`band_rows_for`)."""
        if band_rows is None:
            band_rows = band_rows_for(self.scores.shape[0], self.size[1])
        for rows, band in self._resized().bands(band_rows):
            yield rows, self.to_probabilities(band).cpu()

    def probabilities(self, band_rows: int | None = None) -> torch.Tensor:
        """(C, H, W) float32 class probabilities at the input resolution (the whole map)."""
        out = torch.empty((len(self.classes), *self.size), dtype=torch.float32)
        for rows, band in self.bands(band_rows):
            out[:, rows] = band
        return out

    @property
    def logits(self) -> torch.Tensor:
        """:meth:`probabilities` under its former name: (C, H, W), built on each access."""
        return self.probabilities()


def labels_in_bands(
    scores: torch.Tensor,
    size: tuple[int, int],
    to_labels: Callable[[torch.Tensor], torch.Tensor],
    band_rows: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """(H, W) labels on the CPU, of :func:`label_dtype` of ``num_classes`` (None = K):
    ``to_labels`` of each band of ``scores`` (K, h, w) resized to ``size``; memory is one
    band, never the whole (K, H, W) map. ``band_rows`` None = :func:`band_rows_for`, the bands
    :meth:`Prediction.bands` makes."""
    classes = scores.shape[0] if num_classes is None else num_classes
    labels = torch.empty(size, dtype=label_dtype(classes))
    for rows, band in score_bands(scores, size, band_rows):
        labels[rows] = to_labels(band).cpu()
    return labels


def score_bands(
    scores: torch.Tensor, size: tuple[int, int], band_rows: int | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, (K, rows, W)) bands of ``scores`` (K, h, w) resized to ``size``, in the
    bands of :func:`band_rows_for` unless ``band_rows`` is given."""
    if band_rows is None:
        band_rows = band_rows_for(scores.shape[0], size[1])
    yield from BandResizer(scores, size).bands(band_rows)
