"""Typed loading of configuration data into frozen dataclasses.

A config section is a dataclass; its field types say what the TOML may hold
(str, int, float, bool, list[...], dict[str, ...], nested dataclasses,
``X | None``). Unknown keys, wrong types and values a section's
``__post_init__`` rejects all become a :class:`ConfigError` that names the
file, the dotted key and the problem.

String values of the form ``env:NAME`` are replaced by the environment
variable NAME, so secrets never need to be written into the file.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping


class ConfigError(Exception):
    def __init__(self, source: str, key: str, problem: str):
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key or '<top level>'}: {problem}")


_NoneType = type(None)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    name = "one of" if origin in (typing.Union, types.UnionType) else getattr(origin, "__name__", str(origin))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return f"{name}[{args}]"


def _convert(value: Any, tp: Any, key: str, source: str, env: Mapping[str, str]) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in env:
            raise ConfigError(source, key, f"environment variable {name} is not set")
        value = env[name]
        if tp in (int, float, bool):
            value = _parse_scalar(value, tp, key, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and _NoneType in args:
            return None
        errors = []
        for arg in args:
            if arg is _NoneType:
                continue
            try:
                return _convert(value, arg, key, source, env)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(source, key, "; ".join(errors))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(source, key, f"must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list, not {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]", source, env) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a table, not {type(value).__name__}")
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source, env) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a table, not {type(value).__name__}")
        return load_section(tp, value, source, key, env)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(source, key, f"unsupported type {_type_name(tp)}")


def _parse_scalar(text: str, tp: type, key: str, source: str) -> Any:
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return tp(text)
    except ValueError:
        raise ConfigError(source, key, f"environment value {text!r} is not a valid {tp.__name__}") from None


def load_section(cls: type, data: Mapping[str, Any], source: str, prefix: str = "",
                 env: Mapping[str, str] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, with precise errors."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = raw_key.replace("-", "_")
        key = f"{prefix}.{raw_key}" if prefix else raw_key
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(source, key, f"unknown key (known keys here: {known})")
        kwargs[name] = _convert(value, hints[name], key, source, env)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        problem = str(exc)
        # A section's __post_init__ may name the field as "field: problem".
        field_name, sep, rest = problem.partition(": ")
        if sep and field_name in fields:
            key = f"{prefix}.{field_name}" if prefix else field_name
            raise ConfigError(source, key, rest) from None
        raise ConfigError(source, prefix, problem) from None
