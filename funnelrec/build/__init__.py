"""Building a features directory: fit the transforms, write both stages' examples.

    build_features(DATA, FEAT, split="last", config=FeaturesConfig())

Small data is read whole and built as one block. Data of more than `block_events` events
is cut into blocks of users (`funnelrec.blocks`) and built in three passes (partition, fit,
write), resumably, in `--workers` processes if asked. What an example holds, and how each
feature is computed, is `funnelrec.examples`; this module runs those functions over the
data and writes the directory that `examples.Features` reads.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import Progress

from funnelrec import __version__
from funnelrec.blocks import (
    EVENT_TABLES,
    BlockPlan,
    BlockTables,
    CountIndex,
    CountsBefore,
    partition,
    plan_blocks,
)
from funnelrec.dataset import AtomicDirectory, Dataset, write_json_atomic
from funnelrec.errors import DataError, FunnelrecError
from funnelrec.examples import (
    CANDIDATE_SCORE,
    CANDIDATE_SOURCE,
    FORMAT_VERSION,
    MANIFEST,
    RANKING_CONTINUOUS,
    REQUESTS,
    SHARD_OPTIONS,
    FeaturesConfig,
    UserEncoder,
    _candidate_positions,
    _candidate_table,
    _CandidateContext,
    _encode_all_users,
    _fit_user_encoder,
    _Items,
    _Log,
    _rank_context,
    _ranking_table,
    _RankingVocabs,
    _read_items,
    _read_log,
    _read_users,
    _request_table,
    _sample_per_user,
    _Users,
)
from funnelrec.normalize import QuantileNormalizer
from funnelrec.progress import progress_bar
from funnelrec.splits import (
    NEVER,
    PART_NAMES,
    TEST,
    TRAIN,
    VALID,
    Split,
    TimeIndex,
    leave_last_out,
    time_boundaries,
    time_split,
)
from funnelrec.vocab import Vocabulary


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


# --------------------------------------------------------------------------- build


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def build_features(
    data: Path | str | Dataset,
    out: Path | str,
    *,
    split: Literal["last", "time"] = "last",
    config: FeaturesConfig | None = None,
    force: bool = False,
    progress: bool = True,
    impressions: pa.Table | None = None,
    workers: int = 1,
) -> Path:
    """Fit transforms on the training part of `data` and write example shards to `out`.

    `impressions` replaces the dataset's impressions table as the source of ranking
    examples, e.g. slates of retrieved candidates for data that has none (issue 7). It has
    the canonical impression columns and may add `cand_score` (float, the candidate
    generator's score: a continuous feature) and `cand_source` (string, which generator
    nominated the item: a categorical feature with its own vocabulary "source").

    Data with more than `config.block_events` events is built in blocks of users (see
    `funnelrec.blocks`), in a folder beside `out` that a later call with the same data and
    config resumes after an interruption. `workers` processes build blocks side by side
    (each holds one block in memory; the examples are the same for any number).
    """
    cfg = config or FeaturesConfig()
    ds = data if isinstance(data, Dataset) else Dataset.open(data)
    if split not in ("last", "time"):
        raise FunnelrecError(f"split must be 'last' or 'time', got '{split}'")
    out = Path(out)
    n_events = sum(ds.num_rows(name) for name in EVENT_TABLES if ds.has(name))
    if impressions is None and n_events > cfg.block_events:
        if out.exists() and not force:
            raise DataError(f"{out} already exists (use --force to overwrite)")
        if workers < 1:
            raise FunnelrecError(f"workers must be >= 1, got {workers}")
        return _BlockedBuild(ds, out, split, cfg, progress, n_events, workers).run(force=force)
    target = AtomicDirectory(out, force=force)
    try:
        manifest = _build_in_memory(ds, target.tmp, split, cfg, progress, impressions)
        write_json_atomic(target.tmp / MANIFEST, manifest)
        target.commit()
    except BaseException:
        target.abort()
        raise
    return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _split(
    log: _Log, kind: str, cfg: FeaturesConfig, bounds: tuple[int, int] | None, whole: bool
) -> Split:
    """The split of one block's watches; `bounds` are the time split's global (t1, t2)."""
    if kind == "last":
        return leave_last_out(log.w_start, log.w_ts, min_watches=cfg.min_watches)
    assert bounds is not None
    return time_split(log.w_start, log.w_ts, bounds[0], bounds[1], require_train=whole)


def _time_bounds(w_ts: np.ndarray, cfg: FeaturesConfig) -> tuple[int, int]:
    t1, t2 = cfg.t1, cfg.t2
    if t1 is None or t2 is None:
        q1, q2 = time_boundaries(w_ts, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac)
        t1, t2 = (q1 if t1 is None else t1), (q2 if t2 is None else t2)
    return int(t1), int(t2)


@dataclass(eq=False)
class _Counts:
    """Training-part counts summed over blocks: what the transforms are fitted from."""

    keys: dict[str, list[Any]] = field(default_factory=dict)
    freq: dict[str, list[np.ndarray]] = field(default_factory=dict)
    train_users: list[np.ndarray] = field(default_factory=list)
    t_min: int | None = None
    t_max: int | None = None
    rank_train_rows: list[int] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)  # per block: per part
    held_out_users: int = 0
    rank_columns: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[_Counts]) -> _Counts:
        """The counts of several blocks, in block order."""
        out = cls()
        for p in parts:
            for name, keys in p.keys.items():
                out.keys.setdefault(name, []).extend(keys)
                out.freq.setdefault(name, []).extend(p.freq[name])
            out.train_users += p.train_users
            if p.t_min is not None and p.t_max is not None:
                out.add_time_range(p.t_min, p.t_max)
            out.rank_train_rows += p.rank_train_rows
            out.requests += p.requests
            out.held_out_users += p.held_out_users
            out.rank_columns = out.rank_columns or p.rank_columns
        return out

    def add_time_range(self, lo: int, hi: int) -> None:
        """Widen the training watches' time range to include [lo, hi]."""
        self.t_min = lo if self.t_min is None else min(self.t_min, lo)
        self.t_max = hi if self.t_max is None else max(self.t_max, hi)

    def add(self, name: str, values: pa.Array | np.ndarray) -> None:
        """Count `values` (nulls ignored) under vocabulary `name`."""
        if isinstance(values, np.ndarray):
            keys, freq = np.unique(values, return_counts=True)
            self.keys.setdefault(name, []).append(keys)
        else:
            vc = pc.value_counts(pc.drop_null(values))
            keys_a = vc.field("values")
            freq = np.asarray(vc.field("counts").to_numpy(), dtype=np.int64)
            self.keys.setdefault(name, []).append(keys_a)
        self.freq.setdefault(name, []).append(np.asarray(freq, dtype=np.int64))

    def vocab(self, name: str, *, max_size: int | None, min_count: int, kind: str) -> Vocabulary:
        keys = self.keys.get(name, [])
        freq = np.concatenate(self.freq[name]) if keys else np.zeros(0, np.int64)
        values: pa.Array | np.ndarray
        if kind == "int":
            values = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        else:
            values = pa.concat_arrays(keys) if keys else pa.array([], type=pa.string())
        return Vocabulary.from_counts(name, values, freq, max_size=max_size, min_count=min_count)


