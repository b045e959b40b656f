"""The canonical event tables: their columns, types and the rules every row must keep.

Every data source (loaders, the simulator) ends in these five tables; every later stage
reads only them. Ids are dense int64 starting at 1 (0 is padding / out of vocabulary).

    users:       user_id; optional age, gender, region, device, logged_in
    items:       item_id; optional upload_ts, duration_s, channel_id, topic, language, title
    watches:     user_id, item_id, ts, watch_time_s (nullable), source (nullable)
    searches:    user_id, ts, query
    impressions: request_id, user_id, item_id, ts, position, clicked, watch_time_s; optional
                 cand_source (which candidate generator nominated the item) and cand_score
                 (its score there), ranking features where logged

`validate_table` checks a table against its spec and returns it with canonical column
order and types, or raises `DataError` naming the file, column and first offending row.
The rules of single values (`column_offences`) and of repeated ids (`first_duplicate`) are
also what `Dataset` checks a table on disk against when it first reads it (`checks.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.errors import DataError

WATCH_SOURCES = ("home", "search", "related", "external")
TABLE_NAMES = ("users", "items", "watches", "searches", "impressions")
# Tables a dataset must have; searches and impressions are optional (the manifest says).
REQUIRED_TABLES = ("users", "items", "watches")


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    # For int/float columns: the smallest allowed value (checked on non-null values).
    minimum: float | None = None
    # For string columns: the only values allowed (checked on non-null values).
    allowed: tuple[str, ...] | None = None
    # For id columns of the event tables: the table that lists every id of the space. One
    # table cannot check this alone; a dataset checks it across its tables (`checks.py`).
    refers_to: str | None = None

    @property
    def finite(self) -> bool:
        """Floating-point values must be finite: NaN or infinity is never a measurement."""
        return pa.types.is_floating(self.type)


@dataclass(frozen=True)
class TableSpec:
    name: str
    required: tuple[Column, ...]
    optional: tuple[Column, ...] = ()
    unique: str | None = None  # a column whose values must not repeat
    columns: dict[str, Column] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", {c.name: c for c in self.required + self.optional})

    def arrow_schema(self, present: Sequence[str] | None = None) -> pa.Schema:
        """The Arrow schema for the required columns plus the optional ones `present`."""
        names = [c.name for c in self.required]
        names += [c.name for c in self.optional if present is None or c.name in present]
        return pa.schema(
            [pa.field(n, self.columns[n].type, self.columns[n].nullable) for n in names]
        )


_ID = dict(type=pa.int64(), minimum=1)
_USER = dict(_ID, refers_to="users")
_ITEM = dict(_ID, refers_to="items")

SPECS: dict[str, TableSpec] = {
    "users": TableSpec(
        "users",
        required=(Column("user_id", **_ID),),
        optional=(
            Column("age", pa.float32(), nullable=True, minimum=0),
            Column("gender", pa.string(), nullable=True),
            Column("region", pa.string(), nullable=True),
            Column("device", pa.string(), nullable=True),
            Column("logged_in", pa.bool_(), nullable=True),
        ),
        unique="user_id",
    ),
    "items": TableSpec(
        "items",
        required=(Column("item_id", **_ID),),
        optional=(
            Column("upload_ts", pa.int64(), nullable=True),
            Column("duration_s", pa.float32(), nullable=True, minimum=0),
            Column("channel_id", pa.int64(), nullable=True, minimum=1),
            Column("topic", pa.string(), nullable=True),
            Column("language", pa.string(), nullable=True),
            Column("title", pa.string(), nullable=True),
        ),
        unique="item_id",
    ),
    "watches": TableSpec(
        "watches",
        required=(
            Column("user_id", **_USER),
            Column("item_id", **_ITEM),
            Column("ts", pa.int64()),
            Column("watch_time_s", pa.float32(), nullable=True, minimum=0),
            Column("source", pa.string(), nullable=True, allowed=WATCH_SOURCES),
        ),
    ),
    "searches": TableSpec(
        "searches",
        required=(
            Column("user_id", **_USER),
            Column("ts", pa.int64()),
            Column("query", pa.string()),
        ),
    ),
    "impressions": TableSpec(
        "impressions",
        required=(
            Column("request_id", **_ID),
            Column("user_id", **_USER),
            Column("item_id", **_ITEM),
            Column("ts", pa.int64()),
            Column("position", pa.int32(), minimum=0),
            Column("clicked", pa.bool_()),
            Column("watch_time_s", pa.float32(), minimum=0),
        ),
        optional=(
            Column("cand_source", pa.string(), nullable=True),
            Column("cand_score", pa.float64(), nullable=True),
        ),
    ),
}


@dataclass(frozen=True)
class Offence:
    """The rows of a column that break one rule: how many, the first, what is wrong with it."""

    rule: str  # "missing", "finite", "minimum" or "allowed"
    count: int
    index: int  # the first offending row, 0-based
    message: str  # about the value in that row


Values: TypeAlias = pa.Array | pa.ChunkedArray


def true_rows(mask: Values) -> tuple[int, int] | None:
    """How many values of a boolean array are true, and the index of the first; None if none."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    arr = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
    hits = np.flatnonzero(arr)
    return int(hits.size), int(hits[0])


