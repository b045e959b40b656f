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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
            Column("user_id", **_ID),
            Column("item_id", **_ID),
            Column("ts", pa.int64()),
            Column("watch_time_s", pa.float32(), nullable=True, minimum=0),
            Column("source", pa.string(), nullable=True),
        ),
    ),
    "searches": TableSpec(
        "searches",
        required=(
            Column("user_id", **_ID),
            Column("ts", pa.int64()),
            Column("query", pa.string()),
        ),
    ),
    "impressions": TableSpec(
        "impressions",
        required=(
            Column("request_id", **_ID),
            Column("user_id", **_ID),
            Column("item_id", **_ID),
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


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array, or None."""
    arr = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    hits = np.flatnonzero(arr)
    return int(hits[0]) if hits.size else None


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
        if not col_spec.nullable and col.null_count:
            bad = _first_true(pc.is_null(col))
            raise DataError(
                "missing value", path=where, column=col_spec.name, row=_row(bad, row_offset)
            )
        if col_spec.minimum is not None and pa.types.is_floating(col.type):
            bad = _first_true(pc.is_nan(col))
            if bad is not None:
                raise DataError(
                    "value is NaN", path=where, column=col_spec.name, row=_row(bad, row_offset)
                )
        if col_spec.minimum is not None:
            bad = _first_true(pc.less(col, col_spec.minimum))
            if bad is not None:
                value = col[bad].as_py()
                raise DataError(
                    f"value {value} is below the minimum {col_spec.minimum:g}",
                    path=where,
                    column=col_spec.name,
                    row=_row(bad, row_offset),
                )
        out_cols.append(col)
        kept.append(col_spec.name)

    if name == "watches":
        source = out_cols[4]
        unknown = pc.and_(pc.is_valid(source), pc.invert(pc.is_in(source, pa.array(WATCH_SOURCES))))
        bad = _first_true(unknown)
        if bad is not None:
            raise DataError(
                f"source {source[bad].as_py()!r} is not one of {', '.join(WATCH_SOURCES)}",
                path=where,
                column="source",
                row=_row(bad, row_offset),
            )
    if spec.unique is not None:
        ids = np.asarray(out_cols[0].to_numpy())
        _, first_index = np.unique(ids, return_index=True)
        repeated = np.ones(ids.size, dtype=bool)
        repeated[first_index] = False
        if repeated.any():
            row = int(np.flatnonzero(repeated)[0])
            first = int(np.flatnonzero(ids == ids[row])[0])
            raise DataError(
                f"duplicate {spec.unique} {ids[row]} (first seen in row {row_offset + first + 1})",
                path=where,
                column=spec.unique,
                row=_row(row, row_offset),
            )
    return pa.table(out_cols, schema=spec.arrow_schema(kept))


def _row(index: int | None, offset: int) -> int | None:
    return None if index is None else offset + index + 1
