"""Several datasets read as one."""

from __future__ import annotations

import pytest

from ovseg.data.concat import ConcatenatedSamples


def test_a_global_index_finds_its_dataset_and_sample():
    samples = ConcatenatedSamples([["a0", "a1"], [], ["c0", "c1", "c2"]])
    assert len(samples) == 5
    assert [samples.locate(i) for i in range(5)] == [
        (0, "a0"), (0, "a1"), (2, "c0"), (2, "c1"), (2, "c2")]  # the empty set is skipped
    for outside in (-1, 5):
        with pytest.raises(IndexError, match=f"sample {outside} of 5"):
            samples.locate(outside)