def _count_block(
    log: _Log, sp: Split, cfg: FeaturesConfig, acc: _Counts, cap_seed: int | list[int]
) -> None:
    """Pass 1 over a block: add its training-part counts to `acc`."""
    train_w = sp.part_of_watches(len(log.w_ts)) == TRAIN
    if train_w.any():
        t = log.w_ts[train_w]
        acc.add_time_range(int(t.min()), int(t.max()))
    acc.add("item", log.w_item[train_w])
    s_part = sp.part_of(log.s_user, log.s_ts)
    tok_owner = np.repeat(np.arange(len(log.s_ts)), np.diff(log.s_tok_off))
    train_tok = s_part[tok_owner] == TRAIN if tok_owner.size else np.zeros(0, bool)
    acc.add("token", log.s_tokens.filter(pa.array(train_tok)))
    acc.train_users.append(np.unique(log.w_user[train_w]))
    if sp.kind == "last":
        acc.held_out_users += int((sp.valid_from < NEVER).sum())
    imp = log.imp
    if imp is None:
        return
    acc.rank_columns = imp.column_names
    if not cfg.ranking:
        return
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    i_item = np.asarray(imp.column("item_id").to_numpy(), dtype=np.int64)
    part = sp.part_of(i_user, i_ts)
    train = part == TRAIN
    clicked = np.asarray(imp.column("clicked").to_numpy(zero_copy_only=False), dtype=bool)
    acc.add("rank_item", i_item[train & clicked])
    if log.items.channel is not None:
        ch = log.items.channel[i_item[train]]
        acc.add("channel", ch[ch != 0])
    if log.items.topic is not None:
        acc.add("topic", log.items.topic.take(pa.array(i_item[train])))
    if CANDIDATE_SOURCE in imp.column_names:
        acc.add("source", imp.column(CANDIDATE_SOURCE).combine_chunks().filter(pa.array(train)))
    kept = _ranking_parts(imp, sp, cfg.rank_cap, cap_seed)
    acc.rank_train_rows.append(int((kept == TRAIN).sum()))
    first = _request_starts(imp)
    acc.requests.append([int((kept[first] == p).sum()) for p in (TRAIN, VALID, TEST)])


