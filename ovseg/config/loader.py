"""Config loading: YAML files with `_base_` inheritance, merged into the schema, plus overrides.

A config file is YAML whose keys are those of `ovseg.config.schema.Config`. It may name other
files it builds on::

    _base_: ../base/clip_vitb16.yaml      # or a list; paths relative to this file
    model:
      dense_clip:
        mode: sclip

Bases merge first, in the order listed (each after its own bases), then the file itself. Each
file is merged into the schema on its own, so an unknown key or a wrongly typed value is an
error that names the file and the full dotted key. Command-line overrides are detectron2-style
`KEY VALUE` pairs (`model.inference.crop 448`), with values read as YAML.

YAML is read with the YAML 1.2 core rules rather than PyYAML's 1.1 ones: only `true`/`false`
are booleans (so `mode: no` stays a string), `1e-4` is a float, `017` is the integer 17 and
`12:30` is a string. Saved configs are written with the same rules, so they read back equal.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ovseg.config.method import Method, default_config, section_owners
from ovseg.config.ranges import check_ranges
from ovseg.config.schema import Config, ModelConfig
from ovseg.errors import ConfigError

__all__ = [
    "apply_overrides", "config_to_yaml", "configs_dir", "get_config", "save_config",
    "structured_default",
]

BASE_KEY = "_base_"
COMMAND_LINE = "command line"


# --------------------------------------------------------------------------- YAML 1.2 rules


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and an error on duplicate keys."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings `_Loader` would read as something else."""


_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0o[0-7][0-7_]*)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*\.[0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


for _cls in (_Loader, _Dumper):
    # Start from no implicit resolvers so PyYAML's 1.1 ones (yes/no/on/off booleans, octal
    # `017`, sexagesimal `12:30`, timestamps) do not apply; keep only the 1.2 core schema.
    _cls.yaml_implicit_resolvers = {}
    _cls.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, list("~nN") + [""])
    _cls.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^<<$"), ["<"])
del _cls


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    if text[:2] == "0x":
        return int(text[2:], 16)
    if text[:2] == "0o":
        return int(text[2:], 8)
    return int(text, 10)  # base 10 even with a leading zero: YAML 1.2 has no `017` octal


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    # PyYAML silently keeps the last of two equal keys; in a config that hides a mistake.
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader


# --------------------------------------------------------------------------- file discovery


def configs_dir() -> Path:
    """The directory config names are relative to: `$OVSEG_CONFIGS`, else `<repo>/configs`."""
    env = os.environ.get("OVSEG_CONFIGS")
    if env:
        return Path(env).expanduser()
    # this file is <repo>/ovseg/config/loader.py (no import of the package above this layer)
    return Path(__file__).resolve().parents[2] / "configs"


def _display(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _find_config(path_or_name: str | os.PathLike[str]) -> Path:
    given = Path(path_or_name).expanduser()
    if given.is_file():
        return given.resolve()
    looked = [given.resolve()]
    if not given.is_absolute():
        in_configs = configs_dir() / given
        if in_configs.is_file():
            return in_configs.resolve()
        looked.append(in_configs.resolve())
    raise ConfigError(
        f"config file '{os.fspath(path_or_name)}' not found; looked at "
        + " and ".join(str(p) for p in looked)
        + " (names are relative to the configs directory, set by $OVSEG_CONFIGS)"
    )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: where, then what (PyYAML's own text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or not problem:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    context = f" ({context})" if context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{context}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{_display(path)}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{_display(path)}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
            "save the config as UTF-8"
        ) from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_display(path)}: invalid YAML at {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_display(path)}: a config file must be a mapping of keys, "
            f"not a {type(data).__name__}"
        )
    return data


def _base_paths(data: dict[str, Any], path: Path) -> list[Path]:
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{_display(path)}: '{BASE_KEY}' must be a file path or a list of file paths, "
            f"got {bases!r}"
        )
    resolved = []
    for base in bases:
        base_path = (path.parent / Path(base).expanduser()).resolve()
        if not base_path.is_file():
            raise ConfigError(
                f"{_display(path)}: base config '{base}' not found (looked at {base_path}; "
                f"'{BASE_KEY}' paths are relative to the file that names them)"
            )
        resolved.append(base_path)
    return resolved


