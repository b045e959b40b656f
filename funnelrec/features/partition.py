"""The feature build over blocks of users: bounded memory at any size of data.

Every example feature is a function of one user's own events, the fitted transforms, and
one statistic over everyone: how often an item was watched before a time (the ranking
feature `item_prior_watches`). So a large dataset is cut into blocks of users and built
one block at a time (`build.build_features`):

1. partition: one streaming pass over each event table writes each block's rows to its
   own Parquet files, and keeps (item, ts) of every watch for the popularity index
   (`CountIndex`: one sorted int64 key per watch) and the time split's boundaries;
2. fit: each block is read (its events only) and counted: the vocabularies and the
   other transforms are fitted from the sums of those counts, as on the whole data;
3. write: each block's examples are written to its own shard files.

Peak memory is one block's events plus the popularity index (8 bytes a watch), whatever
the number of users. The work happens in a stable folder beside the output, with a
progress record, so an interrupted build resumes at the first block not yet written.

    plan = plan_blocks(n_events=480_000_000, n_users=1_000_000, block_events=25_000_000)
    summary = partition(ds, folder, plan)        # folder/b0000/watches.parquet, ...
    BlockTables(folder, 3).table("watches")      # block 3's watches
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funnelrec.data.dataset import Dataset
from funnelrec.errors import DataError

EVENT_TABLES = ("watches", "searches", "impressions")
_BATCH_ROWS = 1 << 20
_PARTITION_OPTIONS = {"compression": "zstd", "write_statistics": False}


class EventTables(Protocol):
    """What the feature build reads its events from: a Dataset, or one block of it."""

    @property
    def path(self) -> Path: ...

    def has(self, name: str) -> bool: ...

    def num_rows(self, name: str) -> int: ...

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table: ...


class CountsBefore(Protocol):
    """How many events of each group came before each time (`CountIndex`, or serving's
    packaged per-item counts)."""

    def count_before(self, group: np.ndarray, ts: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of consecutive user ids: block b holds ids edges[b] <= u < edges[b + 1]."""

    edges: np.ndarray  # [n_blocks + 1] int64

    @property
    def n_blocks(self) -> int:
        return len(self.edges) - 1

    def block_of(self, user: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, user, side="right").astype(np.int64) - 1


def plan_blocks(*, n_events: int, n_users: int, block_events: int) -> BlockPlan:
    """Enough blocks of equal user-id ranges for about `block_events` events each.

    User ids of canonical datasets are 1..n_users, assigned without regard to activity,
    so equal id ranges hold about equal numbers of events."""
    if block_events < 1:
        raise DataError(f"block_events must be >= 1, got {block_events}")
    n = max(1, min(math.ceil(n_events / block_events), max(n_users, 1)))
    edges = np.linspace(0, n_users + 1, n + 1).round().astype(np.int64)
    edges[-1] = np.iinfo(np.int64).max  # ids past the users table still land in a block
    return BlockPlan(edges=edges)


def block_dir(folder: Path, block: int) -> Path:
    return folder / f"b{block:04d}"


class BlockTables:
    """The event tables of one block, as `partition` wrote them."""

    def __init__(self, folder: Path, block: int) -> None:
        self.path = block_dir(folder, block)

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return self._file(name).exists()

    def num_rows(self, name: str) -> int:
        if not self.has(name):
            return 0
        return int(pq.ParquetFile(self._file(name)).metadata.num_rows)

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        if not self.has(name):
            raise DataError(f"{self.path}: block has no '{name}' table")
        return pq.read_table(self._file(name), columns=columns)


@dataclass(eq=False)
class PartitionSummary:
    """What one pass over every event tells before any block is read again."""

    n_users: int  # largest user id in the events
    n_items: int  # largest item id in the events
    watch_ts: np.ndarray  # [W] int64, every watch's ts (for the time split's boundaries)
    watch_item: np.ndarray  # [W] int64, every watch's item
    rows: dict[str, list[int]]  # table -> rows per block


