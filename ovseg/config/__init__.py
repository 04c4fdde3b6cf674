"""Configs: the typed schema and the loader (YAML files, `_base_` inheritance, overrides)."""

from ovseg.config.loader import (
    apply_overrides,
    config_method_name,
    config_to_yaml,
    get_config,
    save_config,
    structured_default,
)
from ovseg.config.method import Method, default_config
from ovseg.config.schema import Config

__all__ = [
    "Config", "Method", "apply_overrides", "config_method_name", "config_to_yaml",
    "default_config", "get_config", "save_config", "structured_default",
]
