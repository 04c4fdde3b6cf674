"""Test-wide settings: a private text cache, quiet third-party loggers."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _private_text_cache(tmp_path_factory, monkeypatch):
    # tests never read or write the user's ~/.cache/ovseg
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path_factory.getbasetemp() / "ovseg-cache"))


logging.getLogger("root").setLevel(logging.ERROR)
