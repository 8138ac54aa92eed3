"""Mappings read from YAML -> typed dataclasses, with errors that name the key.

Generic machinery behind ``ldmkit.config``: each field's type (int, float, bool, str, a
Literal, a list, a mapping, a nested dataclass, a union) is checked, and its metadata gives an
allowed range (``ranged``) or, for a section whose ``type`` key chooses its dataclass, the
choices (``by_type``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from ldmkit.config.untrusted import brief
from ldmkit.errors import ConfigError


def check(lo: float | None = None, *, strict: bool = False, hi: float | None = None,
           min_len: int | None = None) -> dict:
    """Field metadata: allowed numeric range (``strict`` makes the lower bound exclusive); for a
    list, the range of every item and its least length."""
    return {"lo": lo, "strict": strict, "hi": hi, "min_len": min_len}


def ranged(default: Any, **rng: Any) -> Any:
    return field(default=default, metadata=check(**rng))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {brief(value)}")
        return build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, item = typing.get_args(tp)
            return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {brief(value)}")


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value) and not meta.get("any_float"):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if isinstance(value, list):
        if meta.get("min_len") and len(value) < meta["min_len"]:
            raise ConfigError(f"config key '{key}' needs at least {meta['min_len']} item(s), "
                              f"got {brief(value)}")
        for i, item in enumerate(value):
            _check_range(item, meta, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        for name, item in value.items():
            _check_range(item, meta, f"{key}.{name}")
        return
    lo, hi, strict = meta.get("lo"), meta.get("hi"), meta.get("strict", False)
    if value is None or (lo is None and hi is None):
        return
    too_low = lo is not None and (value <= lo if strict else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        bound = f"> {lo}" if strict else f">= {lo}" if lo is not None else ""
        if hi is not None:
            bound = f"{bound} and <= {hi}" if bound else f"<= {hi}"
        raise ConfigError(f"config key '{key}' must be {bound}, got {brief(value)}")


def check_flag(cls: type, name: str, value: Any, flag: str) -> Any:
    """``value`` of a command-line ``flag`` that sets field ``name`` of ``cls``, typed and
    checked against the field's range: a flag is bounded exactly as the config key is."""
    field_ = {f.name: f for f in dataclasses.fields(cls)}[name]
    try:
        value = _coerce(value, typing.get_type_hints(cls)[name], name)
        _check_range(value, field_.metadata, name)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"config key '{name}'", flag, 1)) from None
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{brief(unknown[0])[1:-1]}'; allowed keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        if "by_type" in fields[name].metadata:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{name}' must be a mapping, got "
                                  f"{brief(value)}")
            kwargs[name] = _build_by_type(fields[name].metadata["by_type"], value, prefix + name)
            continue
        kwargs[name] = _coerce(value, hints[name], prefix + name)
        _check_range(kwargs[name], fields[name].metadata, prefix + name)
    return cls(**kwargs)


def _build_by_type(classes: dict[str, type], data: dict, key: str) -> Any:
    """A section whose ``type`` key chooses its dataclass (the first one when absent)."""
    kind = data.get("type", next(iter(classes)))
    if not isinstance(kind, str) or kind not in classes:
        raise ConfigError(f"config key '{key}.type' must be one of "
                          f"{', '.join(repr(k) for k in classes)}, got {brief(kind)}")
    unknown = sorted(str(k) for k in set(data) - {f.name for f in dataclasses.fields(classes[kind])})
    if unknown:
        known = [f.name for f in dataclasses.fields(classes[kind])]
        raise ConfigError(f"unknown config key '{key}.{brief(unknown[0])[1:-1]}' for {key}.type "
                          f"'{kind}'; allowed: {', '.join(known)}")
    return build(classes[kind], data, key + ".")
