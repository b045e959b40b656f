"""Reading raw files: `RawFile` (on disk or in a zip), `read_delimited` into `Parsed`, a
table of text columns that converts and checks them and names the physical line of a bad
row in its errors.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from funnelrec.errors import DataError


@dataclass(frozen=True)
class RawFile:
    """One input file: on disk, or a member of a zip archive (a MovieLens zip, a wheel)."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        """How error messages name the file: a path, or `archive.zip!member`."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read(self, size: int = -1) -> bytes:
        """The file's bytes (the first `size` of them when `size` >= 0)."""
        try:
            if self.member is None:
                with self.path.open("rb") as f:
                    return f.read(size)
            with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
                return f.read(size)
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
        except zipfile.BadZipFile:
            reason = "not a zip archive"
        except KeyError:
            reason = "no such member in the archive"
        raise DataError(f"cannot read ({reason})", path=self.name)


def _physical_line(data: bytes, nonblank: int) -> int:
    """The 1-based line number of the `nonblank`-th non-empty line (pyarrow skips blanks)."""
    seen = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(b"\r"):
            seen += 1
            if seen == nonblank:
                return number
    return nonblank


@dataclass
class Parsed:
    """A raw file read into a table of text columns, with what is needed to name lines."""

    raw: RawFile
    data: bytes
    table: pa.Table
    header_lines: int

    def line(self, index: int) -> int:
        """Physical line of data row `index` (0-based)."""
        return _physical_line(self.data, self.header_lines + index + 1)

    def error(self, message: str, column: str | None, index: int | None) -> DataError:
        row = None if index is None else self.line(index)
        where = f"{self.raw.name}, line {row}" if row is not None else self.raw.name
        return DataError(message, path=where, column=column)

    def renamed(self, names: dict[str, str]) -> Parsed:
        """The same file with columns renamed (`names`: old -> new; others kept)."""
        new = [names.get(n, n) for n in self.table.column_names]
        return Parsed(self.raw, self.data, self.table.rename_columns(new), self.header_lines)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def text(self, column: str, *, required: bool = True) -> pa.Array:
        """A text column; empty values are an error when `required`, else null."""
        col = self.table.column(column).combine_chunks()
        empty = pc.equal(pc.utf8_trim_whitespace(col), "")
        if required:
            bad = _first(empty)
            if bad is not None:
                raise self.error("missing value", column, bad)
            return col
        return pc.if_else(empty, pa.scalar(None, pa.string()), col)

    def numbers(
        self,
        column: str,
        kind: pa.DataType,
        *,
        required: bool = True,
        minimum: float | None = None,
        what: str = "a number",
    ) -> pa.Array:
        """A column converted to `kind` (int64 or float64), checked against `minimum`."""
        col = self.text(column, required=required)
        try:
            out = pc.cast(col, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            failing = _first_failing_cast(col, kind)
            raise self.error(f"{col[failing].as_py()!r} is not {what}", column, failing) from None
        if pa.types.is_floating(kind):
            bad = _first(pc.invert(pc.is_finite(out)))
            if bad is not None:
                raise self.error(f"{col[bad].as_py()!r} is not {what}", column, bad)
        if minimum is not None:
            bad = _first(pc.less(out, minimum))
            if bad is not None:
                raise self.error(f"value {col[bad].as_py()} is below {minimum:g}", column, bad)
        return out

    def timestamps(self, column: str) -> pa.Array:
        """Integer (or integral float, as RecBole writes them) epoch values as int64."""
        try:
            return self.numbers(column, pa.int64(), what="a timestamp")
        except DataError:
            floats = self.numbers(column, pa.float64(), what="a timestamp")
            return pc.cast(pc.floor(floats), pa.int64())


def _first(mask: pa.Array | pa.ChunkedArray) -> int | None:
    hits = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if hits.size else None


def _first_failing_cast(col: pa.Array, kind: pa.DataType) -> int:
    """Index of the first value that does not convert: whole blocks first, then one by one."""
    block = 1 << 16
    for start in range(0, len(col), block):
        part = col.slice(start, block)
        try:
            pc.cast(part, kind)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        for i in range(len(part)):
            try:
                pc.cast(part.slice(i, 1), kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return start + i
    return 0


def _text_bytes(raw: RawFile) -> bytes:
    """The file's bytes as UTF-8: MovieLens 100k/1m metadata is Latin-1, so transcode it."""
    data = raw.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("latin-1").encode("utf-8")
    return data


def read_delimited(
    raw: RawFile,
    *,
    delimiter: str,
    names: Sequence[str] | None = None,
    required: Sequence[str] = (),
    optional: Sequence[str] = (),
    header_name: Callable[[str], str] = lambda s: s,
    separator: bytes | None = None,
    quoted: bool = False,
) -> Parsed:
    """Read a delimited text file; every column comes back as text.

    Without `names` the first line is a header: its names (after `header_name`) must
    include every `required` one and nothing outside `required` + `optional`. With `names`
    the file has no header and every line must have exactly that many fields. `separator`
    is a multi-byte separator (MovieLens 1M's `::`) replaced by `delimiter` before parsing.
    """
    data = _text_bytes(raw)
    if separator is not None:
        data = data.replace(separator, delimiter.encode())
    if not data.strip():
        raise DataError("file is empty", path=raw.name)
    header_lines = 0
    if names is None:
        first = data.split(b"\n", 1)[0].decode().lstrip("\ufeff").strip("\r")
        names = [header_name(h.strip().strip('"')) for h in first.split(delimiter)]
        missing = [n for n in required if n not in names]
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(missing)} (header has {', '.join(names)})",
                path=f"{raw.name}, line 1",
                column=missing[0],
            )
        allowed = set(required) | set(optional)
        extra = [n for n in names if n not in allowed]
        if extra:
            raise DataError(
                f"unexpected column (expected {', '.join([*required, *optional])})",
                path=f"{raw.name}, line 1",
                column=extra[0],
            )
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError("column appears twice", path=f"{raw.name}, line 1", column=dup)
        header_lines = 1
    names = list(names)

    bad_rows: list[tuple[int, int | None]] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append((row.actual_columns, row.number))
        return "error"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=header_lines, use_threads=False
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoted else False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        if bad_rows:
            actual, number = bad_rows[0]
            line = _physical_line(data, number) if number is not None else None
            where = f"{raw.name}, line {line}" if line is not None else raw.name
            column = names[actual] if actual < len(names) else None
            raise DataError(
                f"{actual} field(s), expected {len(names)} ({', '.join(names)})",
                path=where,
                column=column,
            ) from None
        raise DataError(f"cannot parse ({e})", path=raw.name) from None
    if table.num_rows == 0:
        raise DataError("file has no data rows", path=raw.name)
    return Parsed(raw, data, table, header_lines)