def _ranking_parts(imp: pa.Table, sp: Split, cap: int | None, seed: int | list[int]) -> np.ndarray:
    """[n] part of each impression; -1 for training impressions left out by `cap` (at most
    `cap` training requests per user, sampled with `seed`, whole pages kept)."""
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    part = sp.part_of(i_user, i_ts)
    if cap is None:
        return part
    first = _request_starts(imp)
    train_req = np.flatnonzero(part[first] == TRAIN)
    keep = train_req[_sample_per_user(i_user[first[train_req]], cap, np.random.default_rng(seed))]
    kept = np.zeros(len(first), dtype=bool)
    kept[keep] = True
    req_of_row = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(i_ts))))
    return np.where((part == TRAIN) & ~kept[req_of_row], np.int8(-1), part).astype(np.int8)


def _request_starts(imp: pa.Table) -> np.ndarray:
    """Row of each request's first impression: runs of one (user, ts, request_id)."""
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    i_req = np.asarray(imp.column("request_id").to_numpy(), dtype=np.int64)
    new_req = np.ones(len(i_ts), dtype=bool)
    new_req[1:] = (i_req[1:] != i_req[:-1]) | (i_user[1:] != i_user[:-1]) | (i_ts[1:] != i_ts[:-1])
    return np.flatnonzero(new_req)


@dataclass(eq=False)
class _Transforms:
    """Everything fitted on the training part of all blocks."""

    item: Vocabulary
    token: Vocabulary
    enc: UserEncoder
    rank: _RankingVocabs | None
    t_min: int
    t_max: int

    def vocabs(self) -> dict[str, Vocabulary]:
        out = {"item": self.item, "token": self.token, "region": self.enc.region}
        out["device"] = self.enc.device
        if self.enc.gender is not None:
            out["gender"] = self.enc.gender
        if self.rank is not None:
            for v in (self.rank.item, self.rank.channel, self.rank.topic, self.rank.source):
                if v is not None:
                    out[v.name] = v
        return out


def _fit_transforms(acc: _Counts, users: _Users, cfg: FeaturesConfig, ranking: bool) -> _Transforms:
    if acc.t_min is None or acc.t_max is None:
        raise DataError("the training part of the split has no watches")
    rank = None
    if ranking:

        def opt(name: str, kind: str, min_count: int) -> Vocabulary | None:
            if name not in acc.keys:
                return None
            return acc.vocab(name, max_size=None, min_count=min_count, kind=kind)

        rank = _RankingVocabs(
            item=acc.vocab(
                "rank_item", max_size=cfg.max_rank_items, min_count=cfg.min_count, kind="int"
            ),
            channel=opt("channel", "int", cfg.min_count),
            topic=opt("topic", "str", cfg.min_count),
            source=opt("source", "str", 1),
        )
    train_users = np.concatenate(acc.train_users) if acc.train_users else np.zeros(0, np.int64)
    return _Transforms(
        item=acc.vocab("item", max_size=cfg.max_items, min_count=cfg.min_count, kind="int"),
        token=acc.vocab("token", max_size=cfg.max_tokens, min_count=cfg.min_count, kind="str"),
        enc=_fit_user_encoder(users, np.sort(train_users), cfg),
        rank=rank,
        t_min=acc.t_min,
        t_max=acc.t_max,
    )


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
    rng = np.random.default_rng(out.rank_seed)
    rows = {
        "train": rng.permutation(np.flatnonzero(part == TRAIN)),
        "valid": np.flatnonzero(part == VALID),
        "test": np.flatnonzero(part == TEST),
    }
    req_first = _request_starts(imp)
    new_req = np.zeros(len(i_ts), dtype=bool)
    new_req[req_first] = True
    req_of_row = np.cumsum(new_req) - 1
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


