"""Source columns -> canonical values, one column of a batch at a time, with the rows that
do not convert and why (`Problems`).

Every converter takes the column as it was read (text from CSV, TSV and irregular JSON
Lines; any Arrow type from Parquet and regular JSON Lines) and returns it converted, with
the offending rows recorded and their values left null. The fast path is one Arrow cast
over the whole column; only when it fails are the failing rows looked for (a pattern
over the column, then halving for what the pattern let through), so clean data never
pays for the search.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.errors import DataError

Reasons = Callable[[np.ndarray], pa.Array]
# Which rows break a rule: an Arrow boolean array (null = no) or a numpy one.
Mask: TypeAlias = pa.Array | pa.ChunkedArray | np.ndarray

_INT = r"^[+-]?[0-9]+$"
_FLOAT = r"(?i)^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?$|^[+-]?(inf|infinity|nan)$"
# An ISO-8601 time with a zone offset: the offset follows a time of day, so that the day
# of a date alone ("2024-05-01") is not taken for one.
_ZONED = r"[T ][0-9]{2}(:?[0-9]{2}){0,2}([.,][0-9]+)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$"
# The shape of what Arrow parses as ISO-8601 (a date, a time of day, an offset); a value
# of this shape that still does not parse (month 13) is found by halving.
_ISO = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}(:?[0-9]{2}(:?[0-9]{2}([.,][0-9]+)?)?)?)?"
    r"\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")
_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000}
# Event times must fall in 1970..2199: a time outside is almost always a wrong unit.
_EVENT_TS_MAX = int(dt.datetime(2200, 1, 1, tzinfo=dt.UTC).timestamp())


@dataclass
class Problems:
    """The rows of a batch that cannot be used: each with the source column and the reason
    of the first problem found (columns are checked in the table's column order)."""

    num_rows: int
    bad: np.ndarray = field(init=False)
    _found: list[tuple[np.ndarray, str | None, pa.Array]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bad = np.zeros(self.num_rows, dtype=bool)

    def add(self, mask: Mask, column: str | None, reasons: Reasons) -> None:
        """Record the rows of `mask` not already bad; `reasons(rows)` words their problem."""
        if not isinstance(mask, np.ndarray):
            # Clean data, the common case, stays in Arrow: one pass, no conversion.
            if not pc.any(mask).as_py():
                return
            mask = as_mask(mask)
        new = mask & ~self.bad
        if not new.any():
            return
        rows = np.flatnonzero(new)
        self.bad |= new
        self._found.append((rows, column, reasons(rows)))

    def add_rows(self, rows: Sequence[int], column: str | None, reasons: Sequence[str]) -> None:
        mask = np.zeros(self.num_rows, dtype=bool)
        mask[np.asarray(rows, dtype=np.int64)] = True
        by_row = dict(zip(rows, reasons, strict=True))
        self.add(mask, column, lambda r: pa.array([by_row[int(i)] for i in r], pa.string()))

    @property
    def any(self) -> bool:
        return bool(self._found)

    def rows(self) -> tuple[np.ndarray, pa.Array, pa.Array]:
        """Every bad row (ascending), its column and its reason."""
        rows = np.concatenate([r for r, _, _ in self._found])
        columns = pa.concat_arrays([pa.array([c] * r.size, pa.string()) for r, c, _ in self._found])
        reasons = pa.concat_arrays([x.cast(pa.string()) for _, _, x in self._found])
        order = np.argsort(rows, kind="stable")
        return rows[order], columns.take(order), reasons.take(order)


# --- the reasons, worded with the offending values --------------------------------------


def _text(values: pa.Array) -> pa.Array:
    out = values if pa.types.is_string(values.type) else pc.cast(values, pa.string())
    return pc.fill_null(out, "")


def quoted(values: pa.Array, suffix: str = "", prefix: str = "") -> pa.Array:
    """`prefix'value'suffix` for each value (vectorised)."""
    return pc.binary_join_element_wise(prefix + "'", _text(values), "'" + suffix, "")


def fixed(message: str) -> Reasons:
    return lambda rows: pa.array([message] * rows.size, pa.string())


def _take(values: pa.Array, rows: np.ndarray) -> pa.Array:
    return values.take(pa.array(rows))


# --- conversions ------------------------------------------------------------------------


def as_mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as a numpy mask (null = false)."""
    filled = pc.fill_null(values, False)
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=bool)


def _blank(values: pa.Array) -> pa.Array:
    """Missing values: null, or text that is empty or only white space."""
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        return pc.is_null(values)
    empty = pc.or_(pc.equal(pc.binary_length(values), 0), pc.utf8_is_space(values))
    return pc.or_kleene(pc.is_null(values), empty)


def _to_text(values: pa.Array) -> pa.Array:
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_large_string(values.type) or pa.types.is_dictionary(values.type):
        return pc.cast(values, pa.string())
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.string())
    return pc.cast(values, pa.string())


def identifiers(values: pa.Array, column: str, problems: Problems) -> pa.Array:
    """Raw ids as text (numbers become their decimal text); a missing id is a problem."""
    text = _to_text(values)
    problems.add(_blank(text), column, fixed("missing value"))
    return text


def labels(values: pa.Array, column: str, problems: Problems, *, required: bool) -> pa.Array:
    """Free text (a query, a title, a region): empty is null, or a problem if required."""
    text = _to_text(values)
    blank = _blank(text)
    if required:
        problems.add(blank, column, fixed("missing value"))
    if pc.any(blank).as_py():
        text = pc.if_else(blank, pa.scalar(None, pa.string()), text)
    return text


def choices(values: pa.Array, column: str, problems: Problems, allowed: Sequence[str]) -> pa.Array:
    """Text that must be one of `allowed` where present (a watch's source)."""
    text = labels(values, column, problems, required=False)
    outside = pc.and_(
        pc.invert(pc.is_in(text, value_set=pa.array(list(allowed)))), pc.is_valid(text)
    )
    problems.add(
        outside, column, lambda r: quoted(_take(text, r), f" is not one of {', '.join(allowed)}")
    )
    return text


def _failing(values: pa.Array, to: pa.DataType) -> np.ndarray:
    """The rows of `values` that do not cast to `to`, found by halving the failing slices."""
    bad = np.zeros(len(values), dtype=bool)
    stack = [(0, len(values))]
    while stack:
        start, stop = stack.pop()
        try:
            pc.cast(values.slice(start, stop - start), to)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        if stop - start == 1:
            bad[start] = True
        else:
            mid = (start + stop) // 2
            stack += [(mid, stop), (start, mid)]
    return bad


def _cast_text(
    text: pa.Array, to: pa.DataType, pattern: str, filler: str
) -> tuple[pa.Array, np.ndarray]:
    """Cast text with nulls kept; returns the values (null where they do not convert) and
    the rows that do not convert."""
    try:
        return pc.cast(text, to), np.zeros(len(text), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    trimmed = pc.utf8_trim_whitespace(text)
    ok = as_mask(pc.match_substring_regex(trimmed, pattern)) | ~as_mask(pc.is_valid(text))
    candidate = pc.if_else(pa.array(ok), trimmed, pa.scalar(filler))
    fails = ~ok
    try:
        out = pc.cast(candidate, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fails |= _failing(candidate, to)
        out = pc.cast(pc.if_else(pa.array(fails), pa.scalar(filler), candidate), to)
    out = pc.if_else(pa.array(fails), pa.scalar(None, to), out)
    return out, fails


def numbers(
    values: pa.Array,
    column: str,
    problems: Problems,
    *,
    required: bool,
    minimum: float | None = None,
    what: str = "a number",
) -> pa.Array:
    """float64 values: finite, at least `minimum`; missing ones null (a problem if required)."""
    if pa.types.is_boolean(values.type) or not (
        pa.types.is_integer(values.type)
        or pa.types.is_floating(values.type)
        or pa.types.is_decimal(values.type)
        or pa.types.is_null(values.type)
    ):
        text = labels(values, column, problems, required=required)
        out, fails = _cast_text(text, pa.float64(), _FLOAT, "0")
        problems.add(fails, column, lambda r: quoted(_take(text, r), f" is not {what}"))
    else:
        out = pc.cast(values, pa.float64())
        if required:
            problems.add(pc.is_null(out), column, fixed("missing value"))
    problems.add(
        pc.invert(pc.is_finite(out)),
        column,
        lambda r: quoted(_take(values, r), f" is not {what}"),
    )
    if minimum is not None:
        problems.add(
            pc.less(out, minimum),
            column,
            lambda r: quoted(_take(values, r), f" is below the minimum {minimum:g}", "value "),
        )
    return out


def counts(values: pa.Array, column: str, problems: Problems, *, what: str) -> pa.Array:
    """Whole numbers >= 0 (a position on a page) as int64; missing is a problem."""
    if pa.types.is_integer(values.type):
        out = pc.cast(values, pa.int64())
        problems.add(pc.is_null(out), column, fixed("missing value"))
    else:
        text = labels(values, column, problems, required=True)
        out, fails = _cast_text(text, pa.int64(), _INT, "0")
        problems.add(fails, column, lambda r: quoted(_take(text, r), f" is not {what}"))
    problems.add(
        pc.less(out, 0),
        column,
        lambda r: quoted(_take(values, r), " is below the minimum 0", "value "),
    )
    return out


def flags(values: pa.Array, column: str, problems: Problems, *, required: bool) -> pa.Array:
    """Booleans from true/false, 1/0, yes/no, t/f, y/n (any case) or 0/1 numbers."""
    if pa.types.is_boolean(values.type):
        out = values
    elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        problems.add(
            as_mask(pc.invert(pc.is_in(values, value_set=pa.array([0, 1], values.type))))
            & as_mask(pc.is_valid(values)),
            column,
            lambda r: quoted(_take(values, r), " is not 0 or 1"),
        )
        out = pc.cast(pc.if_else(pc.equal(values, 1), True, False), pa.bool_())
        out = pc.if_else(pc.is_valid(values), out, pa.scalar(None, pa.bool_()))
    else:
        text = labels(values, column, problems, required=required)
        low = pc.utf8_lower(pc.utf8_trim_whitespace(text))
        is_true = as_mask(pc.is_in(low, value_set=pa.array(list(_TRUE))))
        is_false = as_mask(pc.is_in(low, value_set=pa.array(list(_FALSE))))
        problems.add(
            ~(is_true | is_false) & as_mask(pc.is_valid(text)),
            column,
            lambda r: quoted(_take(text, r), " is not a flag (true/false, 1/0, yes/no)"),
        )
        out = pa.array(is_true, mask=~(is_true | is_false))
    if required:
        problems.add(pc.is_null(out), column, fixed("missing value"))
    return out


def lengths(
    values: pa.Array, column: str, problems: Problems, *, unit: str, required: bool, what: str
) -> pa.Array:
    """A duration in seconds (float64) from seconds or milliseconds, >= 0."""
    out = numbers(values, column, problems, required=required, minimum=0, what=what)
    return pc.divide(out, float(_SCALE[unit])) if unit != "s" else out


def times(
    values: pa.Array,
    column: str,
    problems: Problems,
    *,
    unit: str,
    time_zone: str,
    required: bool,
    event: bool,
) -> pa.Array:
    """UTC epoch seconds (int64, floored) from epoch numbers in `unit` (s, ms, us), from
    ISO-8601 text (`unit` "iso"; text without an offset is in `time_zone`), or from Arrow
    timestamps and dates. Event times must fall in 1970..2199 (a time outside is almost
    always a wrong `time_unit`)."""
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        seconds = _timestamp_seconds(values, time_zone)
    elif unit == "iso":
        text = labels(values, column, problems, required=False)
        micros, fails = _iso_micros(text, time_zone)
        problems.add(fails, column, lambda r: quoted(_take(text, r), " is not an ISO-8601 time"))
        seconds = _floor_div(micros, 1_000_000)
    elif (integral := _integers(values)) is not None:
        # Whole epoch numbers, the common case: no detour through floating point.
        seconds = _floor_div(integral, _SCALE[unit]) if unit != "s" else integral
    else:
        what = f"a time in {unit}"
        number = numbers(values, column, problems, required=False, what=what)
        scaled = np.floor(number.to_numpy(zero_copy_only=False) / _SCALE[unit])
        # Beyond int64 seconds: cannot be a time (and would not convert).
        huge = np.abs(np.nan_to_num(scaled, nan=0.0)) >= 2.0**62
        problems.add(huge, column, lambda r: quoted(_take(values, r), f" is not {what}"))
        seconds = pa.array(
            np.where(huge | np.isnan(scaled), 0, scaled).astype(np.int64),
            mask=np.isnan(scaled) | huge,
        )
    if required:
        problems.add(pc.is_null(seconds), column, fixed("missing value"))
    if event:
        outside = pc.or_(pc.less(seconds, 0), pc.greater_equal(seconds, _EVENT_TS_MAX))
        suffix = " is not between 1970 and 2200" + (
            "" if unit == "iso" else f" as a time in {unit} (is time_unit right?)"
        )
        problems.add(outside, column, lambda r: quoted(_take(values, r), suffix))
    return seconds


def _integers(values: pa.Array) -> pa.Array | None:
    """int64 values, when every value converts to one (nulls and empty text are null)."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64())
    if not pa.types.is_string(values.type):
        return None
    try:
        return pc.cast(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _floor_div(values: pa.Array, by: int) -> pa.Array:
    raw = np.asarray(pc.fill_null(values, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    if not values.null_count:
        return pa.array(raw // by)
    return pa.array(raw // by, mask=~as_mask(pc.is_valid(values)))


def _timestamp_seconds(values: pa.Array, time_zone: str) -> pa.Array:
    if pa.types.is_date(values.type):
        values = pc.cast(values, pa.timestamp("s"))
    if values.type.tz is None and time_zone != "UTC":
        values = pc.assume_timezone(values, time_zone, ambiguous="earliest", nonexistent="earliest")
    unit_per_s = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[values.type.unit]
    return _floor_div(pc.cast(values, pa.int64()), unit_per_s)


def _iso_micros(text: pa.Array, time_zone: str) -> tuple[pa.Array, np.ndarray]:
    """Microseconds since the epoch (UTC) of ISO-8601 text, and the rows that do not parse."""
    zoned_type = pa.timestamp("us", tz="UTC")
    naive_type = pa.timestamp("us")

    def localise(naive: pa.Array) -> pa.Array:
        if time_zone == "UTC":
            return pc.cast(naive, pa.int64())
        local = pc.assume_timezone(naive, time_zone, ambiguous="earliest", nonexistent="earliest")
        return pc.cast(local, pa.int64())

    try:
        return pc.cast(pc.cast(text, zoned_type), pa.int64()), np.zeros(len(text), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        return localise(pc.cast(text, naive_type)), np.zeros(len(text), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Mixed, or some rows do not parse: the zoned and the naive rows apart.
    trimmed = pc.utf8_trim_whitespace(text)
    zoned = as_mask(pc.match_substring_regex(trimmed, _ZONED))
    valid = as_mask(pc.is_valid(text))
    zoned_values, zoned_fails = _cast_text(
        pc.if_else(pa.array(zoned & valid), trimmed, pa.scalar(None, pa.string())),
        zoned_type,
        _ISO,
        "1970-01-01T00:00:00Z",
    )
    naive_values, naive_fails = _cast_text(
        pc.if_else(pa.array(~zoned & valid), trimmed, pa.scalar(None, pa.string())),
        naive_type,
        _ISO,
        "1970-01-01",
    )
    micros = pc.if_else(
        pa.array(zoned),
        pc.cast(zoned_values, pa.int64()),
        localise(naive_values),
    )
    return micros, (zoned_fails | naive_fails) & valid


def check_columns(
    present: Sequence[str], wanted: Sequence[str], where: str, *, listing: str
) -> None:
    """The mapped source columns must all be in the file."""
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)} ({listing} has {', '.join(present)})",
            path=where,
            column=missing[0],
        )