def _collect_files(path: Path, stack: list[Path], out: dict[Path, dict[str, Any]]) -> None:
    """Append `path`'s bases, then `path`, to `out` in merge order.

    A file reached twice (two bases sharing a base) merges once, at its first place, so that a
    later sibling's values are not reset by a second copy of the shared base.
    """
    if path in stack:
        chain = " -> ".join(_display(p) for p in [*stack[stack.index(path) :], path])
        raise ConfigError(f"cycle in '{BASE_KEY}': {chain}")
    data = _read_yaml(path)
    for base in _base_paths(data, path):
        _collect_files(base, [*stack, path], out)
    out.setdefault(path, data)


# --------------------------------------------------------------------------- merging


def _dotted_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in node.keys():
        full = f"{prefix}{key}"
        yield full
        child = OmegaConf.select(node, str(key), throw_on_missing=False)
        if isinstance(child, DictConfig):
            yield from _dotted_keys(child, full + ".")


def _suggest(root: DictConfig, parent: DictConfig, prefix: str, key: str) -> str:
    """A ` (did you mean 'x'?)` hint for an unknown key, or ''."""
    siblings = [str(k) for k in parent.keys()]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    every = list(_dotted_keys(root))
    # The right name in the wrong section (`model.crop` for `model.inference.crop`).
    same_leaf = [k for k in every if k.rsplit(".", 1)[-1] == key]
    close = same_leaf or difflib.get_close_matches(prefix + key, every, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _has_fixed_keys(node: DictConfig) -> bool:
    # A dataclass section takes only its fields; a plain dict field would take any key.
    return is_dataclass(OmegaConf.get_type(node))


def _first_leaf(key: str, value: Any) -> str:
    """The dotted key of the first value below `key` (`model.dense_clip.mode` for a section)."""
    while isinstance(value, Mapping) and value:
        inner = next(iter(value))
        key, value = f"{key}.{inner}", value[inner]
    return key


def _unread_section(
    root: DictConfig, key: str, value: Any, source: str, owners: Mapping[str, list[str]]
) -> ConfigError:
    """The error for `model.<key>`, a section that the config's method does not read."""
    method = root.model.name
    reads = [f"model.{k}" for k in root.model.keys() if isinstance(root.model.get(k), DictConfig)]
    whose = f" (model.{key} is read by {', '.join(owners[key])})" if owners[key] else ""
    return ConfigError(
        f"{source}: '{_first_leaf('model.' + key, value)}' is not read by method '{method}'"
        f"{whose}; {method} reads {', '.join(reads) or 'no model sections'}"
    )


def _check_keys(
    root: DictConfig,
    node: DictConfig,
    data: Mapping[Any, Any],
    prefix: str,
    source: str,
    owners: Mapping[str, list[str]],
) -> None:
    """Raise a ConfigError for the first key of `data` that `node` does not have.

    OmegaConf's own merge errors lack the file and, for a scalar given where a section is
    expected, the key; checking first makes every message name both. A section of `cfg.model`
    that another method reads (`owners`) is named as such, with the method that is selected.
    """
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            section = prefix.rstrip(".") or "<top level>"
            raise ConfigError(f"{source}: keys must be non-empty strings, got {key!r} in {section}")
        full = prefix + key
        if key not in node:
            if prefix == "model." and key in owners:
                raise _unread_section(root, key, value, source, owners)
            if _has_fixed_keys(node):
                hint = _suggest(root, node, prefix, key)
                raise ConfigError(f"{source}: unknown key '{full}'{hint}")
            continue
        child = OmegaConf.select(node, key, throw_on_missing=False)
        if isinstance(child, DictConfig):
            if isinstance(value, Mapping):
                _check_keys(root, child, value, full + ".", source, owners)
            elif not (isinstance(value, str) and value.startswith("${")):
                fields = ", ".join(str(k) for k in child.keys())
                raise ConfigError(
                    f"{source}: '{full}' is a section, so its value must be a mapping of its "
                    f"keys ({fields}), not {value!r}"
                )
        elif child is not None and isinstance(value, Mapping):
            inner = f"{full}.{next(iter(value))}" if value else full
            raise ConfigError(
                f"{source}: unknown key '{inner}' ('{full}' is a value, not a section)"
            )


def _merge(
    cfg: DictConfig, data: Mapping[str, Any], source: str, owners: Mapping[str, list[str]]
) -> DictConfig:
    """`cfg` with `data` merged in; errors name `source` and the dotted key."""
    _check_keys(cfg, cfg, data, "", source, owners)
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        reason = str(getattr(e, "msg", None) or e).splitlines()[0]
        where = f"invalid value for '{key}': " if key else ""
        raise ConfigError(f"{source}: {where}{reason}") from e
    assert isinstance(merged, DictConfig)
    OmegaConf.set_struct(merged, True)
    return merged


def structured_default(name: str, methods: Mapping[str, Method] | None = None) -> DictConfig:
    """The struct-mode default config of method `name` (see :func:`default_config`)."""
    cfg = OmegaConf.structured(default_config(name, methods))
    OmegaConf.set_struct(cfg, True)  # unknown keys are errors, also when set from Python
    return cfg


def _override_pairs(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[Any, Any]]:
    if isinstance(overrides, Mapping):  # {"model.inference.crop": 448, ...}
        return list(overrides.items())
    if isinstance(overrides, str | bytes):
        raise ConfigError(
            f"{COMMAND_LINE}: overrides must be a list of KEY VALUE items, not one string "
            f"({overrides!r}); split it, e.g. with shlex.split"
        )
    items = list(overrides)
    if len(items) % 2:
        raise ConfigError(
            f"{COMMAND_LINE}: overrides must be KEY VALUE pairs, got {len(items)} items; "
            f"key '{items[-1]}' has no value"
        )
    return list(zip(items[0::2], items[1::2], strict=True))


def _method_name(
    files: Mapping[Path, Mapping[str, Any]], overrides: Sequence[str] | Mapping[str, Any]
) -> str:
    """`model.name` as the files and then the overrides set it (the schema depends on it)."""
    name: Any = ModelConfig.name
    source = "the default"
    for path, data in files.items():
        model = data.get("model")
        if isinstance(model, Mapping) and "name" in model:
            name, source = model["name"], _display(path)
    for key, raw in _override_pairs(overrides):
        value = raw
        if key == "model" and isinstance(raw, str):
            try:
                value = _yaml_load(raw)
            except yaml.YAMLError:
                continue  # apply_overrides reports it
        if key == "model" and isinstance(value, Mapping) and "name" in value:
            name, source = value["name"], COMMAND_LINE
        elif key == "model.name":
            name, source = raw, COMMAND_LINE
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: model.name must be a method name, got {name!r}")
    return name.strip()


# --------------------------------------------------------------------------- public API


def config_method_name(path_or_name: str | os.PathLike[str]) -> str | None:
    """``model.name`` as a config file and its ``_base_`` files set it, without building the
    typed config (about 0.1 s a file; listing every shipped config wants it cheap); None for a
    partial file (a base) that sets no method."""
    files: dict[Path, dict[str, Any]] = {}
    _collect_files(_find_config(path_or_name).resolve(), [], files)
    if not any(isinstance(data.get("model"), Mapping) and "name" in data["model"]
               for data in files.values()):
        return None
    return _method_name(files, ())



def get_config(
    path_or_name: str | os.PathLike[str],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    methods: Mapping[str, Method] | None = None,
) -> DictConfig:
    """Load a config file, its `_base_` files and `overrides` into a typed, struct-mode config.

    The schema is that of the method `model.name` names (as the files, then the overrides, set
    it): `schema.Config` whose `model` holds exactly the sections that method reads.
    `ovseg.get_config` passes the registry of `ovseg.methods`; without `methods` the model
    section has no method sections.

    Args:
        path_or_name: an existing file, or a name relative to the configs directory
            (`$OVSEG_CONFIGS`, else `<repo>/configs`), e.g. "dense_clip/maskclip_vitb16.yaml".
        overrides: trailing `KEY VALUE` pairs, e.g. ["model.inference.crop", "448"], or a
            mapping {"model.inference.crop": 448} (values as typed).
        methods: method name -> :class:`ovseg.config.method.Method`.

    Returns:
        A DictConfig of `schema.Config`: schema defaults, then the bases, the file, overrides.

    Raises:
        ConfigError: the file or a base is missing or not YAML, `_base_` files form a cycle, a
            key is unknown or of a section the method does not read, the method is unknown, or
            a value has the wrong type (the message names file and key).
    """
    path = _find_config(path_or_name)
    files: dict[Path, dict[str, Any]] = {}
    _collect_files(path, [], files)
    cfg = structured_default(_method_name(files, overrides), methods)
    owners = section_owners(methods)
    for file, data in files.items():
        cfg = _merge(cfg, data, _display(file), owners)
    return apply_overrides(cfg, overrides, methods)


def _parse_value(raw: Any, current: Any) -> Any:
    if not isinstance(raw, str):
        return raw  # from Python, already typed
    stripped = raw.strip()
    # A string field takes the text as typed: `weights 1e-4` or `arch 016` must not become
    # the float/int YAML reads (and back "0.0001"/"16"); lists and mappings still parse.
    if isinstance(current, str) and not stripped.startswith(("[", "{")):
        return raw
    if not stripped:
        return raw
    try:
        return _yaml_load(raw)
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{COMMAND_LINE}: cannot read value {raw!r} as YAML: {reason}") from e


def apply_overrides(
    cfg: DictConfig,
    overrides: Sequence[str] | Mapping[str, Any],
    methods: Mapping[str, Method] | None = None,
) -> DictConfig:
    """A copy of `cfg` with detectron2-style `KEY VALUE` overrides applied, left to right.

    Keys are dotted (`model.dense_clip.mode`); values are read as YAML (`448` -> int,
    `[8,16]` -> list, `{crop: 448}` merges into a section), except that a string field takes
    the text as typed. Values that are not strings (from Python) are used as they are.

    The method (``model.name``) is fixed: the config's sections are those of its method, so a
    key of another method's section is an error naming the key and the method (``methods``,
    the registry, lets the message say whose section it is).

    Raises:
        ConfigError: an odd number of items, an unknown key, a key the method does not read,
            a value of the wrong type, or a change of ``model.name``; the message names the key
            and "command line".
    """
    pairs = _override_pairs(overrides)
    owners = section_owners(methods)
    result = copy.deepcopy(cfg)
    OmegaConf.set_struct(result, True)
    for key, raw in pairs:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{COMMAND_LINE}: invalid override key {key!r}")
        current = OmegaConf.select(result, key, default=None, throw_on_missing=False)
        value = _parse_value(raw, current)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        result = _merge(result, nested, COMMAND_LINE, owners)
        if result.model.name != cfg.model.name:
            raise ConfigError(
                f"{COMMAND_LINE}: model.name cannot change from {cfg.model.name!r} to "
                f"{result.model.name!r} once a config is loaded (its sections are the method's); "
                "give it with the config file, e.g. ovseg.get_config(path, ['model.name', ...])"
            )
    check_ranges(result)
    return result


def _plain(cfg: DictConfig | Config, resolve: bool) -> dict[str, Any]:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    container = OmegaConf.to_container(cfg, resolve=resolve)
    assert isinstance(container, dict)
    return container


def config_to_yaml(cfg: DictConfig | Config, resolve: bool = False) -> str:
    """The config as YAML text that `get_config` reads back equal.

    Interpolations (`${...}`) are kept as written unless `resolve` is True.
    """
    return yaml.dump(
        _plain(cfg, resolve),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def save_config(
    cfg: DictConfig | Config, path: str | os.PathLike[str], resolve: bool = False
) -> Path:
    """Write the merged config to `path` as YAML, atomically; returns the path.

    The text goes to a temporary file in the same directory that then replaces `path`, so a
    crash never leaves a half-written config beside a checkpoint.
    """
    from ovseg.io import atomic_write_text

    text = config_to_yaml(cfg, resolve=resolve)
    # readable by all whatever the umask: a config is not secret, and others rerun it
    return atomic_write_text(Path(path).expanduser(), text, mode=0o644)