def _finish(
    root: Path,
    ds: Dataset,
    sp_meta: dict[str, Any],
    cfg: FeaturesConfig,
    tf: _Transforms,
    results: list[_BlockResult],
    rank_columns: list[str],
    has_searches: bool,
    timing: dict[str, Any],
) -> dict[str, Any]:
    """Sum the blocks' results; write the last transforms; return the manifest."""
    tdir = root / "transforms"
    tdir.mkdir(exist_ok=True)
    sums: dict[str, float] = {}
    for res in results:
        for k, v in res.sums.items():
            sums[k] = sums.get(k, 0.0) + v
    counts: dict[str, dict[str, int]] = {"candidates": {}, "ranking": {}}
    for stage in counts:
        for part_name in PART_NAMES:
            n = [r.counts[stage].get(part_name) for r in results]
            if all(x is not None for x in n):
                counts[stage][part_name] = int(sum(x for x in n if x is not None))
    oov: dict[str, dict[str, dict[str, float]]] = {"candidates": {}, "ranking": {}}
    for part_name in PART_NAMES:
        c = f"candidates.{part_name}."
        oov["candidates"][part_name] = {
            "label": _ratio(sums[c + "label_oov"], sums[c + "labels"]),
            "history": _ratio(sums[c + "history_oov"], sums[c + "history_ids"]),
            "search": _ratio(sums[c + "search_oov"], sums[c + "search_ids"]),
        }
    dropped = int(sums["train_dropped_oov"])
    if dropped:
        oov["candidates"]["train"]["label"] = dropped / (dropped + counts["candidates"]["train"])
    label_counts = np.sum([r.label_counts for r in results], axis=0)
    tf.enc.normalizer.save(tdir / "candidates_dense.json")
    pq.write_table(
        pa.table({"id": np.arange(len(tf.item), dtype=np.int64), "count": label_counts}),
        tdir / "item_label_counts.parquet",
    )
    vocabs = tf.vocabs()

    def space(name: str) -> dict[str, Any]:
        v = vocabs[name]
        return {"name": name, "vocab_size": len(v), "dim": cfg.dim(v)}

    candidate_spec = {
        "id_spaces": [space(n) for n in ("item", "token", "region", "device")],
        "categorical": [["region", "region"], ["device", "device"]],
        "bags": [["history", "item"], ["search", "token"]],
        "dense_columns": tf.enc.dense_columns,
        "label": "item",
    }
    ranking: dict[str, Any]
    if not rank_columns:
        ranking = {
            "available": False,
            "reason": "the dataset has no impressions table: ranking examples are made "
            "from retrieved candidates instead (issue 7)",
        }
    elif tf.rank is None:
        ranking = {"available": False, "reason": "ranking=false in the features config"}
    else:
        ranking = _ranking_spec(root, cfg, tf, vocabs, results, rank_columns, has_searches)
        for part_name in PART_NAMES:
            r = f"ranking.{part_name}."
            oov["ranking"][part_name] = {
                "item": _ratio(sums[r + "item_oov"], sums[r + "items"]),
                "history": _ratio(sums[r + "history_oov"], sums[r + "history_ids"]),
            }
    for name, vocab in vocabs.items():
        vocab.save(tdir / f"{name}.parquet")
    for stage, key in (("candidates", "candidate"), ("ranking", "ranking")):
        seconds = sums.get(f"seconds.{stage}", 0.0)
        rows = sum(counts[stage].values())
        timing[f"{key}_examples_per_s"] = rows / seconds if seconds and rows else None
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"funnelrec {__version__}",
        "data": {"path": str(ds.path), "fingerprint": ds.fingerprint()},
        "split": {**sp_meta, "train_time_range": [tf.t_min, tf.t_max]},
        "config": asdict(cfg),
        "counts": counts,
        "dropped_train_examples_oov_label": dropped,
        "oov": oov,
        "vocabularies": {
            name: {"size": len(v), "dim": cfg.dim(v), "file": f"transforms/{name}.parquet"}
            for name, v in vocabs.items()
        },
        "candidates": candidate_spec,
        "ranking": ranking,
        "timing": timing,
    }


