"""The files of an events import, read in batches of the mapped columns.

- `find_files`: a mapping's paths (files, directories, globs) -> `SourceFile`s, in name
  order, each with its format (the mapping's, else the extension's);
- `read_batches`: one file -> `Batch`es: CSV and TSV through `pyarrow.csv`'s streaming
  reader (text, or numbers for the columns asked, with text as the fallback), JSON Lines
  a block of lines at a time through `pyarrow.json` (line by line through `json` only for
  a block Arrow refuses: mixed types, a malformed line), Parquet by record batch;
- `LineCounter`: the physical line of a text file's n-th record, found by scanning the
  file only when a row has to be named;
- `prefetch`: an iterator produced a step ahead in a thread (reading overlaps the work).

Memory is bounded by the batch size (`BLOCK` bytes of text), never by the file.
"""

from __future__ import annotations

import csv
import glob
import json
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from funnelrec.data.loaders.mapping import DELIMITERS, EXTENSIONS, SourceMapping
from funnelrec.data.loaders.values import check_columns
from funnelrec.errors import DataError

# Bytes of text per batch. Large batches keep per-batch costs (hashing the ids seen so
# far) small beside the rows; the memory an import holds grows with it.
BLOCK = 32 << 20
# Rows per batch of a Parquet file.
PARQUET_BATCH = 1 << 20
_SCAN = 16 << 20  # bytes per read when counting lines
_MAX_TEXT = 200  # characters of an unreadable record quoted in its reason

T = TypeVar("T")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: str  # csv, tsv, parquet or jsonl

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def is_text(self) -> bool:
        return self.format != "parquet"

    @property
    def header_lines(self) -> int:
        return 1 if self.format in DELIMITERS else 0


@dataclass
class Batch:
    """Consecutive records of one file: the mapped columns, and the records that could not
    be read as rows (a wrong number of fields, a line that is not a JSON object)."""

    file: SourceFile
    columns: dict[str, pa.Array]
    num_rows: int
    # 0-based index of each row among the file's data records; None: `start` onwards.
    start: int = 0
    index: np.ndarray | None = None
    # (record index, reason) of the records that could not be read.
    unreadable: list[tuple[int, str]] = field(default_factory=list)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The file's record index of the batch rows at `positions`."""
        if self.index is None:
            return positions.astype(np.int64) + self.start
        return self.index[positions]


def find_files(source: SourceMapping, base: Path) -> list[SourceFile]:
    """Every file a source names, in the order of its paths, each path's files by name."""
    files: list[SourceFile] = []
    for pattern in source.paths:
        path = Path(pattern).expanduser()
        path = path if path.is_absolute() else base / path
        if glob.has_magic(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataError(f"[{source.table}]: no file matches '{pattern}'", path=path.parent)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
                and (source.format is not None or p.suffix.lower() in EXTENSIONS)
            )
            if not found:
                raise DataError(f"[{source.table}]: no data files in the directory", path=path)
        elif path.is_file():
            found = [path]
        else:
            raise DataError("cannot read (no such file or directory)", path=path)
        for p in found:
            fmt = source.format or EXTENSIONS.get(p.suffix.lower())
            if fmt is None:
                raise DataError(
                    f"cannot tell the format from the extension (set format = ... in "
                    f"[{source.table}]: {', '.join(sorted(set(EXTENSIONS.values())))})",
                    path=p,
                )
            files.append(SourceFile(p, fmt))
    return list(dict.fromkeys(files))


def read_batches(
    file: SourceFile,
    columns: Sequence[str],
    delimiter: str | None = None,
    types: MappingABC[str, pa.DataType] | None = None,
) -> Iterator[Batch]:
    """The mapped `columns` of `file`, a batch at a time.

    `types`: columns of a CSV or TSV file to parse straight into a type (int64 times,
    float64 watch times) instead of text; a value that does not parse makes the rest of the
    file be read as text, where the converters name it.
    """
    if file.format == "parquet":
        yield from _read_parquet(file, columns)
    elif file.format == "jsonl":
        yield from _read_jsonl(file, columns)
    else:
        yield from _read_delimited(
            file, columns, delimiter or DELIMITERS[file.format], dict(types or {})
        )


def _cannot_read(file: SourceFile, e: BaseException) -> DataError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataError(f"cannot read ({reason})", path=file.name)


class _Unconvertible(Exception):
    """A typed column of a CSV file met a value its type does not parse."""


