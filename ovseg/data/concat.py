"""Several datasets read as one: a global index finds its dataset and the sample in it.

Training on ``datasets.train: [a, b]`` concatenates the sets; the caller also needs to know
which set a sample came from (each has its own ignore value), which torch's ``ConcatDataset``
does not say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ConcatenatedSamples:
    """The samples of ``datasets`` one after another; :meth:`locate` gives (dataset, sample)."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)
        self._starts = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, Any]:
        """(index of the dataset, its sample) of the global ``index``; IndexError outside."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return which, self.datasets[which][int(index - self._starts[which])]
