"""The mapping of `funnelrec data import events`: where each canonical table's rows come
from, and which source column feeds which canonical column. One TOML table per source:

    [watches]                       # required
    path = "logs/watches/*.csv"     # a file, a directory or a glob (or a list of them),
                                    # relative to the mapping file
    format = "csv"                  # csv, tsv, parquet or jsonl; default: the file extension
    user = "uid"                    # source column names
    item = "video"
    time = "event_time"
    time_unit = "iso"               # s, ms, us or iso (ISO-8601 text); default s
    watch_time = "watched"
    watch_time_unit = "ms"          # s or ms; default s

    [impressions]  path, user, item, time, clicked; optional watch_time, request, position
    [searches]     path, user, time, query
    [users]        path, user; optional age, gender, region, device, logged_in
    [items]        path, item; optional channel, topic, title, language, upload_time,
                   duration (with upload_time_unit, duration_unit)

`time_zone` (default UTC) says which zone ISO times without an offset are in. `delimiter`
overrides the separator of csv (",") and tsv (tab) files. The mapping is checked as a
whole before any file is read: an unknown table or key, a missing required key, a value
of the wrong type or outside its choices is a `DataError` naming the mapping file.
"""

from __future__ import annotations

import tomllib
import zoneinfo
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from funnelrec.errors import DataError

FORMATS = ("csv", "tsv", "parquet", "jsonl")
# File extensions a format is recognised by when the mapping does not name one.
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
DELIMITERS = {"csv": ",", "tsv": "\t"}
TIME_UNITS = ("s", "ms", "us", "iso")
LENGTH_UNITS = ("s", "ms")

# Canonical table -> (required column keys, optional column keys), in the order the
# columns are checked (and so the order in which a row's first problem is named).
COLUMN_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "watches": (("user", "item", "time"), ("watch_time", "source")),
    "impressions": (("user", "item", "time", "clicked"), ("watch_time", "request", "position")),
    "searches": (("user", "time", "query"), ()),
    "users": (("user",), ("age", "gender", "region", "device", "logged_in")),
    "items": (("item",), ("channel", "topic", "title", "language", "upload_time", "duration")),
}
# Unit key -> (the column key it qualifies, its choices, its default).
UNIT_KEYS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "time_unit": ("time", TIME_UNITS, "s"),
    "watch_time_unit": ("watch_time", LENGTH_UNITS, "s"),
    "upload_time_unit": ("upload_time", TIME_UNITS, "s"),
    "duration_unit": ("duration", LENGTH_UNITS, "s"),
}
# The order tables are read in: events first, so that metadata rows of ids no event
# mentions are still numbered after them within a period (the numbering is sorted anyway).
TABLE_ORDER = ("watches", "impressions", "searches", "users", "items")


@dataclass(frozen=True)
class SourceMapping:
    """One canonical table's source: its files and which source column feeds what."""

    table: str
    paths: tuple[str, ...]
    columns: dict[str, str]  # column key ("user", "time", ...) -> source column name
    units: dict[str, str] = field(default_factory=dict)  # column key -> unit
    format: str | None = None
    delimiter: str | None = None
    time_zone: str = "UTC"

    def unit(self, key: str) -> str:
        return self.units.get(key, "s")

    def source_columns(self) -> list[str]:
        """The distinct source columns read, in mapping order."""
        return list(dict.fromkeys(self.columns.values()))

    def to_dict(self) -> dict[str, Any]:
        """The TOML table this mapping was read from (paths as given)."""
        out: dict[str, Any] = {"path": list(self.paths)}
        if self.format is not None:
            out["format"] = self.format
        if self.delimiter is not None:
            out["delimiter"] = self.delimiter
        out.update(self.columns)
        for unit_key, (key, _, _) in UNIT_KEYS.items():
            if key in self.units:
                out[unit_key] = self.units[key]
        if self.time_zone != "UTC":
            out["time_zone"] = self.time_zone
        return out


