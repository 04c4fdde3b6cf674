"""Evaluation: semantic-segmentation confusion matrix and mIoU, reduced across processes."""

from __future__ import annotations

from ovseg.evaluation.sem_seg import (
    ABSENT_CLASS_POLICIES,
    EvaluationError,
    SemSegEvaluator,
    compute_metrics,
    results_to_markdown,
    write_results,
)

__all__ = [
    "ABSENT_CLASS_POLICIES",
    "EvaluationError",
    "SemSegEvaluator",
    "compute_metrics",
    "results_to_markdown",
    "write_results",
]
