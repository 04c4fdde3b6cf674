"""Small helpers shared by the tests: locating ../shared fixtures, the repository's scripts."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_fixture_dir(name: str) -> Path | None:
    """``../shared/fixtures/<name>`` beside the repository (as CI lays it out), or None."""
    for base in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared"):
        candidate = base / "fixtures" / name
        if candidate.is_dir():
            return candidate
    return None


def load_script(relative: str) -> ModuleType:
    """Import a script of the repository (``tools/train_net.py``, ``demo/demo.py``,
    ``datasets/prepare_x.py``): they are files, not a package. A fresh module each call."""
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


def run_train_net(*args: str, timeout: int = 300, threads: int = 1
                  ) -> subprocess.CompletedProcess:
    """``tools/train_net.py ARGS`` in a subprocess with ``threads`` OpenMP threads; it must
    succeed (its stderr's end is the failure message)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result
