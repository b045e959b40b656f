"""Typed configuration: frozen dataclasses filled from a TOML file plus `key=value` overrides.

    cfg = load_config(CandidateTrainingConfig, Path("configs/candidates-small.toml"), ["dim=64"])

One loader and one set of rules for every stage's config, in the file and on the command
line alike:
- defaults first (the dataclass's own, or a given instance such as a preset), then the TOML
  file, then the overrides in order;
- sections are dotted keys (`model.dim=64`) or TOML tables (`[model]`); a section given in
  part keeps the defaults of the keys it leaves out, its parent's where they differ;
- a key that is no field of the config itself but a field of exactly one of its sections
  may leave the section out (`dim=64` for `model.dim=64`); a key two sections share must
  name its section;
- values from TOML keep their TOML types; override values are parsed by the field's
  annotation (int, float, bool, str, None-able, tuple of those, Literal choices). A tuple
  is written `a,b,c`; one of non-negative integers also `1024-512-256` (the ranker's tower
  widths), and `none` is the empty tuple.
Unknown keys and unparseable values raise `FunnelrecError` naming the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from funnelrec.errors import FunnelrecError

T = TypeVar("T")


def load_config(
    cls: type[T],
    path: Path | str | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults: T | None = None,
) -> T:
    """Build `cls` from `defaults` (an instance; default: the class's own defaults), then
    the TOML file at `path`, then `key=value` overrides (see the module doc for the rules)."""
    values: dict[str, Any] = (
        _as_tree(dataclasses.asdict(defaults))  # type: ignore[call-overload]
        if defaults is not None
        else {}
    )
    if path is not None:
        for key, value in read_toml(path).items():
            if isinstance(value, Mapping):
                _merge(values.setdefault(key, {}), value, key)
            else:
                _set_dotted(values, _resolve(cls, key.split(".")), value)
    for item in overrides:
        key, raw = _split_override(item)
        _set_dotted(values, _resolve(cls, key.split(".")), raw)
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
    return load_config(type(config), None, overrides, defaults=config)


def _sections(cls: Any) -> dict[str, Any]:
    """The fields of dataclass `cls` that are sections (dataclasses), by name."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _resolve(cls: Any, parts: list[str]) -> list[str]:
    """The full path of a key: a bare key that only one section has goes to that section."""
    if len(parts) != 1 or parts[0] in {f.name for f in dataclasses.fields(cls)}:
        return parts
    owners = [
        name
        for name, section in _sections(cls).items()
        if parts[0] in {f.name for f in dataclasses.fields(section)}
    ]
    if len(owners) > 1:
        spelled = " or ".join(f"{o}.{parts[0]}" for o in owners)
        raise FunnelrecError(f"config key '{parts[0]}' is in several sections: say {spelled}")
    return [owners[0], parts[0]] if owners else parts


def _as_tree(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _as_tree(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _merge(base: Any, top: Mapping[str, Any], where: str) -> None:
    if not isinstance(base, dict):
        raise FunnelrecError(f"config key '{where}' is not a section")
    for k, v in top.items():
        if isinstance(v, Mapping):
            _merge(base.setdefault(k, {}), v, f"{where}.{k}")
        else:
            base[k] = v


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


def _set_dotted(values: dict[str, Any], keys: list[str], raw: Any) -> None:
    for k in keys[:-1]:
        values = values.setdefault(k, {})
        if not isinstance(values, dict):
            raise FunnelrecError(f"config key '{k}' is not a section")
    values[keys[-1]] = raw


# Non-negative integers joined by dashes: a tuple written as one name (1024-512-256).
_DASHED = re.compile(r"\d+(-\d+)+")


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
        inner = args[0] if args else Any
        items = value
        if isinstance(value, str):
            # "none" (or nothing) is the empty list: e.g. a tower with no hidden layer.
            text = "" if value.strip().lower() == "none" else value
            if inner is int and _DASHED.fullmatch(text.strip()):
                text = text.replace("-", ",")  # 1024-512-256
            items = [s for s in text.replace("->", ",").split(",") if s.strip()]
        if not isinstance(items, Sequence):
            raise FunnelrecError(f"config key '{key}' must be a list, got {value!r}")
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
