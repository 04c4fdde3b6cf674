"""What the config layer knows of a method: its builder and the sections of ``cfg.model`` it reads.

The registry in :mod:`ovseg.methods` pairs each builder with its settings dataclass, which sits
beside the method's code; the loader builds a config's schema from the method that
``model.name`` names, so a config holds exactly the sections that method reads and a key of
another method's section is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from ovseg.config.schema import SHARED_MODEL_SECTIONS, Config, ModelConfig
from ovseg.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """A registered method.

    build: ``build(cfg) -> model`` from a full config.
    settings: the dataclass of ``cfg.model.<name>`` (None: the method has no settings of its own).
    reads: the shared sections of ``cfg.model`` it reads (``clip``, ``dino``, ``sam``,
        ``inference``), each under its one name.
    extra: more sections the method owns, name -> dataclass (dense_clip: ``pamr``).
    encoders: ``encoders(cfg) -> names`` of the encoder sections (``clip``, ``dino``, ``sam``)
        a build of ``cfg`` holds, where that depends on settings (dense_clip: DINO only as
        ProxyCLIP's proxy); None = every encoder section it reads.
    """

    build: Callable[[Any], Any]
    settings: type | None = None
    reads: tuple[str, ...] = ()
    extra: Mapping[str, type] = field(default_factory=dict)
    encoders: Callable[[Any], tuple[str, ...]] | None = None

    def built_encoders(self, cfg: Any) -> tuple[str, ...]:
        """The encoder sections of ``cfg.model`` that a build of ``cfg`` holds."""
        if self.encoders is not None:
            return tuple(self.encoders(cfg))
        return tuple(key for key in self.reads if key in ("clip", "dino", "sam"))

    def sections(self, name: str) -> dict[str, type]:
        """Every section of ``cfg.model`` the method ``name`` reads, in config order."""
        unknown = [key for key in self.reads if key not in SHARED_MODEL_SECTIONS]
        if unknown:
            raise ValueError(
                f"method {name!r} reads unknown shared sections {unknown}; shared sections are "
                f"{sorted(SHARED_MODEL_SECTIONS)}"
            )
        sections = {key: SHARED_MODEL_SECTIONS[key] for key in self.reads}
        if self.settings is not None:
            sections[name] = self.settings
        sections.update(self.extra)
        return sections


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def config_class(name: str, method: Method | None) -> type[ModelConfig]:
    """The ``cfg.model`` dataclass of method ``name``: :class:`ModelConfig` plus its sections."""
    sections = method.sections(name) if method is not None else {}
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    fields += [(key, kind, field(default_factory=kind)) for key, kind in sections.items()]
    return make_dataclass(f"{_class_name(name)}ModelConfig", fields, bases=(ModelConfig,))


def default_config(name: str, methods: Mapping[str, Method] | None) -> Config:
    """The default config of method ``name`` (a :class:`Config` whose ``model`` holds the method's
    sections). Without ``methods`` the model section has no method sections at all."""
    method = None
    if methods is not None:
        if name not in methods:
            raise ConfigError(f"model.name: unknown method {name!r}; one of {sorted(methods)}")
        method = methods[name]
    return Config(model=config_class(name, method)())


def section_owners(methods: Mapping[str, Method] | None) -> dict[str, list[str]]:
    """Section name -> the methods that read it (shared sections and every method's own)."""
    owners: dict[str, list[str]] = {key: [] for key in SHARED_MODEL_SECTIONS}
    for name, method in (methods or {}).items():
        for key in method.sections(name):
            owners.setdefault(key, []).append(name)
    return owners
