"""Configs: the typed schema and the loader (YAML files, `_base_` inheritance, overrides)."""

from ovseg.config.loader import apply_overrides, config_to_yaml, get_config, save_config
from ovseg.config.schema import Config

__all__ = ["Config", "apply_overrides", "config_to_yaml", "get_config", "save_config"]