def _ranking_spec(
    root: Path,
    cfg: FeaturesConfig,
    tf: _Transforms,
    vocabs: dict[str, Vocabulary],
    results: list[_BlockResult],
    rank_columns: list[str],
    has_searches: bool,
) -> dict[str, Any]:
    """Fit the ranking normaliser on the blocks' samples; the ranking feature spec."""
    assert tf.rank is not None
    raw_names = list(RANKING_CONTINUOUS) + (
        [CANDIDATE_SCORE] if CANDIDATE_SCORE in rank_columns else []
    )
    fit_data = {
        k: np.concatenate([r.samples[k] for r in results if k in r.samples] or [np.zeros(0)])
        for k in raw_names
    }
    normalizer = QuantileNormalizer.fit(
        fit_data,
        n_quantiles=cfg.n_quantiles,
        powers=True,
        nullable=[
            k for k in raw_names if k.endswith("_ago_s") or k in ("item_age_s", "duration_s")
        ],
        max_values=cfg.quantile_sample,
        seed=cfg.seed,
    )
    normalizer.save(root / "transforms" / "ranking_dense.json")

    def space(v: Vocabulary) -> dict[str, Any]:
        return {"name": v.name, "vocab_size": len(v), "dim": cfg.dim(v)}

    rv = tf.rank
    spaces = [space(rv.item)]
    categorical = [["item", "rank_item"], ["seed", "rank_item"]]
    for v in (rv.channel, rv.topic):
        if v is not None:
            spaces.append(space(v))
            categorical.append([v.name, v.name])
    if rv.source is not None:
        spaces.append(space(rv.source))
        categorical.append(["source", "source"])
    for name in ("region", "device"):
        spaces.append(space(vocabs[name]))
        categorical.append([name, name])
    bags = [["history", "rank_item"]]
    if has_searches:
        spaces.append(space(vocabs["token"]))
        bags.append(["search", "token"])
    spec = {
        "id_spaces": spaces,
        "categorical": categorical,
        "bags": bags,
        "dense_columns": normalizer.output_columns,
        "power_columns": normalizer.power_columns,
    }
    return {"available": True, "spec": spec, "raw_continuous": raw_names}


def _split_meta(kind: str, cfg: FeaturesConfig, sp: Split, held_out_users: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "t1": sp.t1,
        "t2": sp.t2,
        "min_watches": cfg.min_watches if kind == "last" else None,
        "held_out_users": held_out_users if kind == "last" else None,
    }


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


def _build_in_memory(
    ds: Dataset,
    root: Path,
    split_kind: str,
    cfg: FeaturesConfig,
    progress: bool,
    impressions: pa.Table | None,
) -> dict[str, Any]:
    """The whole dataset as one block."""
    t_start = time.perf_counter()
    log = _read_log(ds, impressions)
    bounds = _time_bounds(log.w_ts, cfg) if split_kind == "time" else None
    sp = _split(log, split_kind, cfg, bounds, whole=True)
    if not (sp.part_of_watches(len(log.w_ts)) == TRAIN).any():
        raise DataError(f"{ds.path}: the training part of the split has no watches")
    acc = _Counts()
    _count_block(log, sp, cfg, acc, cfg.seed + 2)
    tf = _fit_transforms(acc, log.users, cfg, ranking=log.imp is not None and cfg.ranking)
    by_item = CountIndex.build(log.w_item, log.w_ts)
    with progress_bar("examples", enabled=progress) as bar:
        out = _BlockOut(
            root=root,
            prefix="part-",
            requests=REQUESTS,
            request_offset={},
            quantile_quota=cfg.quantile_sample,
            seed=cfg.seed,
            rank_seed=cfg.seed + 1,
            cap_seed=cfg.seed + 2,
            progress=_Bars(bar, reuse=False),
        )
        res = _write_block(log, sp, tf, by_item, cfg, out)
    timing = {"total_s": time.perf_counter() - t_start, "blocks": 1}
    manifest = _finish(
        root,
        ds,
        _split_meta(split_kind, cfg, sp, acc.held_out_users),
        cfg,
        tf,
        [res],
        acc.rank_columns if log.imp is not None else [],
        bool(log.s_user.size),
        timing,
    )
    if manifest["ranking"].get("available"):
        manifest["ranking"]["impressions"] = "given" if impressions is not None else "dataset"
    return manifest


def _load_transforms(work: Path, fit: dict[str, Any], users: _Users) -> _Transforms:
    tdir = work / "transforms"

    def v(name: str) -> Vocabulary | None:
        return Vocabulary.load(tdir / f"{name}.parquet") if name in fit["vocabs"] else None

    def must(name: str) -> Vocabulary:
        out = v(name)
        assert out is not None
        return out

    enc = UserEncoder(
        region=must("region"),
        device=must("device"),
        gender=v("gender"),
        normalizer=QuantileNormalizer.load(tdir / "candidates_dense.json"),
        has_age=users.age is not None,
        has_logged_in=users.logged_in is not None,
    )
    rank = None
    if fit["ranking"]:
        rank = _RankingVocabs(
            item=must("rank_item"), channel=v("channel"), topic=v("topic"), source=v("source")
        )
    return _Transforms(
        item=must("item"),
        token=must("token"),
        enc=enc,
        rank=rank,
        t_min=int(fit["t_min"]),
        t_max=int(fit["t_max"]),
    )


