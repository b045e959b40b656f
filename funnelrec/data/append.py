"""A new period of logs appended to a dataset: `funnelrec data append DIR NEW_LOGS...`.

    funnelrec data append /data/ds logs/2024-05-02/*.csv              # watches
    funnelrec data append /data/ds watches=day2/w.csv impressions=day2/i.parquet
    funnelrec data append /data/ds --mapping day2.toml                # its own paths
    funnelrec data append /data/ds day2/w.csv --live-items state.db   # + the live catalogue

The new logs are read with the mapping the dataset was imported with (kept in its
manifest), or with `--mapping`. Ids the dataset knows keep their numbers; new ids get the
next ones (sorted among themselves, as an import numbers them) and the id maps are
extended. Events older than the dataset's end (the largest `ts`) are bad rows, unless
`allow_late`, which accepts and counts them.

`live_items` merges the items a running service added to its catalogue (POST
/v1/items, kept in its state database) into the items table: the daily artifact built
from the grown dataset then holds them as catalogue items. A live item the dataset lacks
gets the next id, the live items first (in the order the service numbered them, so an
item keeps the id the service gave it whenever the dataset is the one it served), the
new ids of the logs after them; one the dataset holds keeps its id and its row (the
dataset's metadata wins; a different one is counted). Every field is checked as the
import checks an items row.

The new version is built aside and swapped in (`AtomicDirectory`): an interrupted append
leaves the dataset as it was. A dataset keeps one Parquet file per table, so each table
that gains rows is a new file, made without decoding the old rows: the old file's
row-group bytes are copied (shared, on file systems that can), the new rows' row groups
and a footer listing both are written after them (`loaders.parquet_append`). Tables and
id maps that gain nothing are hard links to the old files. Appending a day costs the
day's rows plus a byte copy of the tables it adds to and reading the id maps.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import fcntl
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec.data.dataset import MANIFEST, AtomicDirectory, Dataset, Manifest
from funnelrec.data.loaders.events import (
    BAD_ROWS,
    EVENT_TABLES,
    META_COLUMNS,
    META_SPACE,
    Period,
    new_spaces,
)
from funnelrec.data.loaders.mapping import COLUMN_KEYS, Mapping, load_mapping, parse_mapping
from funnelrec.data.loaders.parquet_append import append_file
from funnelrec.data.loaders.sources import prefetch
from funnelrec.data.schema import SPECS, TABLE_NAMES, validate_table
from funnelrec.errors import ArtifactError, DataError

_STAGING = "_staging"


@dataclass(frozen=True)
class AppendResult:
    """What an append added (its period, as the manifest records it) and the totals."""

    path: Path
    period: dict[str, Any]
    row_counts: dict[str, int]
    time_range: dict[str, int | None]
    seconds: float


def parse_new_logs(args: Sequence[str]) -> dict[str, list[str]]:
    """`TABLE=PATH` arguments (a bare `PATH` is watches) -> the paths of each table."""
    paths: dict[str, list[str]] = {}
    for arg in args:
        table, sep, path = arg.partition("=")
        if not sep or table not in COLUMN_KEYS:
            table, path = "watches", arg
        if not path:
            raise DataError(f"'{arg}': no path after '='")
        paths.setdefault(table, []).append(path)
    return paths


def append_events(
    dataset: Path | str,
    new_logs: MappingABC[str, Sequence[str]] | Sequence[str] | None = None,
    *,
    mapping: Path | str | Mapping | None = None,
    bad_rows: str = "fail",
    allow_late: bool = False,
    on_batch: Callable[[str, int], None] | None = None,
    live_items: LiveItems | None = None,
) -> AppendResult:
    """Append a period of logs to the dataset at `dataset` (see the module's docstring).

    `new_logs`: the files of each table (`{"watches": [...], ...}`, or command-line
    arguments for `parse_new_logs`); None reads the paths of `mapping`, or, with
    `live_items` and no mapping, no logs (a period of live items alone).
    `live_items`: the service's added items to merge (`serving.state.read_live_items`).
    """
    started = time.perf_counter()
    path = Path(dataset)
    if bad_rows not in BAD_ROWS:
        raise DataError(f"bad_rows must be one of {', '.join(BAD_ROWS)}, got '{bad_rows}'")
    with _exclusive(path):
        return _append_period(
            path, new_logs, mapping, bad_rows, allow_late, on_batch, started, live_items
        )


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the dataset directory's lock: one append at a time (the swap replaces the
    directory, so the lock is taken on the one that is still in place)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        raise ArtifactError(f"{path}: no such dataset directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{path}: another append to this dataset is running") from None
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise DataError(f"{path}: another append to this dataset just finished; run again")
        yield
    finally:
        os.close(fd)


def _append_period(
    path: Path,
    new_logs: MappingABC[str, Sequence[str]] | Sequence[str] | None,
    mapping: Path | str | Mapping | None,
    bad_rows: str,
    allow_late: bool,
    on_batch: Callable[[str, int], None] | None,
    started: float,
    live_items: LiveItems | None,
) -> AppendResult:
    ds = Dataset.open(path)
    old = ds.manifest
    if old.synthetic_timestamps:
        raise DataError(f"{path}: its timestamps are synthetic (an order): no period follows")
    if new_logs is not None and not isinstance(new_logs, MappingABC):
        new_logs = parse_new_logs(new_logs)
    given: Mapping | None = None
    period_mapping: Mapping | None = None
    if new_logs or mapping is not None or live_items is None:
        given, period_mapping = _period_mapping(ds, mapping, new_logs)
        _check_metadata_columns(ds, period_mapping)

    periods = list(old.extra.get("periods") or [_first_period(old)])
    number = int(periods[-1].get("period", len(periods))) + 1
    fingerprint = ds.fingerprint()
    known = _known_ids(ds)
    live = None
    if live_items is not None:
        lineage = {fingerprint, *(str(p["extends"]) for p in periods if p.get("extends"))}
        live = _plan_live(ds, live_items, known["item"], lineage)
        if period_mapping is None and not live.table.num_rows:
            raise DataError(
                f"{path}: nothing to append: every live item of {live_items.origin} is in the "
                "dataset already, and no logs were given"
            )
        # Numbered as if the dataset knew them: the logs' events of these items take their
        # ids, and the logs' new items follow them.
        known["item"] = pa.concat_arrays([known["item"], live.raw.cast(known["item"].type)])
    target = AtomicDirectory(path, force=True)
    try:
        period = Period(
            new_spaces(known),
            target.tmp / _STAGING,
            target.tmp / "rejected" / f"period-{number}",
            bad_rows=bad_rows,
            not_before=old.time_range.get("max_ts"),
            allow_late=allow_late,
            request_offset=_max_request_id(ds),
        )
        if period_mapping is not None:
            period.read(period_mapping, on_batch)
        manifest = copy.deepcopy(old)
        handled = _append_tables(ds, period, target.tmp, manifest, live)
        handled |= _append_id_maps(ds, period, target.tmp, manifest, live)
        _link_rest(ds.path, target.tmp, handled | {MANIFEST})
        shutil.rmtree(target.tmp / _STAGING, ignore_errors=True)

        # the version this period extends: a server whose live state was seeded from it
        # may take the new version's artifacts (its live events are the new period's)
        summary = {
            "period": number,
            "added_at": _now(),
            "extends": fingerprint,
            **period.summary(),
        }
        if live is not None:
            summary["rows"]["items"] += live.table.num_rows
            summary["new_ids"]["item"] += live.table.num_rows
            summary["live_items"] = live.summary
        _merge_time_range(manifest, summary["time_range"])
        manifest.extra["periods"] = [*periods, summary]
        rejected = dict(manifest.extra.get("rejected") or {})
        for table, n in summary["rejected"].items():
            rejected[table] = rejected.get(table, 0) + n
        manifest.extra["rejected"] = rejected
        if given is not None:
            manifest.extra["mapping"] = given.to_dict()
        manifest.created_at = _now()
        (target.tmp / MANIFEST).write_text(manifest.to_json())
        Dataset.open(target.tmp)  # every file against the manifest, before the swap
        target.commit()
    except BaseException:
        target.abort()
        raise
    return AppendResult(
        path=path,
        period=summary,
        row_counts=dict(manifest.row_counts),
        time_range=dict(manifest.time_range),
        seconds=time.perf_counter() - started,
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _first_period(m: Manifest) -> dict[str, Any]:
    """The period a dataset imported by another loader starts with: all of it."""
    return {
        "period": 1,
        "added_at": m.created_at,
        "source": m.source,
        "rows": dict(m.row_counts),
        "time_range": dict(m.time_range),
    }


def _period_mapping(
    ds: Dataset,
    mapping: Path | str | Mapping | None,
    new_logs: MappingABC[str, Sequence[str]] | None,
) -> tuple[Mapping | None, Mapping]:
    """The mapping given (None: the dataset's own is used), and the period's: the given
    or stored mapping reading `new_logs`, or the given mapping with its own paths."""
    given = None
    if mapping is not None:
        m = given = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    else:
        stored = ds.manifest.extra.get("mapping")
        if not stored:
            raise DataError(
                f"{ds.path}: imported by the {ds.manifest.source} loader, with no mapping to "
                "read new logs with (give one with --mapping)"
            )
        if not new_logs:
            raise DataError(
                "name the new logs (PATH for watches, or TABLE=PATH), or give a mapping "
                "whose paths are the new logs (--mapping)"
            )
        m = parse_mapping(stored, origin=f"{ds.path / MANIFEST} (extra.mapping)", base=Path.cwd())
    return given, (m.with_paths(new_logs, Path()) if new_logs else m)


def _check_metadata_columns(ds: Dataset, mapping: Mapping) -> None:
    """New users and items rows go into the existing tables: only their columns."""
    for name in META_SPACE:
        source = mapping.sources.get(name)
        if source is None:
            continue
        present = ds.columns(name)
        for key, column in META_COLUMNS[name].items():
            if key in source.columns and column not in present:
                raise DataError(
                    f"the dataset's {name} table has no column '{column}': the new period "
                    f"cannot map '{key}' (its {name} columns: {', '.join(present)})",
                    path=mapping.origin,
                )
        if "channel" in source.columns and "channel" not in ds.manifest.id_maps:
            raise DataError(
                f"{ds.path}: the items' channels have no id map to extend", path=mapping.origin
            )


def _known_ids(ds: Dataset) -> dict[str, pa.Array]:
    """The raw ids of the dataset's id spaces, each at its id - 1."""
    known: dict[str, pa.Array] = {}
    for space in ("user", "item", "channel"):
        if space not in ds.manifest.id_maps:
            if space == "channel":
                continue
            raise DataError(f"{ds.path}: no id map of the {space}s to extend")
        table = ds.id_map(space)
        ids = table.column("id").to_numpy()
        raw = table.column("raw_id").combine_chunks()
        if not np.array_equal(ids, np.arange(1, ids.size + 1)):  # written in id order
            order = np.argsort(ids, kind="stable")
            if not np.array_equal(ids[order], np.arange(1, ids.size + 1)):
                raise DataError(
                    f"the ids of '{space}' do not run 1..{ids.size}",
                    path=ds.path / ds.manifest.id_maps[space],
                )
            raw = raw.take(pa.array(order))
        known[space] = raw
    for table, space in META_SPACE.items():
        if ds.num_rows(table) != len(known[space]):
            raise DataError(
                f"the {table} table has {ds.num_rows(table)} rows, its id map "
                f"{len(known[space])}: new ids would not follow on",
                path=ds.path / ds.manifest.tables[table],
            )
    return known


def _max_request_id(ds: Dataset) -> int:
    """The largest request id of the impressions, from the footer's statistics."""
    if not ds.has("impressions") or ds.num_rows("impressions") == 0:
        return 0
    file = ds.path / ds.manifest.tables["impressions"]
    meta = pq.read_metadata(file)
    column = meta.schema.to_arrow_schema().get_field_index("request_id")
    best = 0
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            table = ds.table("impressions", ["request_id"])
            return int(pc.max(table.column(0)).as_py() or 0)
        best = max(best, int(stats.max))
    return best


def _append_tables(
    ds: Dataset, period: Period, out: Path, manifest: Manifest, live: _LivePlan | None
) -> set[str]:
    """Each table: its new rows appended to the old file, or the old file linked."""
    handled = set()
    staging = out / _STAGING
    for name in TABLE_NAMES:
        old_file = ds.path / manifest.tables[name] if ds.has(name) else None
        schema = pq.read_schema(old_file).remove_metadata() if old_file is not None else None
        chunks: Iterable[pa.Table]
        if name in EVENT_TABLES:
            chunks = prefetch(period.events(name))
        else:
            # the live items' ids come first (`_plan_live`), the logs' new ids after them
            chunks = [live.table] if live is not None and name == "items" else []
            if period.num_new(META_SPACE[name]):
                optional = None if schema is None else schema.names[1:]
                chunks.append(period.metadata(name, optional))
        staged = staging / f"{name}.parquet"
        added = _write_rows(name, chunks, schema, staged)
        file_name = manifest.tables.get(name, f"{name}.parquet")
        if old_file is not None:
            handled.add(old_file.name)
            if added:
                _append(old_file, staged, out / file_name)
            else:
                _link(old_file, out / file_name)
        elif added:
            os.replace(staged, out / file_name)
            manifest.tables[name] = file_name
            required = {c.name for c in SPECS[name].required}
            manifest.optional_columns[name] = [
                n for n in pq.read_schema(out / file_name).names if n not in required
            ]
        if added or old_file is not None:
            manifest.row_counts[name] = manifest.row_counts.get(name, 0) + added
    # Keep the manifest's table order canonical.
    manifest.tables = {t: manifest.tables[t] for t in TABLE_NAMES if t in manifest.tables}
    manifest.row_counts = {t: manifest.row_counts[t] for t in manifest.tables}
    return handled


def _write_rows(name: str, chunks: Iterable[pa.Table], schema: pa.Schema | None, out: Path) -> int:
    """Validate and write new rows in the columns of the existing table; how many."""
    writer = None
    rows = 0
    where = f"new rows of table '{name}'"
    try:
        for chunk in chunks:
            if not chunk.num_rows:
                continue
            if schema is not None:
                chunk = _conform(name, chunk, schema)
            table = validate_table(name, chunk, where, row_offset=rows)
            if writer is None:
                out.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=1 << 20)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def _conform(name: str, chunk: pa.Table, schema: pa.Schema) -> pa.Table:
    """New rows with the existing table's columns: absent optional ones are null."""
    extra = [c for c in chunk.column_names if c not in schema.names]
    if extra:
        raise DataError(f"the dataset's {name} table has no column(s) {', '.join(extra)}")
    columns = {
        f.name: chunk.column(f.name)
        if f.name in chunk.column_names
        else pa.nulls(chunk.num_rows, SPECS[name].columns[f.name].type)
        for f in schema
    }
    return pa.table(columns)


def _append(old: Path, new: Path, out: Path) -> None:
    try:
        append_file(old, new, out)
    except DataError:
        # Files of another writer's schema: rewrite, decoding the old rows.
        _rewrite(old, new, out)


def _rewrite(old: Path, new: Path, out: Path) -> None:
    schema = pq.read_schema(new)

    def batches() -> Iterator[pa.RecordBatch]:
        for file in (old, new):
            with pq.ParquetFile(file) as f:
                for batch in f.iter_batches(batch_size=1 << 20):
                    yield pa.Table.from_batches([batch]).cast(schema).to_batches()[0]

    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for batch in batches():
            writer.write_batch(batch, row_group_size=1 << 20)


def _append_id_maps(
    ds: Dataset, period: Period, out: Path, manifest: Manifest, live: _LivePlan | None
) -> set[str]:
    handled = set()
    staging = out / _STAGING
    for space, (_, raw) in period.numbering().items():
        old_name = manifest.id_maps.get(space)
        old_file = ds.path / old_name if old_name is not None else None
        if old_file is not None:
            handled.add(old_file.name)
        first = period.spaces[space].num_known + 1
        if live is not None and space == "item" and len(live.raw):
            raw = pa.concat_arrays([live.raw.cast(raw.type), raw])
            first -= len(live.raw)
        if not len(raw):
            if old_file is not None:
                _link(old_file, out / old_file.name)
            continue
        table = pa.table(
            {
                "raw_id": raw.cast(pa.string()),
                "id": pa.array(np.arange(first, first + len(raw), dtype=np.int64)),
            }
        )
        file_name = old_name or f"idmap_{space}.parquet"
        staged = staging / file_name
        staged.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, staged, compression="zstd")
        if old_file is not None:
            _append(old_file, staged, out / file_name)
        else:
            os.replace(staged, out / file_name)
            manifest.id_maps[space] = file_name
    return handled


