"""What a dataset on disk is checked against when it is opened and read.

A dataset directory may have been damaged after its import: a file truncated by a full
disk, overwritten by another tool, deleted; a table rewritten by hand. Each stage reads it
through `Dataset`, which refuses such data with the rules the import enforces
(`schema.py`) and one-line messages naming the file, the column and the first offending
row, never a traceback from deep inside a build. The checks come in two steps, so that
opening stays cheap and the values are checked in the reads the stages make anyway:

- `check_files`, when the dataset is opened: every table the manifest lists (and every
  required one) is there, is a readable Parquet file, has the row count the manifest
  gives, and has the columns and types of its spec; every id map is a readable Parquet
  file with its two columns. Only the files' footers are read.
- `TableCheck`, the first time the dataset reads a table: every value, with the rules of
  the import (`schema.column_offences`, `schema.first_duplicate`), and the ids of the
  event tables against the users and items tables (`Column.refers_to`). It is fed the
  table in the chunks the reader reads anyway and reports the first offence, with how
  many rows of the whole table break the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec.data.schema import (
    REQUIRED_TABLES,
    SPECS,
    TABLE_NAMES,
    Column,
    Offence,
    Values,
    column_offences,
    first_duplicate,
    true_rows,
)
from funnelrec.errors import DataError

ID_MAP_SCHEMA = pa.schema([("raw_id", pa.string()), ("id", pa.int64())])
# Distinct unknown ids a message lists; the count of rows says how many there are in all.
_EXAMPLES = 5


def unreadable(file: Path, error: BaseException) -> DataError:
    """The error for a file that Arrow cannot read as Parquet: its reason, on one line."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"not a readable Parquet file ({reason})", path=file)


def read_footer(file: Path, what: str) -> tuple[pa.Schema, int]:
    """The Arrow schema and the row count in the footer of a Parquet file."""
    if not file.is_file():
        raise DataError(f"no such file (the dataset's {what})", path=file)
    try:
        meta = pq.read_metadata(file)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise unreadable(file, e) from None
    return schema.remove_metadata(), int(meta.num_rows)


def _check_types(schema: pa.Schema, expected: dict[str, pa.DataType], file: Path) -> None:
    for f in schema:
        want = expected[f.name]
        if f.type != want:
            raise DataError(f"stored as {f.type}, expected {want}", path=file, column=f.name)


def check_files(
    path: Path,
    tables: Mapping[str, str],
    row_counts: Mapping[str, int],
    id_maps: Mapping[str, str],
    *,
    where: Path,
) -> dict[str, pa.Schema]:
    """Check the files of the dataset at `path` from their footers: `tables`, `row_counts`
    and `id_maps` are the manifest's (`where`). Returns each table's schema."""
    unknown = sorted(set(tables) - set(TABLE_NAMES))
    if unknown:
        raise DataError(
            f"unknown table(s) {', '.join(unknown)} (expected {', '.join(TABLE_NAMES)})",
            path=where,
        )
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise DataError(
            f"no {', '.join(missing)} table (required: {', '.join(REQUIRED_TABLES)})", path=where
        )
    schemas = {}
    for name, file_name in tables.items():
        file = path / file_name
        schema, rows = read_footer(file, f"'{name}' table")
        spec = SPECS[name]
        absent = [c.name for c in spec.required if c.name not in schema.names]
        if absent:
            raise DataError(f"missing column(s) {', '.join(absent)}", path=file, column=absent[0])
        extra = [n for n in schema.names if n not in spec.columns]
        if extra:
            raise DataError(
                f"unexpected column(s) {', '.join(extra)} in table '{name}'",
                path=file,
                column=extra[0],
            )
        _check_types(schema, {n: c.type for n, c in spec.columns.items()}, file)
        listed = row_counts.get(name)
        if listed is not None and rows != listed:
            raise DataError(f"{rows} rows, the manifest says {listed}", path=file)
        if rows == 0 and name in REQUIRED_TABLES:
            raise DataError(f"table '{name}' is empty", path=file)
        schemas[name] = schema
    for space, file_name in id_maps.items():
        file = path / file_name
        schema, _ = read_footer(file, f"id map of '{space}'")
        absent = [n for n in ID_MAP_SCHEMA.names if n not in schema.names]
        if absent:
            raise DataError(f"missing column(s) {', '.join(absent)}", path=file, column=absent[0])
        _check_types(schema, {f.name: f.type for f in ID_MAP_SCHEMA}, file)
    return schemas


