"""Read example shards as batches ready for `nn.EmbeddingBag` (flat ids + offsets).

    loader = candidate_loader(FEAT, "train", batch_size=1024, shuffle=True, seed=0)
    for epoch in range(3):
        for batch in loader:          # CandidateBatch; reshuffled every epoch
            loss = model.compute_loss(batch)
    loader.set_epoch(5)               # resume: the order of epoch 5, as a fresh run has it

    ranking_loader(FEAT, "valid", batch_size=4096)   # RankingBatch, dense normalised

Reading works a Parquet row group at a time (`FeaturesConfig.row_group_rows` rows). A batch
is cut from Arrow columns directly: a list column's flat values and offsets become the
bag's ids and offsets, so there is no Python loop per example. Shuffling permutes the row
groups of all shards, then the rows of a window of `buffer_groups` row groups (training
shards are also written in random order, so every window is already a mix of users).
The order depends only on (seed, epoch), so runs are repeatable and resumable.

Data-parallel training (`distributed`): with `rank=r, world_size=N` a loader yields only
rank r's row groups: the epoch's permuted row groups are dealt out in turn to the rank
with the fewest rows so far, so the N ranks together read every example once per epoch,
each its own row groups, and their shares differ by at most one row group (with fewer
than 8 row groups per rank, row groups are cut into parts first, to keep shares even).

    candidate_loader(FEAT, "train", batch_size=512, shuffle=True, rank=1, world_size=2)

Shards on another filesystem (`s3://`, `gs://`, any fsspec scheme: `Features.shard_files`)
are read where they are, each rank opening its own row groups through the filesystem.

Ranking shards hold raw continuous values; the loader maps them through the fitted
quantile normaliser into x, x^2, sqrt(x) and missing flags (the columns of the ranking
spec's `dense_columns`). Their bags (history, search) are per request: the loader keeps the
split's requests table in memory and gathers each impression's bags by `request_index`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyarrow import fs as pafs
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from funnelrec.errors import ArtifactError
from funnelrec.features import REQUESTS, Features, gather_ranges
from funnelrec.features.batch import CandidateBatch, RankingBatch

Stage = Literal["candidates", "ranking"]

# With several ranks, each reads at least this many units (row groups or parts of one), so
# that the ranks' shares of an epoch differ by at most ~1/8.
MIN_UNITS_PER_RANK = 8


def _as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def bag(col: pa.ChunkedArray | pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """A list<int> column -> (flat ids [N] int64, offsets [B] int64) for nn.EmbeddingBag."""
    arr = _as_array(col)
    offs = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)  # [B + 1], respects slicing
    values = np.array(arr.values.to_numpy()[offs[0] : offs[-1]], dtype=np.int64)
    return torch.from_numpy(values), torch.from_numpy(offs[:-1] - offs[0])


def _ids(col: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    return torch.from_numpy(np.array(_as_array(col).to_numpy(), dtype=np.int64))


def _floats(col: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    # np.array copies: Arrow memory is read-only and torch wants writable tensors.
    return torch.from_numpy(np.array(_as_array(col).to_numpy(), dtype=np.float32))


def _matrix(col: pa.ChunkedArray | pa.Array, width: int) -> torch.Tensor:
    """A list<float> column with `width` values per row -> [B, width] float32."""
    arr = _as_array(col)
    offs = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    values = np.array(arr.values.to_numpy()[offs[0] : offs[-1]], dtype=np.float32)
    return torch.from_numpy(values.reshape(len(arr), width))


def to_candidate_batch(table: pa.Table, n_dense: int) -> CandidateBatch:
    """Rows of a candidates shard -> CandidateBatch (see `batch.CandidateBatch`)."""
    history, history_offsets = bag(table.column("history"))
    search, search_offsets = bag(table.column("search"))
    return CandidateBatch(
        history=history,
        history_offsets=history_offsets,
        search=search,
        search_offsets=search_offsets,
        region=_ids(table.column("region")),
        device=_ids(table.column("device")),
        dense=_matrix(table.column("dense"), n_dense),
        example_age=_floats(table.column("example_age")),
        label=_ids(table.column("label")),
        user_id=_ids(table.column("user_id")),
        ts=_ids(table.column("ts")),
    )


class RankingConverter:
    """Rows of a ranking shard -> RankingBatch.

    Joins each impression to its request's bags (held in memory as flat ids + offsets,
    from the split's requests.parquet) and maps the raw continuous columns through the
    fitted quantile normaliser.
    """

    def __init__(self, features: Features, split: str) -> None:
        spec = features.ranking_spec
        self.categorical = [f for f, _ in spec["categorical"]]
        self.bags = [f for f, _ in spec["bags"]]
        self.raw = list(features.manifest["ranking"]["raw_continuous"])
        self.normalizer = features.normalizer("ranking")
        requests = read_requests(features, split, self.bags)
        self._bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.bags:
            arr = _as_array(requests.column(name))
            offs = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
            # int32 ids: the requests of a large world's training split hold billions.
            values = np.asarray(arr.values.to_numpy(), dtype=np.int32)[offs[0] : offs[-1]]
            self._bags[name] = (values, offs - offs[0])

    @property
    def columns(self) -> list[str]:
        fixed = ["label", "watch_time", "user_id", "request_id", "request_index"]
        return fixed + self.categorical + self.raw

    def _bag(self, name: str, request: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        values, offs = self._bags[name]
        flat, offsets = gather_ranges(values, offs[request], offs[request + 1])
        return torch.from_numpy(flat.astype(np.int64)), torch.from_numpy(offsets[:-1])

    def __call__(self, table: pa.Table) -> RankingBatch:
        raw = {
            name: np.asarray(_as_array(table.column(name)).to_numpy(), dtype=np.float64)
            for name in self.raw
        }
        request = np.asarray(_as_array(table.column("request_index")).to_numpy(), np.int64)
        return RankingBatch(
            categorical={f: _ids(table.column(f)) for f in self.categorical},
            bags={f: self._bag(f, request) for f in self.bags},
            dense=torch.from_numpy(self.normalizer.transform(raw)),
            label=_floats(table.column("label")),
            watch_time=_floats(table.column("watch_time")),
            user_id=_ids(table.column("user_id")),
            request_id=_ids(table.column("request_id")),
        )


class ShardDataset(IterableDataset):
    """An iterable of ready batches over the row groups of some Parquet shards.

    files:          shard paths (on `filesystem`: any pyarrow filesystem; None: local)
    columns:        columns to read
    convert:        Arrow table of batch rows -> batch object
    batch_size:     rows per batch (the last one may be smaller unless drop_last)
    shuffle, seed:  row-group order and rows within a window of `buffer_groups` groups
    rank, world_size: read only this rank's share of the epoch's row groups (one rank of a
                    data-parallel run; see the module docstring)
    """

    def __init__(
        self,
        files: Sequence[Path | str],
        columns: list[str],
        convert: Callable[[pa.Table], Any],
        *,
        filesystem: pafs.FileSystem | None = None,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        buffer_groups: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank = rank
        self.world_size = world_size
        self.files = list(files)
        self.filesystem = filesystem
        self.columns = columns
        self.convert = convert
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.buffer_groups = max(1, buffer_groups)
        self.epoch = 0
        groups = []
        for f, path in enumerate(files):
            try:
                meta = self._open(f).metadata
            except (OSError, pa.ArrowInvalid) as e:
                raise ArtifactError(f"{path}: unreadable shard ({e})") from None
            groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        groups = [u for u in groups if u[2] > 0]
        # units of reading and shuffling: (file, row group, first row, rows). Ranks' shares
        # differ by up to one unit, so with few row groups per rank (small data) each group
        # is cut into parts: every rank then reads the groups it has a part of, a small
        # overhead on small data. One rank keeps whole groups (its order never changes).
        parts = 1
        if world_size > 1 and len(groups) < MIN_UNITS_PER_RANK * world_size:
            parts = math.ceil(MIN_UNITS_PER_RANK * world_size / max(len(groups), 1))
        self.units: list[tuple[int, int, int, int]] = []
        for f, g, rows in groups:
            cuts = np.linspace(0, rows, min(parts, rows) + 1).astype(np.int64)
            self.units += [(f, g, int(a), int(b - a)) for a, b in itertools.pairwise(cuts)]
        self.num_rows = sum(u[3] for u in self.units)

    def _open(self, f: int) -> pq.ParquetFile:
        path = self.files[f]
        if self.filesystem is None:
            return pq.ParquetFile(path)
        return pq.ParquetFile(self.filesystem.open_input_file(str(path)))

    def __len__(self) -> int:
        """Batches per epoch (exact with one reading process and one rank; with several
        ranks, each rank's share of the rows)."""
        rows = self.num_rows / self.world_size
        if self.drop_last:
            return int(rows // self.batch_size)
        return math.ceil(rows / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self, units: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        """This rank's units of the epoch's order: each unit in turn goes to the rank with the
        fewest rows so far (every rank computes the same assignment), so shares differ by at
        most one unit's rows."""
        rows = [0] * self.world_size
        mine = []
        for u in units:
            r = min(range(self.world_size), key=rows.__getitem__)  # ties: the lowest rank
            rows[r] += u[3]
            if r == self.rank:
                mine.append(u)
        return mine

    def __iter__(self) -> Iterator[Any]:
        units = list(self.units)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        if self.world_size > 1:
            units = self._share(units)
        info = get_worker_info()
        if info is not None:
            units = units[info.id :: info.num_workers]
        handles: dict[int, pq.ParquetFile] = {}
        pending: pa.Table | None = None
        bs = self.batch_size
        for k in range(0, len(units), self.buffer_groups):
            parts = []
            for f, g, first, rows in units[k : k + self.buffer_groups]:
                if f not in handles:
                    handles[f] = self._open(f)
                group = handles[f].read_row_group(g, columns=self.columns)
                parts.append(group if rows == group.num_rows else group.slice(first, rows))
            if pending is not None and pending.num_rows:
                parts.insert(0, pending)
            table = pa.concat_tables(parts)
            if self.shuffle:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            n_full = table.num_rows // bs
            for i in range(n_full):
                yield self.convert(table.slice(i * bs, bs))
            pending = table.slice(n_full * bs)
        if pending is not None and pending.num_rows and not self.drop_last:
            yield self.convert(pending)


class ExampleLoader(DataLoader):
    """A DataLoader of ready batches that advances the shuffle epoch on every pass."""

    def __init__(self, dataset: ShardDataset, *, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.shards = dataset
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of `epoch` (for resuming)."""
        self._next_epoch = epoch

    def __iter__(self) -> Any:
        self.shards.set_epoch(self._next_epoch)
        self._next_epoch += 1
        return super().__iter__()


def _features(feat: Features | Path | str) -> Features:
    return feat if isinstance(feat, Features) else Features.open(feat)


_CANDIDATE_COLUMNS = [
    "user_id", "ts", "label", "history", "search", "region", "device", "dense", "example_age",
]  # fmt: skip


def candidate_loader(
    feat: Features | Path | str,
    split: str,
    batch_size: int = 1024,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    buffer_groups: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> ExampleLoader:
    """Batches of candidate-generation examples (`CandidateBatch`) of split train/valid/test.

    Without shuffle the order is the shards' order (that of `seen_items` and
    `read_examples`). rank, world_size: this rank's share (see the module docstring)."""
    f = _features(feat)
    n_dense = len(f.candidate_spec["dense_columns"])
    filesystem, files = f.shard_files("candidates", split)
    ds = ShardDataset(
        files,
        _CANDIDATE_COLUMNS,
        lambda t: to_candidate_batch(t, n_dense),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        buffer_groups=buffer_groups,
        rank=rank,
        world_size=world_size,
        filesystem=filesystem,
    )
    return ExampleLoader(ds, num_workers=num_workers)


def ranking_loader(
    feat: Features | Path | str,
    split: str,
    batch_size: int = 1024,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    buffer_groups: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> ExampleLoader:
    """Batches of ranking examples (`RankingBatch`) of split train/valid/test.

    Without shuffle, the impressions of one request are consecutive and in position order
    (valid/test shards are sorted by user, ts, request, position). rank, world_size: this
    rank's share of the row groups (see the module docstring)."""
    f = _features(feat)
    convert = RankingConverter(f, split)
    filesystem, files = f.shard_files("ranking", split)
    ds = ShardDataset(
        files,
        convert.columns,
        convert,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        buffer_groups=buffer_groups,
        rank=rank,
        world_size=world_size,
        filesystem=filesystem,
    )
    return ExampleLoader(ds, num_workers=num_workers)


def read_examples(
    feat: Features | Path | str,
    stage: Stage,
    split: str,
    columns: list[str] | None = None,
    *,
    limit: int | None = None,
) -> pa.Table:
    """The rows of a split's shards as one Arrow table (in shard order); with `limit`, only
    the first `limit` rows (row groups past them are not read)."""
    f = _features(feat)
    filesystem, files = f.shard_files(stage, split)
    if limit is None:
        return pa.concat_tables(
            [pq.read_table(p, columns=columns, filesystem=filesystem) for p in files]
        )
    parts: list[pa.Table] = []
    got = 0
    for path in files:
        pf = pq.ParquetFile(filesystem.open_input_file(path))
        for g in range(pf.num_row_groups):
            if got >= limit:
                break
            t = pf.read_row_group(g, columns=columns)
            parts.append(t.slice(0, limit - got))
            got += parts[-1].num_rows
        if not parts:  # keep the schema of an empty result
            parts.append(pf.schema_arrow.empty_table().select(columns or pf.schema_arrow.names))
        if got >= limit:
            break
    return pa.concat_tables(parts)


def read_requests(
    feat: Features | Path | str, split: str, columns: list[str] | None = None
) -> pa.Table:
    """The ranking requests of a split (request_id, user_id, ts, history, search): row i is
    the request that impression rows with request_index == i belong to. A build in blocks
    of users writes one file per block (requests-bNNNN.parquet), read in block order."""
    f = _features(feat)
    f.shard_files("ranking", split)  # checks the stage and split exist
    folder = f"{f.uri}/ranking/{split}"
    try:
        filesystem, paths = f.split_files(
            "ranking", split, lambda n: n == REQUESTS or n.startswith("requests-b")
        )
    except ArtifactError:
        raise ArtifactError(f"{folder}: no requests table ({REQUESTS})") from None
    # one table, or one per block of users (never both): block order is name order
    single = [p for p in paths if p.endswith("/" + REQUESTS)]
    paths = single or paths
    try:
        return pa.concat_tables(
            [pq.read_table(p, columns=columns, filesystem=filesystem) for p in paths]
        )
    except (OSError, pa.ArrowInvalid) as e:
        raise ArtifactError(f"{folder}: unreadable requests table ({e})") from None


def seen_items(
    feat: Features | Path | str, split: str, *, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Items each held-out candidate example's user watched before its target.

    Returns (flat item vocabulary ids [N] int64, offsets [E + 1] int64), in the order of
    `candidate_loader(feat, split)` without shuffle: example e's items are
    flat[offsets[e]:offsets[e + 1]], distinct and sorted. The target itself is among them
    when it is a re-watch; an evaluation that excludes seen items must keep the target.
    `limit`: only the first `limit` examples (a large split's lists take gigabytes).
    """
    if split == "train":
        raise ArtifactError("seen_items: only valid and test examples carry seen items")
    table = read_examples(feat, "candidates", split, ["seen"], limit=limit)
    arr = _as_array(table.column("seen"))
    offs = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(arr.values.to_numpy(), dtype=np.int64)[offs[0] : offs[-1]]
    return values, offs - offs[0]