def _link(src: Path, dst: Path) -> None:
    """A hard link (the old version is never modified, only replaced), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_rest(src: Path, dst: Path, skip: set[str]) -> None:
    """Everything else of the old version (earlier periods' rejected rows, a source's own
    folders), linked into the new one."""
    for entry in src.iterdir():
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir():
            target.mkdir(exist_ok=True)
            _link_rest(entry, target, set())
        elif not target.exists():
            _link(entry, target)


def _merge_time_range(manifest: Manifest, added: MappingABC[str, int | None]) -> None:
    lo = [v for v in (manifest.time_range.get("min_ts"), added.get("min_ts")) if v is not None]
    hi = [v for v in (manifest.time_range.get("max_ts"), added.get("max_ts")) if v is not None]
    manifest.time_range = {
        "min_ts": min(lo) if lo else None,
        "max_ts": max(hi) if hi else None,
    }


# --------------------------------------------------------------------------- live items

# What an item added while serving says of itself (`serving.state`), in the items
# table's column names.
LIVE_FIELDS = ("channel_id", "topic", "title", "upload_ts", "duration_s")
# Conflicting external ids named in the period (the count is of all).
_CONFLICTS_LISTED = 10


@dataclass(frozen=True)
class LiveItems:
    """Items a running service added to its catalogue (POST /v1/items), to be merged into
    the items table; `serving.state.read_live_items` reads them from a state database.

    rows:        one mapping per item: item_id (the id the service gave it), raw_id (its
                 external id), and the LIVE_FIELDS (channel_id: a dataset channel id)
    origin:      where they were read, named in errors and in the period
    seeded_from: the fingerprint of the data the service's state was seeded from (its
                 item and channel ids are that data's); None: not recorded
    """

    rows: Sequence[MappingABC[str, Any]]
    origin: str
    seeded_from: str | None = None


@dataclass(frozen=True)
class _LivePlan:
    """The live items an append merges: the new ones' items rows (their final ids, in id
    order) and raw ids, and what the period records of them."""

    table: pa.Table
    raw: pa.Array
    summary: dict[str, Any]


def _plan_live(ds: Dataset, live: LiveItems, known: pa.Array, lineage: set[str]) -> _LivePlan:
    """Check the live items and decide which are new (`known`: the item ids' raw ids)."""
    if live.seeded_from is not None and live.seeded_from not in lineage:
        raise DataError(
            f"the service's state was seeded from data {live.seeded_from}, not from {ds.path} "
            "nor a version it extends: its item and channel ids are another dataset's",
            path=live.origin,
        )
    channels = ds.id_map("channel").num_rows if "channel" in ds.manifest.id_maps else 0
    rows = [_live_row(row, i, live.origin, channels) for i, row in enumerate(live.rows)]
    first: dict[str, int] = {}
    for row in rows:
        seen = first.setdefault(row["raw_id"], row["item_id"])
        if seen != row["item_id"]:
            raise DataError(
                f"live item {row['raw_id']!r}, field 'raw_id': duplicate item (service item "
                f"ids {seen} and {row['item_id']})",
                path=live.origin,
            )
    raw = pa.array([row["raw_id"] for row in rows], pa.string())
    found = pc.fill_null(pc.index_in(raw, value_set=known.cast(pa.string())), -1)
    at = np.asarray(found.to_numpy(zero_copy_only=False), dtype=np.int64)
    present = ds.columns("items")

    conflicts = _conflicting(ds, [rows[i] for i in np.flatnonzero(at >= 0)], at[at >= 0] + 1)
    # The service numbered its items in the order it added them, above the catalogue it
    # served: in that order they take the next ids, which are the service's own when
    # this dataset is the one it served (its users' live histories name those ids).
    new = sorted((rows[i] for i in np.flatnonzero(at < 0)), key=lambda r: r["item_id"])
    for name in LIVE_FIELDS:
        holding = next((r for r in new if r[name] is not None), None)
        if name not in present and holding is not None:
            raise DataError(
                f"the dataset's items table has no column '{name}': live item "
                f"{holding['raw_id']!r} cannot be merged with its {name} "
                f"(its items columns: {', '.join(present)})",
                path=live.origin,
            )
    ids = np.arange(len(known) + 1, len(known) + 1 + len(new), dtype=np.int64)
    columns: dict[str, pa.Array] = {"item_id": pa.array(ids)}
    for name in LIVE_FIELDS:
        if name in present:
            columns[name] = pa.array([r[name] for r in new], SPECS["items"].columns[name].type)
    summary = {
        "from": live.origin,
        "rows": len(rows),
        "new": len(new),  # merged under new ids
        "known": int((at >= 0).sum()),  # already in the dataset: its row is kept
        "conflicting": len(conflicts),  # of the known: the service said otherwise
        "conflicting_ids": conflicts[:_CONFLICTS_LISTED],
        "renumbered": int(sum(r["item_id"] != i for r, i in zip(new, ids.tolist(), strict=True))),
    }
    return _LivePlan(pa.table(columns), pa.array([r["raw_id"] for r in new], pa.string()), summary)


def _conflicting(ds: Dataset, rows: list[dict[str, Any]], ids: np.ndarray) -> list[str]:
    """The raw ids of the live `rows` whose metadata differs from the dataset's rows of
    their item `ids` (a column the dataset lacks counts as missing values)."""
    if not rows:
        return []
    names = [c for c in LIVE_FIELDS if c in ds.columns("items")]
    table = ds.table("items", ["item_id", *names])
    item_ids = np.asarray(table.column("item_id").to_numpy(), dtype=np.int64)
    row_of = np.full(int(item_ids.max()) + 1, -1, dtype=np.int64)
    row_of[item_ids] = np.arange(item_ids.size)
    stored = table.take(pa.array(row_of[ids])).to_pylist()
    out = []
    for live, have in zip(rows, stored, strict=True):
        for name in LIVE_FIELDS:
            a, b = live[name], have.get(name)
            if name == "duration_s" and a is not None and b is not None:
                # the items table keeps durations as float32
                a, b = np.float32(a), np.float32(b)
            if a != b:
                out.append(live["raw_id"])
                break
    return out


def _live_row(row: MappingABC[str, Any], index: int, origin: str, channels: int) -> dict[str, Any]:
    """One live item, each field checked as the import checks an items row's value (a
    clear error naming the item and the field), in the items table's types."""
    raw = _live_text(row.get("raw_id"))
    store_id = row.get("item_id")
    if raw is None:
        raise DataError(
            f"live item {index + 1} (service item id {store_id}), field 'raw_id': missing value",
            path=origin,
        )

    def bad(name: str, message: str) -> DataError:
        return DataError(f"live item {raw!r}, field '{name}': {message}", path=origin)

    if not _is_int(store_id) or store_id < 1:
        raise bad("item_id", f"{store_id!r} is not an item id (an integer >= 1)")
    out: dict[str, Any] = {"item_id": int(store_id), "raw_id": raw}
    channel = row.get("channel_id")
    if channel is not None and not (_is_int(channel) and 1 <= channel <= channels):
        known = f"'s channel ids run 1..{channels}" if channels else " has no channels"
        raise bad("channel_id", f"unknown channel {channel!r} (the dataset{known})")
    out["channel_id"] = None if channel is None else int(channel)
    for name in ("topic", "title"):
        value = row.get(name)
        out[name] = _live_text(value)
        if value is not None and not isinstance(value, str | int | float):
            raise bad(name, f"{value!r} is not text")
    upload = row.get("upload_ts")
    if upload is not None and not (_is_number(upload) and math.isfinite(upload)):
        raise bad("upload_ts", f"{upload!r} is not a time in s (epoch seconds)")
    out["upload_ts"] = None if upload is None else math.floor(upload)
    duration = row.get("duration_s")
    if duration is not None and not (_is_number(duration) and duration >= 0):
        raise bad("duration_s", f"{duration!r} is not a duration in s (a number >= 0)")
    if duration is not None and not math.isfinite(duration):
        raise bad("duration_s", f"{duration!r} is not a finite duration")
    out["duration_s"] = None if duration is None else float(duration)
    return out


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _live_text(value: object) -> str | None:
    """Text as the import reads it: numbers as their decimal text, blank is missing."""
    if _is_number(value):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value