def column_offences(spec: Column, col: Values) -> list[Offence]:
    """Every rule of `spec` on single values that `col` (already of `spec.type`) breaks, in
    the order they are checked: missing value, non-finite number, below the minimum, not
    an allowed value. Empty when the column keeps them all."""
    found = []

    def check(rule: str, mask: Values, message: Callable[[Any], str]) -> None:
        hit = true_rows(mask)
        if hit is not None:
            count, index = hit
            found.append(Offence(rule, count, index, message(col[index].as_py())))

    if not spec.nullable and col.null_count:
        check("missing", pc.is_null(col), lambda _: "missing value")
    if spec.finite:
        check(
            "finite",
            pc.invert(pc.is_finite(col)),
            lambda v: "value is NaN" if math.isnan(v) else f"value {v} is not finite",
        )
    if spec.minimum is not None:
        check(
            "minimum",
            pc.less(col, spec.minimum),
            lambda v: f"value {v} is below the minimum {spec.minimum:g}",
        )
    if spec.allowed is not None:
        allowed = ", ".join(spec.allowed)
        check(
            "allowed",
            pc.and_(
                pc.is_valid(col),
                pc.invert(pc.is_in(col, value_set=pa.array(spec.allowed, spec.type))),
            ),
            lambda v: f"{spec.name} {v!r} is not one of {allowed}",
        )
    return found


def first_duplicate(ids: np.ndarray) -> tuple[int, int, int] | None:
    """The first row whose id an earlier row holds, that earlier row (both 0-based), and how
    many rows repeat an earlier id; None if every id is distinct."""
    _, first_index = np.unique(ids, return_index=True)
    repeated = np.ones(ids.size, dtype=bool)
    repeated[first_index] = False
    if not repeated.any():
        return None
    row = int(np.flatnonzero(repeated)[0])
    first = int(np.flatnonzero(ids == ids[row])[0])
    return row, first, int(repeated.sum())


def _cast_column(
    col: pa.ChunkedArray, spec: Column, where: object, row_offset: int
) -> pa.ChunkedArray:
    if col.type == spec.type:
        return col
    try:
        return pc.cast(col, spec.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Slow path, only on failure: find the first value that does not convert.
    values = col.to_pylist()
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            pa.array([v]).cast(spec.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise DataError(
                f"value {v!r} is not of type {spec.type}",
                path=where,
                column=spec.name,
                row=row_offset + i + 1,
            ) from None
    raise DataError(f"cannot convert {col.type} to {spec.type}", path=where, column=spec.name)


def validate_table(
    name: str, table: pa.Table, where: object = None, *, row_offset: int = 0
) -> pa.Table:
    """Check `table` against the spec of `name`; return it in canonical order and types.

    `where` names the source in error messages (a file path); `row_offset` is added to
    row numbers when a table is validated in chunks. Rows are numbered from 1.
    """
    if name not in SPECS:
        raise DataError(f"unknown table '{name}' (expected one of {', '.join(TABLE_NAMES)})")
    spec = SPECS[name]
    where = where if where is not None else f"table '{name}'"
    present = set(table.column_names)
    missing = [c.name for c in spec.required if c.name not in present]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}", path=where, column=missing[0])
    extra = sorted(present - set(spec.columns))
    if extra:
        raise DataError(
            f"unexpected column(s) {', '.join(extra)} in table '{name}'",
            path=where,
            column=extra[0],
        )
    if table.num_rows == 0 and name in REQUIRED_TABLES:
        raise DataError(f"table '{name}' is empty", path=where)

    out_cols = []
    kept = []
    for col_spec in spec.required + spec.optional:
        if col_spec.name not in present:
            continue
        col = _cast_column(table.column(col_spec.name), col_spec, where, row_offset)
        offences = column_offences(col_spec, col)
        if offences:
            bad = offences[0]
            raise DataError(
                bad.message, path=where, column=col_spec.name, row=row_offset + bad.index + 1
            )
        out_cols.append(col)
        kept.append(col_spec.name)

    if spec.unique is not None:
        ids = np.asarray(out_cols[0].to_numpy())
        dup = first_duplicate(ids)
        if dup is not None:
            row, first, _ = dup
            raise DataError(
                f"duplicate {spec.unique} {ids[row]} (first seen in row {row_offset + first + 1})",
                path=where,
                column=spec.unique,
                row=row_offset + row + 1,
            )
    return pa.table(out_cols, schema=spec.arrow_schema(kept))