def partition(
    ds: Dataset, folder: Path, plan: BlockPlan, *, on_rows: Callable[[int], None] | None = None
) -> PartitionSummary:
    """Stream every event table of `ds` into per-block Parquet files under `folder`.

    `on_rows(n)`, if given, is called after each batch of n rows (a progress bar)."""
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(plan.n_blocks):
        block_dir(folder, b).mkdir(exist_ok=True)
    n_w = ds.num_rows("watches")
    watch_ts = np.empty(n_w, dtype=np.int64)
    watch_item = np.empty(n_w, dtype=np.int64)
    filled = 0
    n_users = n_items = 0
    rows: dict[str, list[int]] = {}
    for name in EVENT_TABLES:
        if not ds.has(name):
            continue
        writers: list[pq.ParquetWriter | None] = [None] * plan.n_blocks
        counts = [0] * plan.n_blocks
        schema = None
        for batch in ds.batches(name, batch_size=_BATCH_ROWS):
            schema = batch.schema
            user = np.asarray(batch.column("user_id").to_numpy(), dtype=np.int64)
            if user.size:
                n_users = max(n_users, int(user.max()))
            if name != "searches":
                item = np.asarray(batch.column("item_id").to_numpy(), dtype=np.int64)
                if item.size:
                    n_items = max(n_items, int(item.max()))
            if name == "watches":
                m = len(user)
                if filled + m > n_w:
                    raise DataError(
                        f"{ds.path}: the watches table has more rows than its manifest says"
                    )
                watch_ts[filled : filled + m] = batch.column("ts").to_numpy()
                watch_item[filled : filled + m] = item
                filled += m
            block = plan.block_of(user)
            order = np.argsort(block, kind="stable")
            starts = np.searchsorted(block[order], np.arange(plan.n_blocks + 1))
            table = pa.Table.from_batches([batch]).take(pa.array(order))
            for b in range(plan.n_blocks):
                lo, hi = int(starts[b]), int(starts[b + 1])
                if hi == lo:
                    continue
                w = writers[b]
                if w is None:
                    w = pq.ParquetWriter(
                        block_dir(folder, b) / f"{name}.parquet", table.schema, **_PARTITION_OPTIONS
                    )
                    writers[b] = w
                w.write_table(table.slice(lo, hi - lo))
                counts[b] += hi - lo
            if on_rows is not None:
                on_rows(len(user))
        for b, w in enumerate(writers):
            if w is None and schema is not None:
                # A block without rows of this table still gets an (empty) file.
                w = pq.ParquetWriter(
                    block_dir(folder, b) / f"{name}.parquet", schema, **_PARTITION_OPTIONS
                )
            if w is not None:
                w.close()
        rows[name] = counts
    if filled != n_w:
        raise DataError(f"{ds.path}: the watches table has {filled} rows, its manifest says {n_w}")
    return PartitionSummary(
        n_users=n_users, n_items=n_items, watch_ts=watch_ts, watch_item=watch_item, rows=rows
    )


class CountIndex:
    """How many events of a group came before a time: one sorted int64 key per event.

    The key of an event is group * span + (ts - lo), so the events of group g before t are
    the keys in [g * span, g * span + (t - lo)): two binary searches per query. Unlike
    `splits.TimeIndex` it keeps neither the events' order nor their times (8 bytes per
    event instead of 24): enough for counts, at a size that fits every watch of a large
    world in memory.
    """

    def __init__(self, keys: np.ndarray, lo: int, span: int) -> None:
        self.keys = keys
        self.lo = lo
        self.span = span

    @classmethod
    def build(cls, group: np.ndarray, ts: np.ndarray, *, consume: bool = False) -> CountIndex:
        """Index events (group >= 0, ts). With `consume`, an int64 `group` array is
        overwritten with the keys instead of copied (saves its size in memory)."""
        group = np.asarray(group, dtype=np.int64)
        if not consume:
            group = group.copy()
        ts = np.asarray(ts, dtype=np.int64)
        if ts.size == 0:
            return cls(np.zeros(0, np.int64), 0, 1)
        lo = int(ts.min()) - 1
        span = int(ts.max()) - lo + 2
        if (int(group.max()) + 1) * span >= 2**62:
            raise DataError("CountIndex: groups x time range do not fit an int64 key")
        keys = group
        keys *= span
        keys += ts
        keys -= lo
        keys.sort()
        return cls(keys, lo, span)

    def count_before(self, group: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """[n] int64: events of group[i] with ts < ts[i]."""
        group = np.asarray(group, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        base = group * self.span
        order = np.argsort(base, kind="stable")  # needles in order walk the keys in order
        base_s = base[order]
        code = np.clip(ts[order] - self.lo, 0, self.span - 1)
        out = np.empty(len(group), dtype=np.int64)
        out[order] = np.searchsorted(self.keys, base_s + code) - np.searchsorted(self.keys, base_s)
        return out

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, self.keys, allow_pickle=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, lo: int, span: int) -> CountIndex:
        return cls(np.load(path, mmap_mode="r", allow_pickle=False), lo, span)
