"""Config schema of training: solver, LR schedule, data loading, checkpoints, periodic eval."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SolverConfig:
    max_iter: int = 1000


@dataclass
class DataLoaderConfig:
    num_workers: int = 0
