"""Helpers of the robustness tests: the one ``error:`` line a command must print, and the files
a failed command left (the scripts themselves load with ``tests.helpers.load_script``)."""

from __future__ import annotations

from pathlib import Path


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of ``stderr`` (progress bars aside); fails on a traceback or
    on more than one error line."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def files_under(root: Path) -> list[str]:
    """Every file, link and folder under ``root``, relative, sorted ([] if it is missing)."""
    if not root.exists():
        return []
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))