@dataclass
class _Unreadable:
    """The records of a delimited file that could not be read (wrong number of fields),
    gathered by the reader's callback; kept across a typed and a text pass."""

    seen: set[int] = field(default_factory=set)
    pending: list[tuple[int, str]] = field(default_factory=list)
    shifted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def on_invalid(self, row: Any) -> str:
        # Records are numbered from 1 with the header; data records from 0.
        number = -1 if row.number is None else row.number - 2
        if number >= 0 and number in self.seen:
            return "skip"
        self.seen.add(number)
        text = row.text if len(row.text) <= _MAX_TEXT else row.text[:_MAX_TEXT] + "..."
        self.pending.append(
            (number, f"{row.actual_columns} field(s), expected {row.expected_columns}: {text!r}")
        )
        return "skip"

    def take(self) -> list[tuple[int, str]]:
        """The records reported since the last call; updates the row index shift."""
        new, self.pending = self.pending, []
        if new:
            skipped = np.array(sorted(i for i in self.seen if i >= 0), dtype=np.int64)
            # Rows after skipped records: their record index counts the skipped ones.
            self.shifted = skipped - np.arange(skipped.size)
        return new

    def index(self, first: int, n: int) -> np.ndarray | None:
        """Record indices of the reader's rows first..first + n (None: no records skipped)."""
        if not self.shifted.size:
            return None
        rows = np.arange(first, first + n, dtype=np.int64)
        return rows + np.searchsorted(self.shifted, rows, side="right")


def _read_delimited(
    file: SourceFile, columns: Sequence[str], delimiter: str, types: dict[str, pa.DataType]
) -> Iterator[Batch]:
    try:
        with file.path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _cannot_read(file, e) from None
    if not header:
        raise DataError("file is empty (no header line)", path=file.name)
    check_columns(header, columns, f"{file.name}, line 1", listing="header")
    repeated = [c for c in columns if header.count(c) > 1]
    if repeated:
        raise DataError("column appears twice", path=f"{file.name}, line 1", column=repeated[0])

    unreadable = _Unreadable()
    done = 0  # rows handed on
    if types:
        try:
            for batch in _delimited(file, columns, delimiter, types, unreadable, skip=0):
                done += batch.num_rows
                yield batch
            return
        except _Unconvertible:
            pass
    yield from _delimited(file, columns, delimiter, {}, unreadable, skip=done)


def _delimited(
    file: SourceFile,
    columns: Sequence[str],
    delimiter: str,
    types: dict[str, pa.DataType],
    unreadable: _Unreadable,
    skip: int,
) -> Iterator[Batch]:
    """One pass over a delimited file, from its `skip`-th row on."""
    try:
        reader = pacsv.open_csv(
            file.path,
            # One thread: the reader then numbers the records it cannot read.
            read_options=pacsv.ReadOptions(block_size=BLOCK, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                newlines_in_values=True,
                invalid_row_handler=unreadable.on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns),
                column_types={c: types.get(c, pa.string()) for c in columns},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                # Typed columns: only an empty value is missing ("NaN" is a value, refused
                # later as not finite, as it is when read as text).
                null_values=[""],
            ),
        )
    except (pa.ArrowInvalid, OSError) as e:
        if types:
            raise _Unconvertible from None
        raise _cannot_read(file, e) from None
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as e:
            if types:
                raise _Unconvertible from None
            raise _cannot_read(file, e) from None
        n = batch.num_rows
        first, rows = rows, rows + n
        if rows <= skip:
            continue  # read by the typed pass; its records were reported then
        if first < skip:
            batch, first, n = batch.slice(skip - first), skip, rows - skip
        new = unreadable.take()
        yield Batch(
            file,
            {c: batch.column(c) for c in columns},
            n,
            start=first,
            index=unreadable.index(first, n),
            unreadable=new,
        )
    if unreadable.pending:
        # Records no batch carried (a file of nothing else gives no batch at all).
        empty = {c: pa.array([], pa.string()) for c in columns}
        yield Batch(file, empty, 0, start=rows, unreadable=unreadable.take())


def _read_parquet(file: SourceFile, columns: Sequence[str]) -> Iterator[Batch]:
    try:
        pf = pq.ParquetFile(file.path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", path=file.name) from None
    check_columns(names, columns, file.name, listing="the file")
    rows = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=list(columns)):
            yield Batch(file, {c: batch.column(c) for c in columns}, batch.num_rows, start=rows)
            rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", path=file.name) from None
    finally:
        pf.close()


def _read_jsonl(file: SourceFile, columns: Sequence[str]) -> Iterator[Batch]:
    rows = 0
    try:
        f = file.path.open("rb")
    except OSError as e:
        raise _cannot_read(file, e) from None
    with f:
        carry = b""
        while True:
            block = f.read(BLOCK)
            data = carry + block
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                data, carry = data[: cut + 1], data[cut + 1 :]
            if data.strip():
                batch = _json_block(file, data, columns, rows)
                rows += batch.num_rows + len(batch.unreadable)
                yield batch
            if not block:
                return