@dataclass(frozen=True)
class _BlockJob:
    """One block's work, sent to a worker process: paths and settings only."""

    data: Path
    work: Path
    split_kind: str
    cfg: FeaturesConfig
    block: int
    part: dict[str, Any]
    fit: dict[str, Any] | None

    @property
    def blocks(self) -> Path:
        return self.work / "_blocks"


# What a worker reads once and keeps for its next blocks: users, items, transforms, the
# popularity index (memory-mapped: the workers share its pages).
_JOB_CACHE: dict[str, Any] = {}


def _job_inputs(job: _BlockJob) -> tuple[_Users, _Items]:
    key = f"users:{job.work}"
    if key not in _JOB_CACHE:
        _JOB_CACHE.clear()
        ds = Dataset.open(job.data)
        _JOB_CACHE[key] = (
            _read_users(ds, job.part["n_users"]),
            _read_items(ds, job.part["n_items"]),
        )
    users, items = _JOB_CACHE[key]
    return users, items


def _job_log(job: _BlockJob) -> _Log:
    users, items = _job_inputs(job)
    return _read_log(BlockTables(job.blocks, job.block), users=users, items=items)


def _count_block_job(job: _BlockJob) -> _Counts:
    log = _job_log(job)
    bounds = tuple(job.part["bounds"]) if job.part["bounds"] else None
    sp = _split(log, job.split_kind, job.cfg, bounds, whole=False)
    acc = _Counts()
    _count_block(log, sp, job.cfg, acc, [job.cfg.seed, 2, job.block])
    return acc


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def _write_block_job(
    job: _BlockJob, progress: Callable[[str, int], Callable[[int], None]] = _no_progress
) -> int:
    """Write block `job.block`'s examples and save its results; returns the block."""
    fit, b, cfg, work = job.fit, job.block, job.cfg, job.work
    assert fit is not None
    users, _ = _job_inputs(job)
    key = f"fit:{work}"
    if key not in _JOB_CACHE:
        by_item = CountIndex.load(job.blocks / "item_index.npy", job.part["lo"], job.part["span"])
        _JOB_CACHE[key] = (_load_transforms(work, fit, users), by_item)
    tf, by_item = _JOB_CACHE[key]
    _clear_block(work, b)
    log = _job_log(job)
    sp = _split(log, job.split_kind, cfg, fit["bounds"], whole=False)
    offsets = np.cumsum([[0, 0, 0], *fit["requests"]], axis=0)
    total_rank = max(sum(fit["rank_train_rows"]), 1)
    out = _BlockOut(
        root=work,
        prefix=f"part-b{b:04d}-",
        requests=f"requests-b{b:04d}.parquet",
        request_offset={p: int(offsets[b][i]) for i, p in enumerate(PART_NAMES)}
        if fit["requests"]
        else {},
        quantile_quota=math.ceil(cfg.quantile_sample * fit["rank_train_rows"][b] / total_rank)
        if fit["rank_train_rows"]
        else 0,
        seed=[cfg.seed, 0, b],
        rank_seed=[cfg.seed, 1, b],
        cap_seed=[cfg.seed, 2, b],
        progress=progress,
    )
    res = _write_block(log, sp, tf, by_item, cfg, out)
    del log
    _save_result(job.blocks, b, res)
    return b


