"""Test-wide settings: a private text cache, quiet third-party loggers."""

from __future__ import annotations

import logging
import os

import pytest

# the multi-process tests start 2 CPU processes; a one-core machine must still run them
if (os.cpu_count() or 1) < 2:
    os.environ["OVSEG_ALLOW_OVERSUBSCRIBE"] = "1"


@pytest.fixture(autouse=True)
def _private_text_cache(tmp_path_factory, monkeypatch):
    # tests never read or write the user's ~/.cache/ovseg
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path_factory.getbasetemp() / "ovseg-cache"))


logging.getLogger("root").setLevel(logging.ERROR)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a config or building a model."""
    import ovseg

    def forbidden(*args, **kwargs):
        raise AssertionError("the demo should have stopped before loading the config/model")

    monkeypatch.setattr(ovseg, "get_config", forbidden)
    monkeypatch.setattr(ovseg, "build_model", forbidden)


@pytest.fixture
def restore_ovseg_logging():
    """train_net's main, run in this process, installs its own handlers on the "ovseg" logger
    and stops propagation; put the logger back so later tests' caplog sees its records."""
    logger = logging.getLogger("ovseg")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.propagate = propagate
    logger.setLevel(level)
