"""Helpers of the robustness tests: the command-line scripts run in this process, and the one
``error:`` line they must print."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.helpers import REPO_ROOT


def load_script(relative: str) -> ModuleType:
    """Import a script of the repository (``tools/train_net.py``, ``datasets/prepare_x.py``)."""
    path = REPO_ROOT / relative
    if path.parent.name == "datasets":
        # the prepare scripts import their helpers as top-level modules, as `python
        # datasets/x.py` does; the same module objects as tests/test_prepare.py's
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        return importlib.import_module(path.stem)
    name = f"ovseg_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


