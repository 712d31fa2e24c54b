"""Stage configs are frozen dataclasses. This module turns them into JSON and back, and into CLI flags.

Every conversion is strict: an unknown key, a missing required key, a value of the wrong type or a float
that is not finite (NaN, Infinity) is a ConfigError that names the field, so a typo in a flow parameter
never silently becomes a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from nanochat_core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value a user gave is wrong; the message names the field."""


def _check_type(cls_name: str, name: str, annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(cls_name, name, opt, value)
            except ConfigError:
                pass
        raise ConfigError(f"{cls_name}.{name}: {value!r} is not a valid {annotation}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [_check_type(cls_name, name, item_type, v) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{cls_name}.{name}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{cls_name}.{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON's NaN/Infinity and 1e999 parse; no field means them
                raise ConfigError(f"{cls_name}.{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{cls_name}.{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{cls_name}.{name}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
    kwargs = {name: _check_type(cls.__name__, name, hints[name], value) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from e
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def load_config_file(cls: type[T], path: str | Path) -> T:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from e
    return config_from_dict(cls, data)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` flag per dataclass field (values parsed as JSON where possible)."""
    parser.add_argument("--config", help=f"JSON file with a {cls.__name__}; flags override it")
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", default=None, metavar="VALUE")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config a CLI invocation asks for: defaults, then the --config file, then single flags."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(config_to_dict(load_config_file(cls, args.config)))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        raw = getattr(args, f"cfg_{f.name}", None)
        if raw is None:
            continue
        if hints[f.name] is str:
            data[f.name] = raw
        else:
            try:
                data[f.name] = json.loads(raw)
            except json.JSONDecodeError:
                data[f.name] = raw  # let the type check produce the error message
    return config_from_dict(cls, data)
