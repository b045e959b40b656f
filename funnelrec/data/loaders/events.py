"""The events loader: your own logs (CSV, TSV, Parquet, JSON Lines) -> canonical tables,
through a mapping (`mapping.py`) of which source column feeds which canonical column.

    funnelrec data import events mapping.toml --out DATASET [--bad-rows fail|skip]
        [--engine dask --cluster tcp://HOST:8786|local:N]

The import streams: every file is read a batch at a time (`sources.py`), each batch's
columns are converted and checked with vectorised kernels (`values.py`), its raw ids are
looked up in (and added to) the id spaces seen so far, and the rows are staged with these
provisional ids in Arrow IPC files inside the dataset's temporary directory. Once every
source is read the ids are numbered, and the staged rows are written to the canonical
tables with their final ids. Memory holds a batch, the raw ids and the users' and items'
metadata, never a whole event table.

On an engine (`funnelrec.engines`: `--engine dask`), each file is read and converted by a
task (`convert_file`); this process takes the files' batches in the same order and does
the rest as above, so the dataset is the same, value for value.

Ids: as in the other loaders, the raw ids of a space new in a period are numbered in
sorted order (numerically when all of them are integers), after the ids of earlier periods,
which keep their numbers (`data append`). The watches, searches and impressions are written
in the order they were read: files in the mapping's order, each by name, rows in file order.

Bad rows: with `bad_rows="fail"` the first row that cannot be used stops the import with
a `DataError` naming its file, line (or row, in Parquet), column and value; with "skip"
such rows are left out and written, with their reasons, to `rejected/period-N/<table>.parquet`
inside the dataset, and counted in the manifest.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec.data.dataset import DatasetWriter
from funnelrec.data.loaders import values as conv
from funnelrec.data.loaders.mapping import Mapping, SourceMapping, load_mapping
from funnelrec.data.loaders.result import ImportResult, _check_target
from funnelrec.data.loaders.sources import (
    Batch,
    LineCounter,
    SourceFile,
    find_files,
    prefetch,
    read_batches,
)
from funnelrec.data.schema import SPECS, WATCH_SOURCES
from funnelrec.engines import Engine, check_visible
from funnelrec.errors import DataError

BAD_ROWS = ("fail", "skip")
EVENT_TABLES = ("watches", "impressions", "searches")
# The id space each metadata table describes.
META_SPACE = {"users": "user", "items": "item"}
# Mapping key -> canonical optional column, of each metadata table.
META_COLUMNS = {
    "users": {
        "age": "age",
        "gender": "gender",
        "region": "region",
        "device": "device",
        "logged_in": "logged_in",
    },
    "items": {
        "upload_time": "upload_ts",
        "duration": "duration_s",
        "channel": "channel_id",
        "topic": "topic",
        "language": "language",
        "title": "title",
    },
}
# Staged event rows: the canonical columns, with provisional ids.
_STAGED = {
    "watches": pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("ts", pa.int64()),
            ("watch_time_s", pa.float32()),
            ("source", pa.string()),
        ]
    ),
    "impressions": pa.schema(
        [
            ("request_id", pa.int64()),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("ts", pa.int64()),
            ("position", pa.int32()),
            ("clicked", pa.bool_()),
            ("watch_time_s", pa.float32()),
        ]
    ),
    "searches": pa.schema([("user_id", pa.int64()), ("ts", pa.int64()), ("query", pa.string())]),
}
# The columns of a rejected rows file before the row's own (renamed `source:<name>` if one
# of them has the same name).
_REJECTED_META = ("file", "line", "row", "column", "reason")


class IdSpace:
    """The raw ids of one space seen so far, each at a provisional index: the known ids (an
    earlier period's, in id order) first, then the new ones in order of first appearance."""

    def __init__(
        self, name: str, known: pa.Array | None = None, value_type: pa.DataType = pa.string()
    ) -> None:
        self.name = name
        self._values = pa.array([], value_type) if known is None else known.cast(value_type)
        self.num_known = len(self._values)

    @property
    def size(self) -> int:
        return len(self._values)

    @property
    def num_new(self) -> int:
        return self.size - self.num_known

    def lookup(self, raw: pa.Array) -> np.ndarray:
        """The provisional index (int64) of each raw id; ids not seen before are added.

        A dictionary array (`convert_file`'s ids) is looked up by its distinct values."""
        if isinstance(raw, pa.DictionaryArray):
            if raw.null_count:
                raise ValueError(f"{self.name} ids with nulls cannot be looked up")
            distinct = self.lookup(raw.dictionary)
            return distinct[raw.indices.to_numpy(zero_copy_only=False)]
        if self.size:
            found = pc.index_in(raw, value_set=self._values)
            index = np.asarray(
                pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64
            )
            new_rows = np.flatnonzero(index < 0)
            if new_rows.size == 0:
                return index
            new = raw.take(pa.array(new_rows))
        else:
            index, new_rows, new = np.empty(0, dtype=np.int64), None, raw
        # Only the rows of ids not seen before are encoded: once a space's ids have been
        # seen, a batch costs one look-up per row.
        encoded = pc.dictionary_encode(new)
        offset = self.size
        self._values = pa.concat_arrays([self._values, encoded.dictionary.cast(self._values.type)])
        positions = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) + offset
        if new_rows is None:
            return positions
        index[new_rows] = positions
        return index

    def numbering(self) -> tuple[np.ndarray, pa.Array]:
        """The final id of every provisional index (known ids keep theirs, new ones follow
        in sorted order), and the new raw ids in final order."""
        final = np.empty(self.size, dtype=np.int64)
        final[: self.num_known] = np.arange(1, self.num_known + 1)
        new = self._values.slice(self.num_known)
        order = sorted_order(new)
        dense = np.empty(order.size, dtype=np.int64)
        dense[order] = np.arange(1, order.size + 1)
        final[self.num_known :] = self.num_known + dense
        return final, new.take(pa.array(order, type=pa.int64()))


