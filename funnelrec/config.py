"""Typed configuration: frozen dataclasses filled from a TOML file plus `key=value` overrides.

    cfg = load_config(TrainConfig, Path("configs/small.toml"), ["lr=0.01", "tower.depth=3"])

Values from TOML keep their TOML types; values from overrides are strings parsed by the
field's annotation (int, float, bool, str, None-able, tuple of those, Literal choices,
nested dataclasses by dotted keys). Unknown keys and unparseable values raise
`FunnelrecError` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from funnelrec.errors import FunnelrecError

T = TypeVar("T")


def load_config(cls: type[T], path: Path | str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from defaults, then the TOML file at `path`, then `key=value` overrides."""
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides:
        key, raw = _split_override(item)
        _set_dotted(values, key.split("."), raw)
    return from_dict(cls, values)


def read_toml(path: Path | str) -> dict[str, Any]:
    """A TOML file as a dict; unreadable or invalid files raise `FunnelrecError`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise FunnelrecError(f"{path}: cannot read config ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise FunnelrecError(f"{path}: invalid TOML ({e})") from None


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """`config` (a dataclass instance, e.g. a preset) with `key=value` overrides applied."""
    values = dataclasses.asdict(config)  # type: ignore[call-overload]
    for item in overrides:
        key, raw = _split_override(item)
        _set_dotted(values, key.split("."), raw)
    return from_dict(type(config), values)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise FunnelrecError(f"override '{item}' is not of the form key=value")
    return key.strip(), raw.strip()


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly nested) mapping, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=3)
        hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        known = f"known: {', '.join(sorted(fields))}"
        raise FunnelrecError(f"unknown config key '{prefix}{unknown[0]}' ({hint or known})")
    kwargs = {}
    for name, v in values.items():
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
            # A partial section keeps the parent's own defaults for the keys it leaves out
            # (a field's default_factory may differ from the section class's defaults).
            v = {**dataclasses.asdict(default), **v}  # type: ignore[arg-type]
        kwargs[name] = _coerce(hints[name], v, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise FunnelrecError(f"invalid config {cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for JSON metadata)."""
    return dataclasses.asdict(obj)


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _set_dotted(values: dict[str, Any], keys: list[str], raw: str) -> None:
    for k in keys[:-1]:
        values = values.setdefault(k, {})
        if not isinstance(values, dict):
            raise FunnelrecError(f"config key '{k}' is not a section")
    values[keys[-1]] = raw


def _parse_int(text: str) -> int:
    """An integer written plainly or as 1e6 / 100.0 (common in configs of sizes)."""
    try:
        return int(text)
    except ValueError:
        f = float(text)  # ValueError propagates: not a number at all
        if not f.is_integer():
            raise
        return int(f)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise FunnelrecError(f"config key '{key}' is a section, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except FunnelrecError as e:
                errors.append(str(e))
        raise FunnelrecError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise FunnelrecError(
            f"config key '{key}' must be one of {', '.join(map(str, args))}, got {value!r}"
        )
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            # "none" (or nothing) is the empty list: e.g. a tower with no hidden layer.
            text = "" if value.strip().lower() == "none" else value
            items = [s for s in text.replace("->", ",").split(",") if s.strip()]
        if not isinstance(items, Sequence):
            raise FunnelrecError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(inner, v, key) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise FunnelrecError(f"config key '{key}' must be true or false, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise FunnelrecError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            if isinstance(value, str) and tp is not str:
                value = value.strip().replace("_", "")
                if tp is int:
                    return _parse_int(value)
            return tp(value)
        except (TypeError, ValueError):
            kind = {int: "an integer", float: "a number", str: "a string"}[tp]
            raise FunnelrecError(f"config key '{key}' must be {kind}, got '{value}'") from None
    return value
