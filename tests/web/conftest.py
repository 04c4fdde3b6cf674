"""Fixtures of the web demo's tests: demo/web.py loaded as a module, a small photo."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_DENSE_CLIP = "tiny/dense_clip_tiny.yaml"
TINY_CLOC = "tiny/cloc_tiny.yaml"


def load_web_demo() -> ModuleType:
    """demo/web.py as a module (demo/ is a folder of scripts, not a package)."""
    name = "ovseg_web_demo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "demo" / "web.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # registered before it runs: its dataclasses look their module up by name
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def web() -> ModuleType:
    return load_web_demo()


def photo() -> np.ndarray:
    """(H, W, 3) uint8 RGB: scikit-image's cat photo when installed, else smooth stripes."""
    try:
        import skimage.data

        return skimage.data.chelsea()
    except ImportError:
        rows = np.linspace(0, 255, 120, dtype=np.float32)[:, None]
        cols = np.linspace(0, 255, 160, dtype=np.float32)[None, :]
        return np.stack([rows + 0 * cols, 0 * rows + cols, (rows + cols) / 2], -1).astype(
            np.uint8)


@pytest.fixture
def photo_file(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.fromarray(photo()).save(path)
    return path