def sorted_order(raw: pa.Array) -> np.ndarray:
    """The order `dense_ids` numbers distinct raw ids in: numeric when every one is an
    integer (ties such as "7" and "07" broken by text), else as text."""
    if not len(raw):
        return np.zeros(0, dtype=np.int64)
    try:
        # A failing cast costs as much as a passing one: try a few ids first.
        pc.cast(raw.slice(0, 64), pa.int64())
        as_int = pc.cast(raw, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.asarray(pc.sort_indices(raw).to_numpy(), dtype=np.int64)
    order = np.argsort(as_int, kind="stable")
    if np.unique(as_int).size < as_int.size:
        order = np.lexsort((np.asarray(raw.to_pylist(), dtype=object), as_int))
    return order.astype(np.int64)


@dataclass
class TableCounts:
    files: list[str] = field(default_factory=list)
    kept: int = 0
    rejected: int = 0
    late: int = 0  # kept events older than the dataset's end (`allow_late`)
    known: int = 0  # metadata rows of ids an earlier period described


class Period:
    """One period of logs read from its sources into staged rows.

    Events are staged with provisional ids in Arrow IPC files under `staging`; the users'
    and items' metadata are held in memory (one row per id); rejected rows go to
    `rejected`. `numbering()` then fixes the ids, and `events()` and `metadata()` give the
    canonical rows.
    """

    def __init__(
        self,
        spaces: dict[str, IdSpace],
        staging: Path,
        rejected: Path,
        *,
        bad_rows: str = "fail",
        not_before: int | None = None,
        allow_late: bool = False,
        request_offset: int = 0,
    ) -> None:
        if bad_rows not in BAD_ROWS:
            raise DataError(f"bad_rows must be one of {', '.join(BAD_ROWS)}, got '{bad_rows}'")
        self.spaces = spaces
        self.requests: IdSpace | None = None  # raw request ids, or (user, time) pairs
        self.request_offset = request_offset
        self.staging = staging
        self.rejected_dir = rejected
        self.bad_rows = bad_rows
        self.not_before = not_before
        self.allow_late = allow_late
        self.counts: dict[str, TableCounts] = {}
        self.ts_range = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]
        self._staged: dict[str, pa.ipc.RecordBatchFileWriter] = {}
        self._rejected: dict[str, pq.ParquetWriter] = {}
        self._lines: dict[SourceFile, LineCounter] = {}
        self._positions = np.zeros(0, dtype=np.int64)  # rows so far of each request
        self._meta: dict[str, list[pa.Table]] = {"users": [], "items": []}
        self._meta_columns: dict[str, list[str]] = {"users": [], "items": []}
        # Where the row describing each id was read: (file, record), for duplicates.
        self._meta_files: list[SourceFile] = []
        self._meta_where: dict[str, np.ndarray] = {}
        self._numbering: dict[str, tuple[np.ndarray, pa.Array]] | None = None
        self._pool: ThreadPoolExecutor | None = None

    # --- reading ------------------------------------------------------------------------

    def read(
        self,
        mapping: Mapping,
        on_batch: Callable[[str, int], None] | None = None,
        engine: Engine | None = None,
    ) -> None:
        """Read every source of `mapping` (all files are found before any is read).

        `engine`: where each file is read and converted (`convert_file`, one job per file);
        by default here, a batch at a time. Whatever the engine, the files' converted
        batches are used here in the same order, so ids, rows and bad rows are the same."""
        files = {name: find_files(src, mapping.base) for name, src in mapping.sources.items()}
        self.staging.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="funnelrec-ids") as pool:
            self._pool = pool
            converted = (
                self._here(mapping, files) if engine is None else self._on(engine, mapping, files)
            )
            try:
                for name, source, counts, batches in converted:
                    for batch, cols, problems in batches:
                        self._use(name, source, batch, cols, problems, counts)
                        if on_batch is not None:
                            on_batch(name, batch.num_rows + len(batch.unreadable))
            finally:
                converted.close()  # on an error, the engine's jobs not started are dropped
        self._pool = None
        for writer in self._staged.values():
            writer.close()
        for pwriter in self._rejected.values():
            pwriter.close()

    def _sources(
        self, mapping: Mapping, files: dict[str, list[SourceFile]]
    ) -> Iterator[tuple[str, SourceMapping, TableCounts, SourceFile]]:
        """Each file of each source, in reading order, its table's counts started."""
        for name, source in mapping.sources.items():
            counts = self.counts.setdefault(name, TableCounts())
            if name in META_SPACE:
                self._meta_columns[name] = [
                    META_COLUMNS[name][k] for k in source.columns if k in META_COLUMNS[name]
                ]
            for file in files[name]:
                counts.files.append(str(file.path.resolve()))
                yield name, source, counts, file
                self._lines.pop(file, None)

    def _here(
        self, mapping: Mapping, files: dict[str, list[SourceFile]]
    ) -> Generator[tuple[str, SourceMapping, TableCounts, Iterator[Converted]], None, None]:
        for name, source, counts, file in self._sources(mapping, files):
            batches = read_batches(
                file, source.source_columns(), source.delimiter, _parsed_types(source)
            )
            yield (
                name,
                source,
                counts,
                (
                    (batch, *convert_batch(name, source, batch, self.not_before, self.allow_late))
                    for batch in prefetch(batches)
                ),
            )

    def _on(
        self, engine: Engine, mapping: Mapping, files: dict[str, list[SourceFile]]
    ) -> Generator[tuple[str, SourceMapping, TableCounts, Iterator[Converted]], None, None]:
        cwd = Path.cwd()
        jobs = [
            FileJob(name, source, file, cwd, self.bad_rows, self.not_before, self.allow_late)
            for name, source in mapping.sources.items()
            for file in files[name]
        ]
        folders = sorted({(cwd / f.path).resolve().parent for fs in files.values() for f in fs})
        check_visible(engine, folders)
        results = engine.imap(convert_file, jobs)
        try:
            for (name, source, counts, _), converted in zip(
                self._sources(mapping, files), results, strict=True
            ):
                yield name, source, counts, _drain(converted)
        finally:
            results.close()

    def _use(
        self,
        name: str,
        source: SourceMapping,
        batch: Batch,
        cols: Columns,
        problems: conv.Problems,
        counts: TableCounts,
    ) -> None:
        """What needs every file seen so far: duplicates, bad rows, ids, staging."""
        prov = None
        if name in META_SPACE:
            prov = self._meta_ids(name, source, batch, cols, problems)
        self._settle(name, source, batch, problems)
        keep = ~problems.bad
        if problems.any:
            mask = pa.array(keep)
            cols = {k: v.filter(mask) for k, v in cols.items()}
            if prov is not None:
                prov = prov[keep]
        n = int(keep.sum())
        counts.rejected += batch.num_rows - n + len(batch.unreadable)
        if n == 0:
            return
        if name in META_SPACE:
            assert prov is not None
            self._add_meta(name, prov, cols, batch, keep, counts)
            return
        counts.kept += n
        ts = cols["ts"]
        mm = pc.min_max(ts)
        self.ts_range[0] = min(self.ts_range[0], mm["min"].as_py())
        self.ts_range[1] = max(self.ts_range[1], mm["max"].as_py())
        if self.not_before is not None:
            counts.late += int(conv.as_mask(pc.less(ts, self.not_before)).sum())
        self._stage(name, cols)

    def _settle(
        self, name: str, source: SourceMapping, batch: Batch, problems: conv.Problems
    ) -> None:
        """Fail on the batch's first bad record, or write its bad records aside."""
        if not problems.any and not batch.unreadable:
            return
        positions, columns, reasons = (
            problems.rows()
            if problems.any
            else (np.zeros(0, np.int64), pa.array([], pa.string()), pa.array([], pa.string()))
        )
        records = batch.rows(positions)
        if self.bad_rows == "fail":
            candidates = [
                (int(r), columns[i].as_py(), reasons[i].as_py()) for i, r in enumerate(records[:1])
            ]
            candidates += [(r, None, why) for r, why in batch.unreadable[:1]]
            record, column, reason = min(candidates, key=lambda c: c[0])
            raise DataError(reason, column=column, **self._where(batch.file, record))
        self._write_rejected(name, source, batch, positions, records, columns, reasons)

    def _where(self, file: SourceFile, record: int) -> dict[str, Any]:
        if record < 0:
            return {"path": file.name}
        if file.is_text:
            line = int(self._counter(file).lines(np.array([record]))[0])
            return {"path": f"{file.name}, line {line}" if line > 0 else file.name}
        return {"path": file.name, "row": record + 1}

    def _counter(self, file: SourceFile) -> LineCounter:
        if file not in self._lines:
            self._lines[file] = LineCounter(file)
        return self._lines[file]

    def _write_rejected(
        self,
        name: str,
        source: SourceMapping,
        batch: Batch,
        positions: np.ndarray,
        records: np.ndarray,
        columns: pa.Array,
        reasons: pa.Array,
    ) -> None:
        names = source.source_columns()
        values = {
            c: conv.labels(
                batch.columns[c].take(pa.array(positions)),
                c,
                conv.Problems(positions.size),
                required=False,
            )
            for c in names
        }
        unread = [r for r, _ in batch.unreadable]
        all_records = np.concatenate([records, np.asarray(unread, dtype=np.int64)])
        n_unread = len(unread)
        table = {
            "file": pa.array([batch.file.name] * all_records.size, pa.string()),
            "line": _lines_or_null(self._counter(batch.file), all_records)
            if batch.file.is_text
            else pa.nulls(all_records.size, pa.int64()),
            "row": pa.array(np.where(all_records >= 0, all_records + 1, 0), mask=all_records < 0),
            "column": pa.concat_arrays([columns, pa.nulls(n_unread, pa.string())]),
            "reason": pa.concat_arrays(
                [reasons, pa.array([why for _, why in batch.unreadable], pa.string())]
            ),
        }
        for c in names:
            key = c if c not in _REJECTED_META else f"source:{c}"
            table[key] = pa.concat_arrays([values[c], pa.nulls(n_unread, pa.string())])
        out = pa.table(table)
        order = np.argsort(
            np.where(all_records < 0, np.iinfo(np.int64).max, all_records), kind="stable"
        )
        out = out.take(pa.array(order))
        if name not in self._rejected:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            self._rejected[name] = pq.ParquetWriter(
                self.rejected_dir / f"{name}.parquet", out.schema, compression="zstd"
            )
        self._rejected[name].write_table(out)

    def _meta_ids(
        self,
        name: str,
        source: SourceMapping,
        batch: Batch,
        cols: dict[str, pa.Array],
        problems: conv.Problems,
    ) -> np.ndarray:
        """Provisional ids of a users/items batch; a second row for an id is a problem."""
        space = self.spaces[META_SPACE[name]]
        ok = ~problems.bad
        prov = np.full(batch.num_rows, -1, dtype=np.int64)
        prov[ok] = space.lookup(cols["id"].filter(pa.array(ok)))
        where = self._meta_where.setdefault(name, np.zeros((0, 2), dtype=np.int64))
        if where.shape[0] < space.size:
            grown = np.full((space.size, 2), -1, dtype=np.int64)
            grown[: where.shape[0]] = where
            where = self._meta_where[name] = grown
        rows = np.flatnonzero(ok)
        ids = prov[rows]
        _, first = np.unique(ids, return_index=True)
        again = np.ones(rows.size, dtype=bool)
        again[first] = False
        again |= where[ids, 0] >= 0
        if not again.any():
            return prov
        records = batch.rows(rows)
        dup_rows = rows[again]
        reasons = []
        for row in dup_rows:
            pid = prov[row]
            seen = where[pid]
            if seen[0] >= 0:
                first_file, first_record = self._meta_files[int(seen[0])], int(seen[1])
            else:
                first_file = batch.file
                first_record = int(records[np.flatnonzero(ids == pid)[0]])
            at = self._where(first_file, first_record)
            place = at["path"] if "row" not in at else f"{at['path']}, row {at['row']}"
            if first_file == batch.file:
                place = place.removeprefix(f"{batch.file.name}, ").removeprefix(batch.file.name)
                place = place or "this file"
            raw = cols["id"][int(row)].as_py()
            reasons.append(f"duplicate {META_SPACE[name]} {raw!r} (first on {place})")
        problems.add_rows(dup_rows.tolist(), source.columns[META_SPACE[name]], reasons)
        return prov

    def _file_index(self, file: SourceFile) -> int:
        if not self._meta_files or self._meta_files[-1] != file:
            self._meta_files.append(file)
        return len(self._meta_files) - 1

    def _add_meta(
        self,
        name: str,
        prov: np.ndarray,
        cols: dict[str, pa.Array],
        batch: Batch,
        keep: np.ndarray,
        counts: TableCounts,
    ) -> None:
        space = self.spaces[META_SPACE[name]]
        where = self._meta_where[name]
        where[prov, 0] = self._file_index(batch.file)
        where[prov, 1] = batch.rows(np.flatnonzero(keep))
        # Ids an earlier period described keep what it said.
        new = prov >= space.num_known
        counts.known += int((~new).sum())
        counts.kept += int(new.sum())
        if not new.all():
            mask = pa.array(new)
            prov = prov[new]
            cols = {k: v.filter(mask) for k, v in cols.items()}
        if not prov.size:
            return
        table = {"prov": prov}
        for key, column in META_COLUMNS[name].items():
            if key not in cols:
                continue
            values = cols[key]
            if key == "channel":
                channel = np.full(len(values), -1, dtype=np.int64)
                valid = conv.as_mask(pc.is_valid(values))
                if valid.any():
                    channel[valid] = self.spaces["channel"].lookup(values.filter(pa.array(valid)))
                values = pa.array(channel)
            table[column] = values
        self._meta[name].append(pa.table(table))

    def _stage(self, name: str, cols: dict[str, pa.Array]) -> None:
        n = len(cols["ts"])
        # The two id spaces are looked up side by side (Arrow's kernels release the GIL).
        assert self._pool is not None
        items = (
            None
            if name == "searches"
            else self._pool.submit(self.spaces["item"].lookup, cols["item"])
        )
        out: dict[str, Any] = {
            "user_id": self.spaces["user"].lookup(cols["user"]),
            "ts": cols["ts"],
        }
        if items is not None:
            out["item_id"] = items.result()
        if name == "watches":
            out["watch_time_s"] = pc.cast(cols["watch_time"], pa.float32())
            out["source"] = cols["source"]
        elif name == "searches":
            out["query"] = cols["query"]
        else:
            request = self._request_ids(cols, out["user_id"])
            out["request_id"] = request
            if "position" in cols:
                position = np.asarray(cols["position"].to_numpy(zero_copy_only=False))
            else:
                position = self._next_positions(request)
            out["position"] = position.astype(np.int32)
            clicked = cols["clicked"]
            out["clicked"] = clicked
            wt = pc.fill_null(pc.cast(cols["watch_time"], pa.float32()), 0.0)
            out["watch_time_s"] = pc.if_else(clicked, wt, pa.scalar(0.0, pa.float32()))
        schema = _STAGED[name]
        batch = pa.record_batch([out[f.name] for f in schema], schema=schema)
        assert batch.num_rows == n
        if name not in self._staged:
            self._staged[name] = pa.ipc.new_file(str(self.staging / f"{name}.arrow"), schema)
        self._staged[name].write_batch(batch)

    def _request_ids(self, cols: dict[str, pa.Array], user: np.ndarray) -> np.ndarray:
        """Provisional request ids: of the request column, else of (user, time) pairs (the
        rows of one user with the same time were shown together)."""
        if "request" in cols:
            return self._request_space(pa.string()).lookup(cols["request"])
        pairs = np.empty((user.size, 2), dtype=np.int64)
        pairs[:, 0] = user
        pairs[:, 1] = np.asarray(cols["ts"].to_numpy(zero_copy_only=False))
        keys = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), user.size, [None, pa.py_buffer(pairs.tobytes())]
        )
        return self._request_space(keys.type).lookup(keys)

    def _request_space(self, value_type: pa.DataType) -> IdSpace:
        if self.requests is None:
            self.requests = IdSpace("request", value_type=value_type)
        return self.requests

    def _next_positions(self, request: np.ndarray) -> np.ndarray:
        """Each row's order within its request, counting the request's earlier rows."""
        seen = 0 if self.requests is None else self.requests.size
        if self._positions.size < seen:
            grown = np.zeros(max(seen, 2 * self._positions.size), dtype=np.int64)
            grown[: self._positions.size] = self._positions
            self._positions = grown
        order = np.argsort(request, kind="stable")
        ordered = request[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        rank = np.empty(request.size, dtype=np.int64)
        rank[order] = np.arange(request.size) - np.repeat(
            starts, np.diff(np.r_[starts, request.size])
        )
        position = self._positions[request] + rank
        self._positions += np.bincount(request, minlength=self._positions.size)
        return position

    # --- writing ------------------------------------------------------------------------

    def numbering(self) -> dict[str, tuple[np.ndarray, pa.Array]]:
        """Final ids of every id space (computed once, after `read`)."""
        if self._numbering is None:
            self._numbering = {name: space.numbering() for name, space in self.spaces.items()}
        return self._numbering

    def events(self, name: str) -> Iterator[pa.Table]:
        """The staged rows of an event table with their final ids, a batch at a time."""
        path = self.staging / f"{name}.arrow"
        if not path.exists():
            return
        ids = self.numbering()
        with pa.OSFile(str(path)) as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                cols = {n: batch.column(n) for n in batch.schema.names}
                for column, space in (("user_id", "user"), ("item_id", "item")):
                    if column in cols:
                        prov = cols[column].to_numpy()
                        cols[column] = pa.array(ids[space][0][prov])
                if "request_id" in cols:
                    prov = cols["request_id"].to_numpy()
                    cols["request_id"] = pa.array(prov + 1 + self.request_offset)
                yield pa.table(cols)

    def num_new(self, space: str) -> int:
        return self.spaces[space].num_new

    def metadata(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The users or items rows of the ids new in this period, in id order; `columns`
        (default: those the mapping feeds) are the optional columns to give."""
        space = self.spaces[META_SPACE[name]]
        final, _ = self.numbering()[space.name]
        wanted = self._meta_columns[name] if columns is None else columns
        inverse = np.empty(space.size, dtype=np.int64)
        inverse[final - 1] = np.arange(space.size)
        prov = inverse[space.num_known :]
        id_column = f"{space.name}_id"
        out: dict[str, pa.Array] = {id_column: pa.array(final[prov])}
        parts = self._meta[name]
        meta = pa.concat_tables(parts) if parts else None
        at = np.full(space.size, -1, dtype=np.int64)
        if meta is not None:
            at[meta.column("prov").to_numpy()] = np.arange(meta.num_rows)
        rows = at[prov]
        take = pa.array(rows, mask=rows < 0)
        for column in wanted:
            if meta is None or column not in meta.column_names:
                out[column] = pa.nulls(prov.size, _canonical_type(name, column))
                continue
            values = meta.column(column).combine_chunks().take(take)
            if column == "channel_id":
                channel_final, _ = self.numbering()["channel"]
                raw = np.asarray(pc.fill_null(values, -1).to_numpy(zero_copy_only=False))
                final = np.zeros(raw.size, dtype=np.int64)
                final[raw >= 0] = channel_final[raw[raw >= 0]]
                values = pa.array(final, mask=raw < 0)
            out[column] = values.cast(_canonical_type(name, column), safe=False)
        return pa.table(out)

    def summary(self) -> dict[str, Any]:
        """What the manifest records of this period."""
        lo, hi = self.ts_range
        added = {k: c.kept for k, c in self.counts.items() if k in EVENT_TABLES}
        for name, space in META_SPACE.items():
            added[name] = self.spaces[space].num_new
        return {
            "bad_rows": self.bad_rows,
            "files": {k: c.files for k, c in self.counts.items()},
            "rows": added,  # rows added to each table (users, items: the new ids)
            "rejected": {k: c.rejected for k, c in self.counts.items() if c.rejected},
            "late": sum(c.late for c in self.counts.values()),
            "known_metadata_rows": {k: c.known for k, c in self.counts.items() if c.known},
            "new_ids": {name: space.num_new for name, space in self.spaces.items()},
            "time_range": {"min_ts": int(lo), "max_ts": int(hi)}
            if lo <= hi
            else {"min_ts": None, "max_ts": None},
        }

    def drop_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _canonical_type(name: str, column: str) -> pa.DataType:
    return SPECS[name].columns[column].type


def _utc(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_text(seconds: pa.Array) -> pa.Array:
    stamps = pc.cast(seconds, pa.timestamp("s", tz="UTC"))
    return pc.strftime(stamps, format="%Y-%m-%dT%H:%M:%SZ")


def _lines_or_null(counter: LineCounter, records: np.ndarray) -> pa.Array:
    lines = np.full(records.size, -1, dtype=np.int64)
    known = records >= 0
    if known.any():
        lines[known] = counter.lines(records[known])
    return pa.array(lines, mask=lines <= 0)


# --- the conversions of each table's columns --------------------------------------------


def _parsed_types(source: SourceMapping) -> dict[str, pa.DataType]:
    """The event columns a CSV reader parses straight into numbers: epoch times and watch
    times, the bulk of a log's values (text is the fallback, `sources.read_batches`)."""
    wanted = {}
    if source.table in EVENT_TABLES and source.unit("time") != "iso":
        wanted[source.columns["time"]] = pa.int64()
    if "watch_time" in source.columns:
        wanted[source.columns["watch_time"]] = pa.float64()
    # A column mapped twice (to different types) stays text.
    used = list(source.columns.values())
    return {c: t for c, t in wanted.items() if used.count(c) == 1}


Columns = dict[str, pa.Array]


def _common(
    source: SourceMapping, raw: Columns, p: conv.Problems, keys: tuple[str, ...]
) -> Columns:
    c = source.columns
    out: Columns = {}
    for key in keys:
        if key in ("user", "item"):
            out[key] = conv.identifiers(raw[c[key]], c[key], p)
        elif key == "time":
            out["ts"] = conv.times(
                raw[c[key]],
                c[key],
                p,
                unit=source.unit("time"),
                time_zone=source.time_zone,
                required=True,
                event=True,
            )
    return out


def _watch_time(source: SourceMapping, raw: Columns, p: conv.Problems, n: int) -> pa.Array:
    column = source.columns.get("watch_time")
    if column is None:
        return pa.nulls(n, pa.float64())
    return conv.lengths(
        raw[column],
        column,
        p,
        unit=source.unit("watch_time"),
        required=False,
        what=f"a watch time in {source.unit('watch_time')}",
    )


def _watches(source: SourceMapping, raw: Columns, p: conv.Problems) -> Columns:
    out = _common(source, raw, p, ("user", "item", "time"))
    out["watch_time"] = _watch_time(source, raw, p, p.num_rows)
    column = source.columns.get("source")
    out["source"] = (
        pa.nulls(p.num_rows, pa.string())
        if column is None
        else conv.choices(raw[column], column, p, WATCH_SOURCES)
    )
    return out


def _impressions(source: SourceMapping, raw: Columns, p: conv.Problems) -> Columns:
    c = source.columns
    out = _common(source, raw, p, ("user", "item", "time"))
    out["clicked"] = conv.flags(raw[c["clicked"]], c["clicked"], p, required=True)
    out["watch_time"] = _watch_time(source, raw, p, p.num_rows)
    if "request" in c:
        out["request"] = conv.identifiers(raw[c["request"]], c["request"], p)
    if "position" in c:
        out["position"] = conv.counts(raw[c["position"]], c["position"], p, what="a position")
    return out


def _searches(source: SourceMapping, raw: Columns, p: conv.Problems) -> Columns:
    out = _common(source, raw, p, ("user", "time"))
    out["query"] = conv.labels(
        raw[source.columns["query"]], source.columns["query"], p, required=True
    )
    return out


def _users(source: SourceMapping, raw: Columns, p: conv.Problems) -> Columns:
    c = source.columns
    out = {"id": conv.identifiers(raw[c["user"]], c["user"], p)}
    if "age" in c:
        out["age"] = conv.numbers(
            raw[c["age"]], c["age"], p, required=False, minimum=0, what="an age"
        )
    for key in ("gender", "region", "device"):
        if key in c:
            out[key] = conv.labels(raw[c[key]], c[key], p, required=False)
    if "logged_in" in c:
        out["logged_in"] = conv.flags(raw[c["logged_in"]], c["logged_in"], p, required=False)
    return out


def _items(source: SourceMapping, raw: Columns, p: conv.Problems) -> Columns:
    c = source.columns
    out = {"id": conv.identifiers(raw[c["item"]], c["item"], p)}
    for key in ("channel", "topic", "title", "language"):
        if key in c:
            out[key] = conv.labels(raw[c[key]], c[key], p, required=False)
    if "upload_time" in c:
        out["upload_time"] = conv.times(
            raw[c["upload_time"]],
            c["upload_time"],
            p,
            unit=source.unit("upload_time"),
            time_zone=source.time_zone,
            required=False,
            event=False,
        )
    if "duration" in c:
        out["duration"] = conv.lengths(
            raw[c["duration"]],
            c["duration"],
            p,
            unit=source.unit("duration"),
            required=False,
            what=f"a duration in {source.unit('duration')}",
        )
    return out


_CONVERT: dict[str, Callable[[SourceMapping, Columns, conv.Problems], Columns]] = {
    "watches": _watches,
    "impressions": _impressions,
    "searches": _searches,
    "users": _users,
    "items": _items,
}


# --- a file read and converted, the work an engine runs ----------------------------------

# A batch as read, its converted columns, and the problems found in its rows.
Converted = tuple[Batch, Columns, conv.Problems]


def convert_batch(
    name: str,
    source: SourceMapping,
    batch: Batch,
    not_before: int | None = None,
    allow_late: bool = False,
) -> tuple[Columns, conv.Problems]:
    """A batch's columns converted to canonical values, and the rows that cannot be used
    (duplicate users and items aside: those need the rows of every file seen so far)."""
    problems = conv.Problems(batch.num_rows)
    cols = _CONVERT[name](source, batch.columns, problems)
    if name in EVENT_TABLES and not_before is not None and not allow_late:
        late = pc.less(cols["ts"], not_before)
        end = _utc(not_before)
        problems.add(
            late,
            source.columns["time"],
            lambda r: pc.binary_join_element_wise(
                "time ",
                _iso_text(cols["ts"].take(pa.array(r))),
                f" is before the dataset's end {end} (--allow-late accepts it)",
                "",
            ),
        )
    return cols, problems


@dataclass(frozen=True)
class FileJob:
    """One file to read and convert: what a worker needs, and no data."""

    name: str
    source: SourceMapping
    file: SourceFile
    cwd: Path  # the importing process's: a relative path means the same file on a worker
    bad_rows: str
    not_before: int | None
    allow_late: bool


def _drain(items: list[Converted]) -> Iterator[Converted]:
    """The items in order, each let go of once used: a file's batches are freed one by one
    as they are staged, whoever else holds the list."""
    items.reverse()
    while items:
        yield items.pop()


def convert_file(job: FileJob) -> list[Converted]:
    """Read and convert every batch of one file (an engine's task).

    Clean batches of event tables come back without their source text, which only bad
    rows are written with. Under `bad_rows="fail"` the file stops at its first batch with
    a bad row: the import stops there, or at an earlier one."""
    here = SourceFile(job.cwd / job.file.path, job.file.format)
    source = job.source
    out: list[Converted] = []
    for read in read_batches(
        here, source.source_columns(), source.delimiter, _parsed_types(source)
    ):
        # the batch names the file as the mapping did, for messages and the rejected rows
        batch = replace(read, file=job.file)
        cols, problems = convert_batch(job.name, source, batch, job.not_before, job.allow_late)
        bad = problems.any or bool(batch.unreadable)
        if job.name in EVENT_TABLES and not bad:
            batch = replace(batch, columns={})
            # Each distinct id once: the ids are hashed here, and less travels. (Clean
            # batches only: an id of a bad row alone must not be added to its space.)
            for key in ("user", "item"):
                if key in cols:
                    cols[key] = pc.dictionary_encode(cols[key])
        out.append((batch, cols, problems))
        if bad and job.bad_rows == "fail":
            break
    return out


# --- the import -------------------------------------------------------------------------


def new_spaces(known: dict[str, pa.Array] | None = None) -> dict[str, IdSpace]:
    known = known or {}
    return {name: IdSpace(name, known.get(name)) for name in ("user", "item", "channel")}


def import_events(
    mapping: Path | str | Mapping,
    out: Path,
    *,
    force: bool = False,
    bad_rows: str = "fail",
    on_batch: Callable[[str, int], None] | None = None,
    engine: Engine | None = None,
) -> ImportResult:
    """Import your own logs as described by `mapping` (a TOML file or a `Mapping`).

    `engine`: where the files are read and converted (`funnelrec.engines.DaskEngine`: one
    task per file on a Dask cluster); by default in this process. Numbering the ids, the
    tables, the manifest and the rename into place are done here on any engine, and the
    dataset is the same, value for value."""
    started = time.perf_counter()
    out = Path(out)
    m = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    if bad_rows not in BAD_ROWS:
        raise DataError(f"bad_rows must be one of {', '.join(BAD_ROWS)}, got '{bad_rows}'")
    _check_target(out, force)
    extra: dict[str, Any] = {"loader": "events", "mapping": m.to_dict()}
    with DatasetWriter(out, source="events", force=force, extra=extra) as w:
        period = Period(
            new_spaces(),
            w.path / "_staging",
            w.path / "rejected" / "period-1",
            bad_rows=bad_rows,
        )
        if engine is None:
            period.read(m, on_batch)
        else:
            with engine:
                period.read(m, on_batch, engine)
        watches = period.counts["watches"]
        if watches.kept == 0:
            raise DataError(
                "no watches to import"
                + (f" ({watches.rejected} rows rejected)" if watches.rejected else ""),
                path=m.origin,
            )
        for name in EVENT_TABLES:
            for chunk in prefetch(period.events(name)):
                w.write(name, chunk)
        w.write("users", period.metadata("users"))
        w.write("items", period.metadata("items"))
        items = m.sources.get("items")
        for space, (_, raw) in period.numbering().items():
            # A channel column gets its id map even when empty, for appends to extend.
            if len(raw) or (space == "channel" and items and "channel" in items.columns):
                w.add_id_map(space, raw)
        period.drop_staging()
        summary = {"period": 1, "added_at": _now(), **period.summary()}
        w.manifest.extra["periods"] = [summary]
        w.manifest.extra["rejected"] = dict(summary["rejected"])
    return ImportResult.of(out, started)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