@dataclass(frozen=True)
class Mapping:
    """Every source of an import; relative paths are relative to `base`."""

    sources: dict[str, SourceMapping]
    base: Path
    origin: str  # how messages name the mapping (its file)

    def to_dict(self) -> dict[str, Any]:
        return {name: s.to_dict() for name, s in self.sources.items()}

    def with_paths(self, paths: MappingABC[str, Sequence[str]], base: Path) -> Mapping:
        """The same column mapping reading other files: only the tables in `paths`, whose
        paths are relative to `base` (an append's new logs)."""
        unknown = [t for t in paths if t not in self.sources]
        if unknown:
            raise DataError(
                f"no [{unknown[0]}] in the mapping (it maps {', '.join(self.sources)})",
                path=self.origin,
            )
        sources = {
            name: replace(self.sources[name], paths=tuple(str(p) for p in paths[name]))
            for name in TABLE_ORDER
            if name in paths
        }
        return Mapping(sources, Path(base), self.origin)


def load_mapping(path: Path | str) -> Mapping:
    """Read and check a mapping file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("cannot read (no such file)", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read ({(e.strerror or str(e)).lower()})", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid TOML ({e})", path=path) from None
    return parse_mapping(raw, origin=str(path), base=path.parent)


def parse_mapping(raw: MappingABC[str, Any], *, origin: str, base: Path) -> Mapping:
    """Check a mapping given as a dict (a parsed TOML file, or a manifest's copy)."""
    unknown = [k for k in raw if k not in COLUMN_KEYS]
    if unknown:
        raise DataError(
            f"unknown table [{unknown[0]}] (expected {', '.join(TABLE_ORDER)})", path=origin
        )
    if "watches" not in raw:
        raise DataError("no [watches] table: the watches are required", path=origin)
    sources = {}
    for name in TABLE_ORDER:
        if name in raw:
            sources[name] = _parse_source(name, raw[name], origin)
    return Mapping(sources, Path(base), origin)


def _parse_source(table: str, raw: Any, origin: str) -> SourceMapping:
    def fail(message: str) -> DataError:
        return DataError(f"[{table}]: {message}", path=origin)

    if not isinstance(raw, MappingABC):
        raise fail("must be a table of keys")
    required, optional = COLUMN_KEYS[table]
    has_time = any(k in ("time", "upload_time") for k in required + optional)
    units = {u: spec for u, spec in UNIT_KEYS.items() if spec[0] in required + optional}
    allowed = ["path", "format", "delimiter", *required, *optional, *units]
    if has_time:
        allowed.append("time_zone")
    for key in raw:
        if key not in allowed:
            raise fail(f"unknown key '{key}' (expected {', '.join(allowed)})")
    missing = [k for k in ("path", *required) if k not in raw]
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")

    def text(key: str) -> str:
        value = raw[key]
        if not isinstance(value, str) or not value:
            raise fail(f"'{key}' must be a non-empty string, got {value!r}")
        return value

    path_value = raw["path"]
    paths = [path_value] if isinstance(path_value, str) else path_value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise fail(f"'path' must be a string or a list of strings, got {path_value!r}")

    fmt = None
    if "format" in raw:
        fmt = text("format")
        if fmt not in FORMATS:
            raise fail(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    delimiter = None
    if "delimiter" in raw:
        delimiter = text("delimiter")
        if len(delimiter) != 1:
            raise fail(f"'delimiter' must be one character, got {delimiter!r}")
        if fmt not in (None, *DELIMITERS):
            raise fail(f"'delimiter' applies to csv and tsv files, not {fmt}")

    columns = {k: text(k) for k in (*required, *optional) if k in raw}
    unit_values = {}
    for unit_key, (key, choices, _) in units.items():
        if unit_key not in raw:
            continue
        value = text(unit_key)
        if value not in choices:
            raise fail(f"{unit_key} '{value}' is not one of {', '.join(choices)}")
        if key not in columns:
            raise fail(f"{unit_key} is given but '{key}' is not mapped")
        unit_values[key] = value
    time_zone = "UTC"
    if "time_zone" in raw:
        time_zone = text("time_zone")
        try:
            zoneinfo.ZoneInfo(time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise fail(f"unknown time zone '{time_zone}'") from None
    return SourceMapping(
        table=table,
        paths=tuple(paths),
        columns=columns,
        units=unit_values,
        format=fmt,
        delimiter=delimiter,
        time_zone=time_zone,
    )
