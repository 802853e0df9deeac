"""How values get into the config tree: YAML files layered in order, ``--set`` overrides, strict
types. Generic over any dataclass tree (config.py holds ours and its defaults); nanoGPT's
configurator.py plays this part there.

* ``read_yaml(path) -> dict`` and ``merge(base, layer)``: a later file's key replaces the earlier one's,
  section by section.
* ``fill(obj, data)``: copy nested ``data`` into the dataclass ``obj``; ``apply_override(obj, "a.b=v")``.
* Unknown keys and wrong types are ``ConfigError``s that name the dotted key and list the valid
  keys of that section; no value is silently ignored. YAML 1.1 reads "1e-3" as a string: float keys
  take numbers and numeric strings.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


def _describe(tp) -> str:
    """A type as an error message says it: ``true/false``, ``'auto'``, ``a float``."""
    if tp is bool:
        return "true/false"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value, tp):
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None, Precision
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return check_value(key, value, args[0])
        for a in args:
            try:
                return check_value(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {' or '.join(map(_describe, args))}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' expects one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float:
        # YAML reads "1e-3" as a string (YAML 1.1); accept numbers and numeric strings for floats.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:  # not a number: the error below names the key
                raise ConfigError(f"config key '{key}' expects a float, got {value!r}") from None
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def fill(obj, data: dict, prefix: str = ""):
    """Recursively copy ``data`` into the dataclass instance ``obj``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys in "
                              f"'{prefix.rstrip('.') or '<root>'}': {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            fill(current, value, dotted + ".")
        else:
            setattr(obj, key, check_value(dotted, value, hints[key]))
    return obj


def apply_override(cfg, assignment: str) -> None:
    """Apply one ``a.b=value`` override to the dataclass tree ``cfg`` in place; ``value`` is parsed
    as YAML (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    *path, leaf = dotted.strip().split(".")
    node = cfg
    walked = ""
    for part in path:
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names or not dataclasses.is_dataclass(getattr(node, part)):
            raise ConfigError(f"unknown config section '{walked + part}'; valid keys in "
                              f"'{walked.rstrip('.') or '<root>'}': {', '.join(names)}")
        node = getattr(node, part)
        walked += part + "."
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{assignment}': cannot parse value {raw!r} ({e})") from e
    fill(node, {leaf: value}, walked)


def merge(base: dict, layer: dict) -> dict:
    """``layer`` over ``base``, section by section (a later file's key replaces the earlier one's)."""
    out = dict(base)
    for key, value in layer.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; the default is config.yaml at the "
                          f"repository root")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold sections (key: value), got "
                          f"{type(data).__name__}")
    return data