def _json_block(file: SourceFile, data: bytes, columns: Sequence[str], start: int) -> Batch:
    """A block of whole lines: through Arrow when it reads them as flat records, else one
    line at a time, so that a malformed line is named and the others kept."""
    records = sum(1 for line in data.split(b"\n") if line.strip())
    try:
        table = pajson.read_json(
            pa.BufferReader(data),
            read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 1),
        )
        if table.num_rows == records:
            out = {}
            for c in columns:
                if c not in table.column_names:
                    out[c] = pa.nulls(records, pa.string())
                    continue
                col = table.column(c).combine_chunks()
                if pa.types.is_nested(col.type):
                    raise ValueError(f"column {c} holds nested values")
                out[c] = col
            return Batch(file, out, records, start=start)
    except (pa.ArrowInvalid, ValueError):
        pass
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    index: list[int] = []
    unreadable: list[tuple[int, str]] = []
    record = start
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        record += 1
        try:
            obj = json.loads(line)
        except ValueError as e:
            unreadable.append((record - 1, f"not valid JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            unreadable.append((record - 1, f"not a JSON object ({type(obj).__name__})"))
            continue
        nested = [c for c in columns if isinstance(obj.get(c), dict | list)]
        if nested:
            unreadable.append((record - 1, f"'{nested[0]}' holds a JSON object or array"))
            continue
        for c in columns:
            v = obj.get(c)
            values[c].append(None if v is None else v if isinstance(v, str) else json.dumps(v))
        index.append(record - 1)
    return Batch(
        file,
        {c: pa.array(v, pa.string()) for c, v in values.items()},
        len(index),
        start=start,
        index=np.asarray(index, dtype=np.int64),
        unreadable=unreadable,
    )


class LineCounter:
    """Physical line numbers of a text file's records (0-based, header excluded).

    Blank lines are not records (both readers skip them) but count as lines; a CSV value
    with a newline inside quotes is not told apart (the line is then that of the record's
    number). The file is scanned forwards in blocks, resuming where the last call stopped,
    so naming the rejected rows of a file costs one pass over it.
    """

    def __init__(self, file: SourceFile) -> None:
        self.file = file
        self._blank = np.array([13] if file.format in DELIMITERS else [9, 13, 32], np.uint8)
        self._reset()

    def _reset(self) -> None:
        self._offset = 0  # bytes scanned
        self._lines = 0  # lines ended so far
        self._records = 0  # non-blank lines among them
        self._carry = 0  # non-blank bytes of the line being scanned

    def lines(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return rows
        targets = rows + self.file.header_lines + 1  # 1-based record ordinals
        if targets.min() <= self._records:
            self._reset()
        order = np.argsort(targets, kind="stable")
        wanted = targets[order]
        found = np.full(wanted.size, -1, dtype=np.int64)
        done = 0
        with self.file.path.open("rb") as f:
            f.seek(self._offset)
            while done < wanted.size:
                block = f.read(_SCAN)
                if not block:
                    # A last line without a newline.
                    if self._carry:
                        self._records += 1
                        self._lines += 1
                        self._carry = 0
                        hit = wanted[done:] == self._records
                        found[done:][hit] = self._lines
                    break
                arr = np.frombuffer(block, dtype=np.uint8)
                self._offset += arr.size
                newlines = np.flatnonzero(arr == 10)
                content = np.r_[0, np.cumsum(~np.isin(arr, self._blank) & (arr != 10))]
                starts = np.r_[0, newlines[:-1] + 1] if newlines.size else np.zeros(0, np.int64)
                per_line = content[newlines] - content[starts]
                if per_line.size:
                    per_line[0] += self._carry
                    ordinals = self._records + np.cumsum(per_line > 0)
                    last = self._records + int((per_line > 0).sum())
                    stop = int(np.searchsorted(wanted, last, side="right"))
                    if stop > done:
                        at = np.searchsorted(ordinals, wanted[done:stop], side="left")
                        found[done:stop] = self._lines + 1 + at
                        done = stop
                    self._records = last
                    self._lines += newlines.size
                    self._carry = int(content[-1] - content[newlines[-1] + 1])
                else:
                    self._carry += int(content[-1])
        out = np.empty_like(found)
        out[order] = found
        return out


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """`items`, produced up to `depth` ahead in a thread.

    Arrow's readers and writers release the GIL, so reading the next batch (or encoding
    the last one) overlaps with the work on this one. An exception in the producer is
    raised here, after the items produced before it.
    """
    slots: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put((False, item)):
                    return
            put((True, None))
        except BaseException as e:
            put((True, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="funnelrec-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            finished, value = slots.get()
            if finished:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()
