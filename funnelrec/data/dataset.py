"""A dataset on disk: a directory of canonical Parquet tables plus `manifest.json`.

    DIR/manifest.json          format version, source, row counts, time range, columns
    DIR/users.parquet ...      one file per table (see `schema`), written in row groups
    DIR/idmap_user.parquet     raw id (string) -> dense id (int64), one file per id space
    DIR/<extra>/               anything a source keeps beside the tables (the simulator's truth/)

Directories are written atomically: `DatasetWriter` builds everything in a hidden temporary
directory next to the target and renames it into place on `commit()`, so a failed or
killed import never leaves a half-written dataset behind.

Example:
    with DatasetWriter(out, source="sequence") as w:
        w.write("users", users_table)
        w.write("items", items_table)
        w.write("watches", watches_table)   # may be called many times: streamed chunks
        w.add_id_map("user", raw_user_ids)   # raw id of dense id i at position i - 1
    ds = Dataset.open(out)
    ds.table("watches", columns=["user_id", "ts"])

`Dataset.open` also reads a dataset at a URI of another filesystem (`s3://`, `gs://`, any
fsspec scheme: `funnelrec.filesystems`): its files are copied to a local temporary folder
first, removed with the `Dataset`, because the checks and the block partition read local
files. A dataset there is complete once its manifest is: it is written last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec import __version__
from funnelrec.data.checks import (
    IdSet,
    TableCheck,
    check_files,
    iter_batches,
    read_footer,
    read_table,
)
from funnelrec.data.schema import REQUIRED_TABLES, SPECS, TABLE_NAMES, validate_table
from funnelrec.errors import ArtifactError, DataError
from funnelrec.filesystems import LocalCopy, resolve

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Rows per batch when the columns a caller did not ask for are read only to be checked.
_CHECK_BATCH = 1 << 20


@dataclass
class Manifest:
    """What `manifest.json` holds; `extra` is free-form metadata of the source."""

    source: str
    format_version: int = FORMAT_VERSION
    created_by: str = f"funnelrec {__version__}"
    created_at: str = ""
    tables: dict[str, str] = field(default_factory=dict)  # table -> file name
    row_counts: dict[str, int] = field(default_factory=dict)
    optional_columns: dict[str, list[str]] = field(default_factory=dict)
    time_range: dict[str, int | None] = field(
        default_factory=lambda: {"min_ts": None, "max_ts": None}
    )
    id_maps: dict[str, str] = field(default_factory=dict)  # id space -> file name
    synthetic_timestamps: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not a funnelrec dataset (no {MANIFEST})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: dataset format version {version}, this funnelrec reads {FORMAT_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's content, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_artifact_meta(
    art: Path | str, file_name: str, kind: str, version: int, what: str
) -> dict[str, Any]:
    """The JSON metadata of an artifact, refused unless its kind and format version match.

    `what` names the artifact in messages ("candidate model", "ranker")."""
    art = Path(art)
    file = art / file_name
    try:
        meta: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{art}: not a {what} artifact (no {file_name})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: unreadable ({e})") from None
    if meta.get("kind") != kind:
        raise ArtifactError(f"{art}: a '{meta.get('kind')}' artifact, not a {what}")
    if meta.get("format_version") != version:
        raise ArtifactError(
            f"{file}: {what} artifact format version {meta.get('format_version')}, "
            f"this funnelrec reads {version}"
        )
    return meta


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class AtomicDirectory:
    """Build a directory under a hidden temporary name; rename it into place on commit.

    On any exception (or if `commit` is never called) the temporary directory is removed.
    A process killed with SIGKILL cannot clean up, so leftovers of dead processes are
    swept the next time a directory of the same name is built.
    """

    def __init__(self, target: Path, *, force: bool = False) -> None:
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not force:
            raise DataError(f"{self.target} already exists (use --force to overwrite)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._sweep_stale()
        self.tmp = (
            self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.tmp.mkdir()
        self.committed = False

    def _sweep_stale(self) -> None:
        for p in self.target.parent.glob(f".{self.target.name}.tmp-*"):
            try:
                pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> Path:
        if self.target.exists():
            if not self.force:
                raise DataError(f"{self.target} already exists (use --force to overwrite)")
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        self.committed = True
        return self.target

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetWriter:
    """Writes a dataset directory atomically; tables may arrive in chunks (streaming).

    Each chunk is validated (`schema.validate_table`) before it is written, with row
    numbers counted across chunks. All chunks of a table must carry the same columns.
    """

    def __init__(
        self,
        out: Path,
        *,
        source: str,
        force: bool = False,
        synthetic_timestamps: bool = False,
        extra: dict[str, Any] | None = None,
        where: dict[str, object] | None = None,
    ) -> None:
        self._dir = AtomicDirectory(Path(out), force=force)
        self.path = self._dir.tmp
        self.manifest = Manifest(
            source=source, synthetic_timestamps=synthetic_timestamps, extra=dict(extra or {})
        )
        self._where = dict(where or {})
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._rows: dict[str, int] = {}
        self._ts = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, name: str, table: pa.Table, *, where: object = None) -> None:
        """Validate and append a chunk of table `name`."""
        where = where if where is not None else self._where.get(name)
        offset = self._rows.get(name, 0)
        table = validate_table(name, table, where, row_offset=offset)
        if name not in self._writers:
            self._schemas[name] = table.schema
            self._writers[name] = pq.ParquetWriter(
                self.path / f"{name}.parquet", table.schema, compression="zstd"
            )
        elif table.schema != self._schemas[name]:
            raise DataError(
                f"chunk of table '{name}' has columns {table.column_names}, "
                f"earlier chunks {self._schemas[name].names}",
                path=where,
            )
        if table.num_rows:
            self._writers[name].write_table(table, row_group_size=1 << 20)
        self._rows[name] = offset + table.num_rows
        if "ts" in table.column_names and table.num_rows:
            mm = pc.min_max(table.column("ts"))
            self._ts[0] = min(self._ts[0], mm["min"].as_py())
            self._ts[1] = max(self._ts[1], mm["max"].as_py())

    def add_id_map(self, space: str, raw_ids: Sequence[str] | pa.Array | np.ndarray) -> None:
        """Save the raw ids of id space `space`: dense id i has raw id `raw_ids[i - 1]`."""
        raw = pa.array(raw_ids).cast(pa.string())
        table = pa.table(
            {"raw_id": raw, "id": pa.array(np.arange(1, len(raw) + 1, dtype=np.int64))}
        )
        fname = f"idmap_{space}.parquet"
        pq.write_table(table, self.path / fname, compression="zstd")
        self.manifest.id_maps[space] = fname

    def subdir(self, name: str) -> Path:
        """A directory inside the dataset for a source's own files (e.g. `truth`)."""
        p = self.path / name
        p.mkdir(exist_ok=True)
        return p

    def commit(self) -> Path:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        missing = [t for t in REQUIRED_TABLES if t not in self._rows]
        if missing:
            self.abort()
            raise DataError(f"dataset has no {', '.join(missing)} table")
        m = self.manifest
        m.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for name in TABLE_NAMES:
            if name in self._rows:
                m.tables[name] = f"{name}.parquet"
                m.row_counts[name] = self._rows[name]
                required = {c.name for c in SPECS[name].required}
                m.optional_columns[name] = [
                    n for n in self._schemas[name].names if n not in required
                ]
        if self._ts[0] <= self._ts[1]:
            m.time_range = {"min_ts": int(self._ts[0]), "max_ts": int(self._ts[1])}
        try:
            (self.path / MANIFEST).write_text(m.to_json())
            return self._dir.commit()
        except BaseException:
            # e.g. the target appeared meanwhile: never leave the temporary directory behind
            self.abort()
            raise

    def abort(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.close()
        self._writers.clear()
        self._dir.abort()


class Dataset:
    """A dataset directory opened for reading.

    Opening checks every file from its footer, and the first read of each table checks
    its values (`checks.py`): damaged data is refused with a `DataError` naming the file,
    the column and the first offending row, before any stage computes from it.
    """

    def __init__(
        self, path: Path, manifest: Manifest, schemas: dict[str, pa.Schema] | None = None
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._schemas = dict(schemas or {})
        self._checked: set[str] = set()  # tables whose values have been checked
        self._id_sets: dict[str, IdSet] = {}
        # where it was opened from (a URI when `path` is a local copy of it)
        self.uri = str(path)
        self._copy: LocalCopy | None = None

    @classmethod
    def open(cls, path: Path | str) -> Dataset:
        """Open the dataset at a local path or a URI (see the module docstring)."""
        if isinstance(path, str) and "://" in path:
            loc = resolve(path)
            if not loc.is_local:
                if not loc.join(MANIFEST).is_file():
                    raise ArtifactError(
                        f"{loc.uri}: not a funnelrec dataset, or one still being written "
                        f"(no {MANIFEST}: it is written last)"
                    )
                copy = LocalCopy(loc)
                ds = cls.open(copy.path)
                ds.uri, ds._copy = loc.uri, copy
                return ds
            path = loc.local
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path}: no such dataset directory")
        manifest = Manifest.from_file(path / MANIFEST)
        schemas = check_files(
            path,
            manifest.tables,
            manifest.row_counts,
            manifest.id_maps,
            where=path / MANIFEST,
        )
        return cls(path, manifest, schemas)

    def has(self, name: str) -> bool:
        return name in self.manifest.tables

    def _file(self, name: str) -> Path:
        if not self.has(name):
            raise DataError(f"{self.path}: dataset has no '{name}' table")
        return self.path / self.manifest.tables[name]

    def _columns_to_read(self, name: str, columns: Sequence[str] | None) -> list[str] | None:
        if not columns:
            return None
        absent = [c for c in columns if c not in self.columns(name)]
        if absent:
            raise DataError(f"no column(s) {', '.join(absent)}", path=self._file(name))
        return list(columns)

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Read a whole table (or some of its columns)."""
        file = self._file(name)
        table = read_table(file, self._columns_to_read(name, columns))
        if name not in self._checked:
            # The columns read are checked as they are; the others are streamed, so that
            # checking costs no more memory than a batch beyond what the caller asked for.
            check = self._check(name)
            check.feed(table, 0)
            rest = [c for c in self.columns(name) if c not in table.column_names]
            if rest and not check.failed:
                offset = 0
                for batch in iter_batches(file, rest, _CHECK_BATCH):
                    check.feed(batch, offset)
                    offset += batch.num_rows
            check.done()
            self._checked.add(name)
        return table

    def batches(
        self, name: str, columns: Sequence[str] | None = None, batch_size: int = 1 << 20
    ) -> Iterator[pa.RecordBatch]:
        """Stream a table in record batches, never holding it all in memory."""
        file = self._file(name)
        wanted = self._columns_to_read(name, columns)
        if name in self._checked:
            yield from iter_batches(file, wanted, batch_size)
            return
        # The first read of the table: every column is read and checked, and the
        # caller's are handed on. A batch with an offence is not handed on: the rest of
        # the table is read to count the rows that break the same rule, then it raises.
        check = self._check(name)
        offset = 0
        stream = iter_batches(file, None, batch_size)
        for batch in stream:
            check.feed(batch, offset)
            offset += batch.num_rows
            if check.failed:
                for more in stream:
                    check.feed(more, offset)
                    offset += more.num_rows
                check.done()
            yield batch if wanted is None else batch.select(wanted)
        check.done()
        self._checked.add(name)

    def _check(self, name: str) -> TableCheck:
        return TableCheck(name, self._file(name), self._id_set)

    def _id_set(self, name: str) -> IdSet:
        """The ids the users or items table lists (read, and so checked, on first use)."""
        if name not in self._id_sets:
            id_column = SPECS[name].required[0].name
            self._id_sets[name] = IdSet(self.table(name, [id_column]).column(0))
        return self._id_sets[name]

    def columns(self, name: str) -> list[str]:
        if name not in self._schemas:
            self._schemas[name], _ = read_footer(self._file(name), f"'{name}' table")
        return list(self._schemas[name].names)

    def num_rows(self, name: str) -> int:
        return int(self.manifest.row_counts.get(name, 0))

    def id_map(self, space: str) -> pa.Table:
        """raw_id (string) and id (int64) of an id space, e.g. 'user' or 'item'."""
        if space not in self.manifest.id_maps:
            raise DataError(f"{self.path}: dataset has no id map for '{space}'")
        return read_table(self.path / self.manifest.id_maps[space], None)

    def fingerprint(self) -> str:
        """A short hash of the manifest and table files' sizes: changes when the data does."""
        meta = asdict(self.manifest)
        meta.pop("created_at", None)
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for name in sorted(self.manifest.tables):
            st = self._file(name).stat()
            h.update(f"{name}:{st.st_size}".encode())
        return h.hexdigest()[:16]