def read_table(file: Path, columns: list[str] | None) -> pa.Table:
    """A Parquet file read whole (or some of its columns); Arrow's failures as `DataError`."""
    try:
        return pq.read_table(file, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise unreadable(file, e) from None


def iter_batches(
    file: Path, columns: list[str] | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """A Parquet file in record batches; Arrow's failures as `DataError`."""
    try:
        with pq.ParquetFile(file) as f:
            yield from f.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise unreadable(file, e) from None


class IdSet:
    """The ids a users or items table lists, to look the event tables' ids up in."""

    def __init__(self, ids: Values) -> None:
        n = len(ids)
        lo_hi = pc.min_max(ids)
        # Canonical tables list each id 1..N once (the import numbers them so, and the
        # table's check has refused repeats): a range test then needs no hash table.
        dense = n > 0 and lo_hi["min"].as_py() == 1 and lo_hi["max"].as_py() == n
        self._max = n if dense else None
        if dense:
            self._values = None
        else:
            self._values = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids

    def unknown(self, ids: Values) -> Values:
        """A boolean mask: true where an id is not in the table (null ids: null)."""
        if self._values is None:
            return pc.or_(pc.less(ids, 1), pc.greater(ids, self._max))
        return pc.invert(pc.is_in(ids, value_set=self._values))


@dataclass
class _Found:
    """The first offence found in a table, and the rows of the table that break its rule."""

    column: str
    rule: str
    row: int  # 0-based, in the whole table
    message: str
    count: int = 0
    examples: list[object] = field(default_factory=list)
    more: bool = False  # more distinct offending ids than `examples` holds


class TableCheck:
    """The values of one table on disk, checked chunk by chunk as they are read.

    `feed` each chunk (any subset of the table's columns, with the row offset of its first
    row); `done` when every column has been fed, which raises `DataError` for the first
    offence found (by chunk, then column, then rule) and counts the rows of the whole table
    that break the same rule. After the first offence only its column is checked further,
    so that draining the rest of a table just to count costs little.
    """

    def __init__(self, name: str, file: Path, id_set: Callable[[str], IdSet]) -> None:
        self.spec = SPECS[name]
        self.file = file
        self._id_set = id_set
        self._found: _Found | None = None
        self._unique: list[np.ndarray] = []

    @property
    def failed(self) -> bool:
        return self._found is not None

    def feed(self, chunk: pa.Table | pa.RecordBatch, offset: int) -> None:
        for name in chunk.column_names:
            if self._found is not None and name != self._found.column:
                continue
            spec = self.spec.columns[name]
            col = chunk.column(name)
            offences = column_offences(spec, col)
            unknown = None
            if spec.refers_to is not None:
                unknown = self._id_set(spec.refers_to).unknown(col)
                offences += self._reference_offence(spec, col, unknown)
            if name == self.spec.unique and self._found is None:
                self._unique.append(np.asarray(col.to_numpy(), dtype=np.int64))
            for o in offences:
                if self._found is None:
                    self._found = _Found(name, o.rule, offset + o.index, o.message)
                found = self._found
                if found.column == name and found.rule == o.rule:
                    found.count += o.count
                    if o.rule == "reference" and unknown is not None:
                        self._add_examples(found, col, unknown)

    @staticmethod
    def _reference_offence(spec: Column, col: Values, unknown: Values) -> list[Offence]:
        hit = true_rows(unknown)
        if hit is None:
            return []
        count, index = hit
        space = spec.name.removesuffix("_id")
        message = f"{space} id {col[index].as_py()} is not in the {spec.refers_to} table"
        return [Offence("reference", count, index, message)]

    @staticmethod
    def _add_examples(found: _Found, col: Values, unknown: Values) -> None:
        ids = pc.unique(pc.filter(col, pc.fill_null(unknown, False))).to_pylist()
        for v in ids:
            if v in found.examples:
                continue
            if len(found.examples) < _EXAMPLES:
                found.examples.append(v)
            else:
                found.more = True

    def done(self) -> None:
        found = self._found
        if found is None and self._unique:
            ids = np.concatenate(self._unique)
            dup = first_duplicate(ids)
            if dup is not None:
                row, first, count = dup
                found = _Found(
                    self.spec.unique or "",
                    "unique",
                    row,
                    f"duplicate {self.spec.unique} {ids[row]} (first seen in row {first + 1})",
                    count,
                )
        if found is None:
            return
        rows = f"{found.count} row{'s' if found.count != 1 else ''} in all"
        if found.examples:
            listed = ", ".join(str(v) for v in found.examples)
            rows += f", with ids {listed}{', ...' if found.more else ''}"
        raise DataError(
            f"{found.message}; {rows}", path=self.file, column=found.column, row=found.row + 1
        )