def _run_parallel(
    fn: Callable[[_BlockJob], Any], jobs: list[_BlockJob], workers: int, done: Callable[..., None]
) -> None:
    """Run `fn` over `jobs` in `workers` processes; `done(block, [result])` as each ends.

    Spawned, not forked: a worker starts without the parent's memory."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, job): job.block for job in jobs}
        try:
            for fut in as_completed(futures):
                result = fut.result()
                if isinstance(result, int):
                    done(result)
                else:
                    done(futures[fut], result)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


class _BlockedBuild:
    """The build over blocks of users (see `funnelrec.blocks`), resumable.

    It works in `.<out>.partial` beside `out`. `progress.json` there records the data's
    fingerprint and the config (a mismatch starts over), whether the partition and the fit
    are done, and which blocks are written; each block's results are kept in `_blocks/`.
    A block interrupted half-way is written again from its start.
    """

    def __init__(
        self,
        ds: Dataset,
        out: Path,
        split_kind: str,
        cfg: FeaturesConfig,
        progress: bool,
        n_events: int,
        workers: int,
    ) -> None:
        self.ds, self.out, self.split_kind, self.cfg = ds, out, split_kind, cfg
        self.workers = workers
        self.show = progress
        self.n_events = n_events
        self.work = out.parent / f".{out.name}.partial"
        self.blocks = self.work / "_blocks"
        self.key = {
            "format_version": FORMAT_VERSION,
            "fingerprint": ds.fingerprint(),
            "split": split_kind,
            "config": asdict(cfg),
        }

    # ---- progress record
    def _load_state(self) -> dict[str, Any]:
        file = self.work / "progress.json"
        if file.exists():
            try:
                state = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
            if state.get("key") == json.loads(json.dumps(self.key)):
                state["resumed"] = True
                if self.show:
                    done = len(state.get("blocks_done", []))
                    print(f"resuming the build in {self.work} ({done} blocks written)")
                return dict(state)
            if self.show:
                print(f"{self.work}: an unfinished build of other data or config; starting over")
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        state = {"key": self.key, "blocks_done": []}
        self._save_state(state)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.work / "progress.json", state)

    def run(self, *, force: bool) -> Path:
        t_start = time.perf_counter()
        state = self._load_state()
        users_t = self.ds.table("users", columns=["user_id"]).column("user_id")
        n_users_table = int(pc.max(users_t).as_py() or 0) if len(users_t) else 0
        with progress_bar("examples", enabled=self.show) as bar:
            if "partition" not in state:
                state["partition"] = self._partition(bar, n_users_table)
                self._save_state(state)
            part = state["partition"]
            plan = BlockPlan(edges=np.asarray(part["edges"], dtype=np.int64))
            users = _read_users(self.ds, part["n_users"])
            if "fit" not in state:
                state["fit"] = self._fit(bar, plan, users, part)
                self._save_state(state)
            fit = state["fit"]
            tf = _load_transforms(self.work, fit, users)
            done = set(state["blocks_done"])
            blocks_task = bar.add_task("blocks written", total=plan.n_blocks, unit="blocks")
            bar.update(blocks_task, completed=len(done))
            todo = [b for b in range(plan.n_blocks) if b not in done]
            bars = _Bars(bar, reuse=True)

            def finished(b: int) -> None:
                state["blocks_done"] = sorted({*state["blocks_done"], b})
                self._save_state(state)
                bar.update(blocks_task, advance=1)

            jobs = [self._job(b, part, fit) for b in todo]
            if self.workers > 1 and len(jobs) > 1:
                _run_parallel(_write_block_job, jobs, self.workers, finished)
            else:
                for job in jobs:
                    bars.prefix = f"block {job.block + 1}/{plan.n_blocks}: "
                    finished(_write_block_job(job, bars))
            _JOB_CACHE.clear()
        results = [self._load_result(b) for b in range(plan.n_blocks)]
        sp_meta = {
            "kind": self.split_kind,
            "t1": fit["bounds"][0] if fit["bounds"] else None,
            "t2": fit["bounds"][1] if fit["bounds"] else None,
            "min_watches": self.cfg.min_watches if self.split_kind == "last" else None,
            "held_out_users": fit["held_out_users"] if self.split_kind == "last" else None,
        }
        timing = {
            "total_s": time.perf_counter() - t_start,
            "blocks": plan.n_blocks,
            "resumed": bool(state.get("resumed")),
        }
        for name in tf.vocabs():  # _finish writes them all again, with the rest
            (self.work / "transforms" / f"{name}.parquet").unlink(missing_ok=True)
        manifest = _finish(
            self.work,
            self.ds,
            sp_meta,
            self.cfg,
            tf,
            results,
            fit["rank_columns"],
            self.ds.has("searches") and self.ds.num_rows("searches") > 0,
            timing,
        )
        if manifest["ranking"].get("available"):
            manifest["ranking"]["impressions"] = "dataset"
        shutil.rmtree(self.blocks)
        (self.work / "progress.json").unlink()
        write_json_atomic(self.work / MANIFEST, manifest)
        _replace_dir(self.work, self.out, force=force)
        return self.out

    # ---- stages
    def _partition(self, bar: Progress, n_users_table: int) -> dict[str, Any]:
        shutil.rmtree(self.blocks, ignore_errors=True)
        plan = plan_blocks(
            n_events=self.n_events, n_users=n_users_table, block_events=self.cfg.block_events
        )
        task = bar.add_task("partition by user", total=self.n_events, unit="events")

        def on_rows(n: int) -> None:
            bar.advance(task, n)

        summary = partition(self.ds, self.blocks, plan, on_rows=on_rows)
        bounds = _time_bounds(summary.watch_ts, self.cfg) if self.split_kind == "time" else None
        index = CountIndex.build(summary.watch_item, summary.watch_ts, consume=True)
        index.save(self.blocks / "item_index.npy")
        return {
            "edges": plan.edges.tolist(),
            "n_users": max(summary.n_users, n_users_table),
            "n_items": summary.n_items,
            "lo": index.lo,
            "span": index.span,
            "bounds": bounds,
            "rows": summary.rows,
        }

    def _job(self, b: int, part: dict[str, Any], fit: dict[str, Any] | None) -> _BlockJob:
        return _BlockJob(
            data=self.ds.path,
            work=self.work,
            split_kind=self.split_kind,
            cfg=self.cfg,
            block=b,
            part=part,
            fit=fit,
        )

    def _fit(
        self, bar: Progress, plan: BlockPlan, users: _Users, part: dict[str, Any]
    ) -> dict[str, Any]:
        task = bar.add_task("fit transforms (blocks)", total=plan.n_blocks, unit="blocks")
        parts: dict[int, _Counts] = {}

        def finished(b: int, counts: _Counts) -> None:
            parts[b] = counts
            bar.update(task, advance=1)

        jobs = [self._job(b, part, None) for b in range(plan.n_blocks)]
        if self.workers > 1 and len(jobs) > 1:
            _run_parallel(_count_block_job, jobs, self.workers, finished)
        else:
            for job in jobs:
                finished(job.block, _count_block_job(job))
        _JOB_CACHE.clear()
        acc = _Counts.merge([parts[b] for b in range(plan.n_blocks)])
        ranking = bool(acc.rank_columns) and self.cfg.ranking
        tf = _fit_transforms(acc, users, self.cfg, ranking=ranking)
        tdir = self.work / "transforms"
        tdir.mkdir(exist_ok=True)
        for name, v in tf.vocabs().items():
            v.save(tdir / f"{name}.parquet")
        tf.enc.normalizer.save(tdir / "candidates_dense.json")
        return {
            "bounds": part["bounds"],
            "t_min": tf.t_min,
            "t_max": tf.t_max,
            "held_out_users": acc.held_out_users,
            "rank_columns": acc.rank_columns,
            "rank_train_rows": acc.rank_train_rows,
            "requests": acc.requests,
            "vocabs": sorted(tf.vocabs()),
            "ranking": ranking,
        }

    def _load_result(self, b: int) -> _BlockResult:
        folder = self.blocks / "results"
        meta = json.loads((folder / f"b{b:04d}.json").read_text())
        with np.load(folder / f"b{b:04d}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return _BlockResult(
            counts=meta["counts"],
            sums=meta["sums"],
            label_counts=arrays.pop("label_counts"),
            samples={k.removeprefix("sample."): a for k, a in arrays.items()},
        )


def _clear_block(work: Path, b: int) -> None:
    """Remove what an interrupted run of block b may have left."""
    for stage in ("candidates", "ranking"):
        for part_name in PART_NAMES:
            folder = work / stage / part_name
            for p in folder.glob(f"part-b{b:04d}-*.parquet"):
                p.unlink()
            (folder / f"requests-b{b:04d}.parquet").unlink(missing_ok=True)


def _save_result(blocks: Path, b: int, res: _BlockResult) -> None:
    folder = blocks / "results"
    folder.mkdir(exist_ok=True)
    arrays = {f"sample.{k}": v for k, v in res.samples.items()}
    arrays["label_counts"] = res.label_counts
    tmp = folder / f"b{b:04d}.tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(folder / f"b{b:04d}.npz")
    write_json_atomic(folder / f"b{b:04d}.json", res.to_json())


def _replace_dir(src: Path, target: Path, *, force: bool) -> None:
    """Rename a finished directory into place (replacing `target` only with force)."""
    if target.exists():
        if not force:
            raise DataError(f"{target} already exists (use --force to overwrite)")
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
