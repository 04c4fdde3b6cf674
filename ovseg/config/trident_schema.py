"""Config schema of the Trident method (specs/trident.md): every default of the spec is a field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TridentConfig:
    short_side: int = 448
