"""Small helpers shared by the tests: locating ../shared fixtures, tiny configs."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_fixture_dir(name: str) -> Path | None:
    """``../shared/fixtures/<name>`` beside the repository (as CI lays it out), or None."""
    for base in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared"):
        candidate = base / "fixtures" / name
        if candidate.is_dir():
            return candidate
    return None
