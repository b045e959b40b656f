"""Pass 2 of a build: one block's candidate and ranking examples, written as shards.

`_write_block` writes a block's examples of both stages with the fitted transforms and
returns what the manifest needs from it (`_BlockResult`); `funnelrec.features.finish` sums
those over blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from funnelrec.features import SHARD_OPTIONS, FeaturesConfig
from funnelrec.features.candidate_examples import (
    _candidate_positions,
    _candidate_table,
    _CandidateContext,
)
from funnelrec.features.fit import _ranking_parts, _request_starts, _Transforms
from funnelrec.features.partition import CountsBefore
from funnelrec.features.ranking_examples import (
    _rank_context,
    _ranking_table,
    _RankingVocabs,
    _request_table,
)
from funnelrec.features.splits import PART_NAMES, TEST, TRAIN, VALID, Split, TimeIndex
from funnelrec.features.tables import _Log
from funnelrec.features.transforms import _encode_all_users
from funnelrec.features.update import replay_keep


class _ShardWriter:
    """Rows of one split into part-NNNNN.parquet files of at most `rows_per_shard` rows."""

    def __init__(
        self, folder: Path, rows_per_shard: int, row_group_rows: int, *, prefix: str = "part-"
    ) -> None:
        self.folder = folder
        self.prefix = prefix
        folder.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._shards = 0
        self.schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._in_shard >= self.rows_per_shard:
                self._open(table.schema)
            room = self.rows_per_shard - self._in_shard
            part, table = table.slice(0, room), table.slice(room)
            assert self._writer is not None
            self._writer.write_table(part, row_group_size=self.row_group_rows)
            self._in_shard += part.num_rows
            self.rows += part.num_rows

    def _open(self, schema: pa.Schema) -> None:
        if self._writer is not None:
            self._writer.close()
        self.schema = schema
        path = self.folder / f"{self.prefix}{self._shards:05d}.parquet"
        self._writer = pq.ParquetWriter(path, schema, **SHARD_OPTIONS)
        self._shards += 1
        self._in_shard = 0

    def close(self, empty_schema: pa.Schema) -> None:
        if self._writer is None:
            # An empty split still gets one (empty) file, so readers find its schema.
            self._open(empty_schema)
        assert self._writer is not None
        self._writer.close()
        self._writer = None


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


@dataclass(eq=False)
class _BlockOut:
    """Where one block writes, and what came before it."""

    root: Path
    prefix: str  # shard file names: f"{prefix}{k:05d}.parquet"
    requests: str  # the requests file name in each ranking split folder
    request_offset: dict[str, int]  # requests of earlier blocks, per part
    quantile_quota: int  # training ranking rows to keep for fitting the normaliser
    seed: int | list[int]  # candidate examples' sampling and shuffles
    rank_seed: int | list[int]  # ranking examples' shuffle
    cap_seed: int | list[int]  # ranking requests' sampling (rank_cap; as in the count pass)
    progress: Callable[[str, int], Callable[[int], None]]
    # a features update (`update.py`): training examples before `train_since` are kept
    # with probability `replay`
    train_since: int | None = None
    replay: float = 1.0

    def replay_rng(self, stage: int) -> np.random.Generator:
        """The replay sample's own stream, so a fresh build's draws are unchanged."""
        return np.random.default_rng([*np.atleast_1d(self.seed).tolist(), 0x5EED, stage])


@dataclass(eq=False)
class _BlockResult:
    counts: dict[str, dict[str, int]]
    sums: dict[str, float]  # OOV counts and totals, summed over blocks
    label_counts: np.ndarray
    samples: dict[str, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "sums": self.sums}


def _write_block(
    log: _Log,
    sp: Split,
    tf: _Transforms,
    by_item: CountsBefore,
    cfg: FeaturesConfig,
    out: _BlockOut,
) -> _BlockResult:
    """Pass 2 over a block: write its examples of both stages."""
    item_ids = tf.item.lookup(log.w_item)
    token_ids = tf.token.lookup(log.s_tokens)
    region, device, dense = _encode_all_users(tf.enc, log.users)
    ctx = _CandidateContext(
        log=log,
        split=sp,
        item_ids=item_ids,
        token_ids=token_ids,
        region=region,
        device=device,
        dense=dense,
        item_vocab_size=len(tf.item),
        search_index=TimeIndex(log.s_user, log.s_ts),
        t_min=tf.t_min,
        t_max=tf.t_max,
    )
    rng = np.random.default_rng(out.seed)
    positions = {
        "train": _candidate_positions(ctx, TRAIN, cfg.cap, rng),
        "valid": _candidate_positions(ctx, VALID, cfg.eval_cap if sp.kind == "time" else None, rng),
        "test": _candidate_positions(ctx, TEST, cfg.eval_cap if sp.kind == "time" else None, rng),
    }
    sums: dict[str, float] = {}
    labels = item_ids[positions["train"]]
    sums["train_dropped_oov"] = float((labels == 0).sum())
    positions["train"] = positions["train"][labels != 0]
    if out.train_since is not None:
        pos = positions["train"]
        keep = replay_keep(log.w_ts[pos], out.train_since, out.replay, out.replay_rng(0))
        sums["train_new"] = float((log.w_ts[pos] >= out.train_since).sum())
        sums["train_replayed"] = float(keep.sum()) - sums["train_new"]
        positions["train"] = pos[keep]
    positions["train"] = positions["train"][rng.permutation(len(positions["train"]))]
    label_counts = np.bincount(item_ids[positions["train"]], minlength=len(tf.item))
    counts: dict[str, dict[str, int]] = {"candidates": {}, "ranking": {}}
    t0 = time.perf_counter()
    advance = out.progress("candidate examples", sum(len(p) for p in positions.values()))
    for part_name in PART_NAMES:
        pos = positions[part_name]
        held_out = part_name != "train"
        writer = _ShardWriter(
            out.root / "candidates" / part_name,
            cfg.rows_per_shard,
            cfg.row_group_rows,
            prefix=out.prefix,
        )
        stats = dict.fromkeys(("history_ids", "history_oov", "search_ids", "search_oov"), 0.0)
        schema = None
        for sl in _chunks(len(pos), cfg.chunk_rows):
            table = _candidate_table(
                ctx,
                pos[sl],
                held_out=held_out,
                random_holdout=cfg.labels == "random" and not held_out,
                cfg=cfg,
                rng=rng,
                stats=stats,
            )
            schema = table.schema
            writer.write(table)
            advance(table.num_rows)
        if schema is None:
            schema = _candidate_table(
                ctx,
                pos[:0],
                held_out=held_out,
                random_holdout=False,
                cfg=cfg,
                rng=rng,
                stats=dict(stats),
            ).schema
        writer.close(schema)
        counts["candidates"][part_name] = writer.rows
        for k, v in stats.items():
            sums[f"candidates.{part_name}.{k}"] = v
        sums[f"candidates.{part_name}.labels"] = float(len(pos))
        sums[f"candidates.{part_name}.label_oov"] = float((item_ids[pos] == 0).sum())
    sums["seconds.candidates"] = time.perf_counter() - t0
    samples: dict[str, np.ndarray] = {}
    if log.imp is not None and tf.rank is not None:
        t0 = time.perf_counter()
        counts["ranking"], samples = _write_ranking_block(
            log, ctx, sp, tf.rank, by_item, cfg, out, sums
        )
        sums["seconds.ranking"] = time.perf_counter() - t0
    return _BlockResult(counts=counts, sums=sums, label_counts=label_counts, samples=samples)


def _write_ranking_block(
    log: _Log,
    cand: _CandidateContext,
    sp: Split,
    rv: _RankingVocabs,
    by_item: CountsBefore,
    cfg: FeaturesConfig,
    out: _BlockOut,
    sums: dict[str, float],
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    imp = log.imp
    assert imp is not None
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    part = _ranking_parts(imp, sp, cfg.rank_cap, out.cap_seed)
    ctx = _rank_context(log, rv.item.lookup(log.w_item), cand.token_ids, by_item)
    req_first = _request_starts(imp)
    new_req = np.zeros(len(i_ts), dtype=bool)
    new_req[req_first] = True
    req_of_row = np.cumsum(new_req) - 1
    train = part == TRAIN
    if out.train_since is not None:
        # replayed by whole request: a page's impressions are compared with one another
        keep = replay_keep(i_ts[req_first], out.train_since, out.replay, out.replay_rng(1))
        train &= keep[req_of_row]
    rng = np.random.default_rng(out.rank_seed)
    rows = {
        "train": rng.permutation(np.flatnonzero(train)),
        "valid": np.flatnonzero(part == VALID),
        "test": np.flatnonzero(part == TEST),
    }
    counts: dict[str, int] = {}
    samples: dict[str, list[np.ndarray]] = {}
    sampled = 0
    advance = out.progress("ranking examples", len(i_ts))
    for part_name in PART_NAMES:
        folder = out.root / "ranking" / part_name
        writer = _ShardWriter(folder, cfg.rows_per_shard, cfg.row_group_rows, prefix=out.prefix)
        stats = dict.fromkeys(("history_ids", "history_oov", "items", "item_oov"), 0.0)
        r = rows[part_name]
        in_split = np.zeros(len(req_first), dtype=bool)
        in_split[req_of_row[r]] = True
        reqs = np.flatnonzero(in_split)  # this split's requests, in sorted order
        req_writer = None
        for sl in _chunks(len(reqs), cfg.chunk_rows):
            t = _request_table(ctx, cand, req_first[reqs[sl]], cfg=cfg, stats=stats)
            if req_writer is None:
                req_writer = pq.ParquetWriter(folder / out.requests, t.schema, **SHARD_OPTIONS)
            req_writer.write_table(t, row_group_size=cfg.row_group_rows)
        if req_writer is None:
            t = _request_table(ctx, cand, req_first[:0], cfg=cfg, stats=dict(stats))
            req_writer = pq.ParquetWriter(folder / out.requests, t.schema, **SHARD_OPTIONS)
        req_writer.close()
        schema = None
        offset = out.request_offset.get(part_name, 0)
        for sl in _chunks(len(r), cfg.chunk_rows):
            index = np.searchsorted(reqs, req_of_row[r[sl]]) + offset
            table, raw = _ranking_table(ctx, cand, rv, r[sl], index, stats=stats)
            schema = table.schema
            writer.write(table)
            # Training rows come in random order, so the first ones are a fair sample
            # for fitting the quantiles.
            if part_name == "train" and sampled < out.quantile_quota:
                take = min(out.quantile_quota - sampled, table.num_rows)
                for k, values in raw.items():
                    samples.setdefault(k, []).append(values[:take])
                sampled += take
            advance(table.num_rows)
        if schema is None:
            empty = np.zeros(0, dtype=np.int64)
            schema = _ranking_table(ctx, cand, rv, empty, empty, stats=dict(stats))[0].schema
        writer.close(schema)
        counts[part_name] = writer.rows
        sums[f"ranking.{part_name}.requests"] = float(len(reqs))
        for k, v in stats.items():
            sums[f"ranking.{part_name}.{k}"] = v
    return counts, {k: np.concatenate(v) for k, v in samples.items()}


class _Bars:
    """Progress: one bar per stage (one block), or one reused bar (many blocks)."""

    def __init__(self, bar: Progress, reuse: bool) -> None:
        self.bar = bar
        self.reuse = reuse
        self.task: Any = None
        self.prefix = ""

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        desc = self.prefix + description
        if self.task is None or not self.reuse:
            self.task = self.bar.add_task(desc, total=total)
        else:
            self.bar.reset(self.task, total=total, description=desc)
        task = self.task
        return lambda n: self.bar.advance(task, n)
