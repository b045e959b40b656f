"""Training examples for both stages, built from canonical tables with leak-free splits.

    build_features(DATA, FEAT, split="last", config=FeaturesConfig())
    feats = Features.open(FEAT)          # vocabularies, normalisers, specs, counts
    feats.candidate_batch([[12, 7]], [["funny cats"]], [Demographics(age=31)])  # serving

Layout of a features directory (written atomically: built under a temporary name, renamed):

    FEAT/features.json                       format version, data fingerprint, split and its
                                             boundaries, config, counts, OOV rates, specs
    FEAT/transforms/<vocab>.parquet          item, token, region, device, gender,
                                             rank_item, channel, topic (see `vocab`)
    FEAT/transforms/candidates_dense.json    quantile normaliser of the user's age
    FEAT/transforms/ranking_dense.json       quantile normaliser of the ranking features
    FEAT/transforms/item_label_counts.parquet  training label count per item vocabulary id
    FEAT/candidates/{train,valid,test}/part-NNNNN.parquet
    FEAT/ranking/{train,valid,test}/part-NNNNN.parquet   one row per impression (when the
                                             data has impressions)
    FEAT/ranking/{train,valid,test}/requests.parquet     the bags of each request

Candidate-generation examples (SPEC 2, 2.1, 2.2). For a label watch of user u at time t
(every watch, whatever its source):
- history: item ids of the last `history_n` watches before it (watch order: ts, then row
  order), OOV ids left out of the bag;
- search: tokens (unigrams + bigrams) of the last `search_n` queries with ts < t, a bag;
- region, device: vocabulary ids; dense: see `CANDIDATE_DENSE` below;
- example_age: (t_max - t) / (t_max - t_min) over the training watches' time range, in
  [0, 1]; 0 for validation and test examples, which stand for serving time;
- label: the item's vocabulary id. A training example whose label fell out of a truncated
  vocabulary is dropped (counted in the manifest); held-out ones keep label 0 (a miss).
Training labels: at most `cap` per user (None: all), sampled with `seed` from the user's
training watches. `labels="random"` is the ablation of SPEC 2.2: the label is a random
training watch and the history the `history_n` training watches around it (both sides).
Held-out examples: leave-last-out gives one validation (second-to-last watch) and one test
(last watch) example per user, history = everything before the target (for the test target
that includes the validation watch). The time split takes up to `eval_cap` watches per user
from each held-out window, history = everything before each.
Valid/test shards also carry `seen`: the distinct item vocabulary ids the user watched
before the target (for "exclude already watched" in evaluation; see `loader.seen_items`).

Ranking examples (SPEC 3), one per impression, when the data has impressions:
- categorical: item (impression item), seed (the last watch before the request), both in
  the `rank_item` vocabulary (fitted on clicked training impressions), channel, topic,
  region, device;
- bags: history (last `history_n` watched items, `rank_item` vocabulary), search tokens;
  the same for every impression of a request, so stored once per request in
  requests.parquet; an impression row points at its request by `request_index`;
- continuous (raw in the shards, quantile-normalised by the loader into x, x^2, sqrt(x) and
  missing flags): see `RANKING_CONTINUOUS`;
- label = clicked, watch_time = seconds watched; request_id and user_id are kept.
Every feature uses events strictly before the impression's ts, computed with sorting and
searchsorted (`splits.TimeIndex`), never a Python loop per impression.

Fitted on the training part only: every vocabulary, both normalisers, the item counts that
the candidate model's negative sampler uses, and example_age's time range.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from funnelrec import __version__
from funnelrec.batch import CandidateBatch
from funnelrec.blocks import (
    EVENT_TABLES,
    BlockPlan,
    BlockTables,
    CountIndex,
    CountsBefore,
    EventTables,
    partition,
    plan_blocks,
)
from funnelrec.dataset import AtomicDirectory, Dataset, write_json_atomic
from funnelrec.errors import ArtifactError, DataError, FunnelrecError
from funnelrec.normalize import QuantileNormalizer
from funnelrec.schema import validate_table
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
    user_offsets,
)
from funnelrec.tokenize import tokenize_array
from funnelrec.vocab import Vocabulary, embedding_dim

FORMAT_VERSION = 1
MANIFEST = "features.json"
REQUESTS = "requests.parquet"  # per split: the query-side bags of each ranking request
# Example shards: zstd without dictionary pages or statistics writes ~1.5x faster than
# Arrow's defaults and is no larger (ids and floats rarely repeat within a page).
SHARD_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "write_statistics": False,
}

# Candidate dense columns, in order, for the user columns the data has:
#   age, age_missing            age quantile-normalised to [0, 1) (training users), flag
#   logged_in, logged_in_missing  1.0 / 0.0, flag
#   gender=<v> ..., gender_missing  one-hot over the gender vocabulary, flag
CANDIDATE_DENSE = ("age", "logged_in", "gender")

# Ranking continuous features (raw values; NaN = missing), all from events before ts:
RANKING_CONTINUOUS = (
    "user_prior_watches",  # watches of the user so far
    "user_last_watch_ago_s",  # seconds since the user's last watch
    "channel_watches",  # the user's watches from the item's channel (SPEC 3)
    "channel_last_watch_ago_s",  # seconds since the user last watched this channel
    "topic_watches",  # the user's watches of the item's topic
    "topic_last_watch_ago_s",  # seconds since the user last watched this topic (SPEC 3)
    "item_watched_before",  # times the user already watched this item
    "item_shown_before",  # times the item was already shown to the user (churn, SPEC 3)
    "item_last_shown_ago_s",  # seconds since it was last shown to the user
    "item_prior_watches",  # the item's watches by everyone so far (popularity)
    "item_age_s",  # seconds since upload
    "duration_s",  # the item's duration
)
# Optional impression columns (from a candidate generator) that become features when present.
CANDIDATE_SCORE, CANDIDATE_SOURCE = "cand_score", "cand_source"


@dataclass(frozen=True)
class FeaturesConfig:
    """How examples are built. Every default is the paper's choice unless said otherwise.

    history_n:      last N watched items in a history bag [paper: 50]
    search_n:       last N queries whose tokens form the search bag [paper: 50]
    cap:            training examples per user, sampled from their watches (None = all)
    rank_cap:       training ranking requests (pages, with all their impressions) per user,
                    sampled (None = all); held-out requests are all kept
    eval_cap:       time split: held-out examples per user and window (None = all)
    labels:         "next" (predict the next watch, the paper) or "random" (ablation)
    seed:           sampling of capped examples and the shuffle of training rows
    min_watches:    leave-last-out: users with fewer watches hold nothing out
    valid_frac, test_frac: time split: share of watches after t1 / t2 when t1, t2 unset
    t1, t2:         time split boundaries (timestamps); None = from the fractions
    max_items, max_tokens, max_rank_items: vocabulary truncation (top N; None = all seen)
    min_count:      drop vocabulary values seen fewer times in training
    n_quantiles:    knots of the quantile normalisers [~1,000]
    quantile_sample: normalisers are fitted on at most this many training values
    ranking:        build ranking examples when the data has impressions
    emb_scale, emb_min, emb_max: embedding width rule (see `vocab.embedding_dim`)
    dims:           per-vocabulary width overrides, e.g. "item=64,topic=8"
    chunk_rows:     examples built at once (bounds memory)
    rows_per_shard: rows per Parquet file
    row_group_rows: rows per Parquet row group (the loader's unit of reading and shuffling)
    block_events:   data with more events (watches + searches + impressions) is built in
                    blocks of users of about this many events each: bounds memory (see
                    `funnelrec.blocks`); a block needs ~0.15 GiB per million events
    """

    history_n: int = 50
    search_n: int = 50
    cap: int | None = 30
    rank_cap: int | None = None
    eval_cap: int | None = 30
    labels: Literal["next", "random"] = "next"
    seed: int = 0
    min_watches: int = 3
    valid_frac: float = 0.1
    test_frac: float = 0.1
    t1: int | None = None
    t2: int | None = None
    max_items: int | None = None
    max_tokens: int | None = None
    max_rank_items: int | None = None
    min_count: int = 1
    n_quantiles: int = 1000
    quantile_sample: int = 1_000_000
    ranking: bool = True
    emb_scale: float = 1.6
    emb_min: int = 4
    emb_max: int = 64
    dims: str = ""
    chunk_rows: int = 200_000
    rows_per_shard: int = 2_000_000
    row_group_rows: int = 65_536
    block_events: int = 50_000_000

    def __post_init__(self) -> None:
        for name in (
            "history_n",
            "search_n",
            "chunk_rows",
            "rows_per_shard",
            "row_group_rows",
            "block_events",
        ):
            if getattr(self, name) < 1:
                raise FunnelrecError(f"features config: {name} must be >= 1")
        for name in ("cap", "eval_cap", "rank_cap"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FunnelrecError(f"features config: {name} must be >= 1 or none, got {v}")
        if self.labels not in ("next", "random"):
            raise FunnelrecError(
                f"features config: labels must be next or random, got {self.labels}"
            )
        self.dim_overrides()  # validate early

    def dim_overrides(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.dims.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit() or int(value) < 1:
                raise FunnelrecError(
                    f"features config: dims entry '{part}' is not of the form name=width"
                )
            out[name.strip()] = int(value)
        return out

    def dim(self, vocab: Vocabulary) -> int:
        override = self.dim_overrides().get(vocab.name)
        if override is not None:
            return override
        return embedding_dim(
            len(vocab), scale=self.emb_scale, minimum=self.emb_min, maximum=self.emb_max
        )


# --------------------------------------------------------------------------- reading data


@dataclass(eq=False)
class _Users:
    """Per-user columns indexed by dataset user id (row 0 unused); raw values."""

    n: int
    age: np.ndarray | None  # float64, NaN missing
    logged_in: np.ndarray | None  # float64 1/0, NaN missing
    gender: pa.Array | None  # string, null missing
    region: pa.Array | None
    device: pa.Array | None


@dataclass(eq=False)
class _Items:
    """Per-item columns indexed by dataset item id (row 0 unused)."""

    n: int
    upload_ts: np.ndarray | None  # float64, NaN missing
    duration: np.ndarray | None
    channel: np.ndarray | None  # int64, 0 missing
    topic_code: np.ndarray | None  # int64 dense code of the topic string, 0 missing
    topic: pa.Array | None  # raw topic string per item id, null missing


def _by_id(ids: np.ndarray, n: int, values: np.ndarray, fill: Any) -> np.ndarray:
    out = np.full(n + 1, fill, dtype=values.dtype)
    out[ids] = values
    return out


def _arrow_by_id(ids: np.ndarray, n: int, values: pa.Array) -> pa.Array:
    index = np.full(n + 1, -1, dtype=np.int64)
    index[ids] = np.arange(len(ids))
    mask = index < 0
    return values.take(pa.array(np.where(mask, 0, index), mask=mask))


def _float_col(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name).cast(pa.float64())
    return np.asarray(pc.fill_null(col, np.nan).to_numpy(), dtype=np.float64)


def _read_users(ds: Dataset, n_min: int) -> _Users:
    t = ds.table("users")
    ids = t.column("user_id").to_numpy()
    n = max(int(ids.max()) if len(ids) else 0, n_min)
    age = _float_col(t, "age")
    logged = _float_col(t, "logged_in")

    def s(name: str) -> pa.Array | None:
        if name not in t.column_names:
            return None
        return _arrow_by_id(ids, n, t.column(name).combine_chunks())

    return _Users(
        n=n,
        age=None if age is None else _by_id(ids, n, age, np.nan),
        logged_in=None if logged is None else _by_id(ids, n, logged, np.nan),
        gender=s("gender"),
        region=s("region"),
        device=s("device"),
    )


def _read_items(ds: Dataset, n_min: int) -> _Items:
    t = ds.table("items")
    ids = t.column("item_id").to_numpy()
    n = max(int(ids.max()) if len(ids) else 0, n_min)
    upload = _float_col(t, "upload_ts")
    duration = _float_col(t, "duration_s")
    channel = None
    if "channel_id" in t.column_names:
        ch = np.asarray(pc.fill_null(t.column("channel_id"), 0).to_numpy(), dtype=np.int64)
        channel = _by_id(ids, n, ch, 0)
    topic_code = topic = None
    if "topic" in t.column_names:
        topic = _arrow_by_id(ids, n, t.column("topic").combine_chunks())
        enc = pc.dictionary_encode(topic)
        codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False))
        topic_code = codes.astype(np.int64) + 1
    return _Items(
        n=n,
        upload_ts=None if upload is None else _by_id(ids, n, upload, np.nan),
        duration=None if duration is None else _by_id(ids, n, duration, np.nan),
        channel=channel,
        topic_code=topic_code,
        topic=topic,
    )


@dataclass(eq=False)
class _Log:
    """The event tables, sorted by (user, ts) with ties in row order."""

    users: _Users
    items: _Items
    w_user: np.ndarray
    w_item: np.ndarray
    w_ts: np.ndarray
    w_start: np.ndarray  # [U + 2] user offsets into the watches
    s_user: np.ndarray
    s_ts: np.ndarray
    s_tokens: pa.Array  # flat token strings of all queries, in sorted query order
    s_tok_off: np.ndarray  # [Q + 1]
    s_start: np.ndarray  # [U + 2]
    imp: pa.Table | None  # sorted by (user, ts, request_id, position)


def _sort_by_user_ts(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    return np.lexsort((ts, user))  # stable: equal (user, ts) keep row order


def _check_impressions(table: pa.Table) -> pa.Table:
    """Impressions given by the caller: the canonical columns (validated as the dataset's
    would be) plus the optional candidate-generation columns."""
    extra = [c for c in (CANDIDATE_SCORE, CANDIDATE_SOURCE) if c in table.column_names]
    canonical = validate_table(
        "impressions", table.drop_columns(extra), where="impressions given to build_features"
    )
    for name, type_ in ((CANDIDATE_SCORE, pa.float64()), (CANDIDATE_SOURCE, pa.string())):
        if name in extra:
            try:
                canonical = canonical.append_column(name, table.column(name).cast(type_))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(
                    f"impressions: column '{name}' must be of type {type_}", column=name
                ) from None
    return canonical


def _read_log(
    ds: EventTables,
    impressions: pa.Table | None = None,
    *,
    users: _Users | None = None,
    items: _Items | None = None,
) -> _Log:
    """The events of `ds` sorted by (user, ts). `users` and `items`, when given, are used
    as they are (one block of a larger dataset: sized for all its ids); otherwise they are
    read from `ds` (a Dataset), sized for the largest id of its tables and events."""
    w = ds.table("watches", columns=["user_id", "item_id", "ts"])
    if w.num_rows == 0 and users is None:
        raise DataError(f"{ds.path}: the watches table is empty")
    w_user = np.asarray(w.column("user_id").to_numpy(), dtype=np.int64)
    w_ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
    w_item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)
    order = _sort_by_user_ts(w_user, w_ts)
    w_user, w_item, w_ts = w_user[order], w_item[order], w_ts[order]
    del w

    if ds.has("searches") and ds.num_rows("searches") > 0:
        s = ds.table("searches")
        s_user = np.asarray(s.column("user_id").to_numpy(), dtype=np.int64)
        s_ts = np.asarray(s.column("ts").to_numpy(), dtype=np.int64)
        order = _sort_by_user_ts(s_user, s_ts)
        s_user, s_ts = s_user[order], s_ts[order]
        tokens, tok_off = tokenize_array(s.column("query").take(pa.array(order)))
    else:
        s_user = s_ts = np.zeros(0, dtype=np.int64)
        tokens, tok_off = pa.array([], type=pa.string()), np.zeros(1, dtype=np.int64)

    imp = None
    if impressions is not None:
        imp = _check_impressions(impressions) if impressions.num_rows else None
    elif ds.has("impressions") and ds.num_rows("impressions") > 0:
        imp = ds.table("impressions")
    if imp is not None:
        order = np.lexsort(
            (
                imp.column("position").to_numpy(),
                imp.column("request_id").to_numpy(),
                imp.column("ts").to_numpy(),
                imp.column("user_id").to_numpy(),
            )
        )
        imp = imp.take(pa.array(order))

    if users is None or items is None:
        assert isinstance(ds, Dataset)
        n_users = int(max(w_user.max(), s_user.max() if s_user.size else 0))
        if imp is not None:
            n_users = max(n_users, int(pc.max(imp.column("user_id")).as_py()))
        users = _read_users(ds, n_users)
        n_items = int(w_item.max())
        if imp is not None:
            n_items = max(n_items, int(pc.max(imp.column("item_id")).as_py()))
        items = _read_items(ds, n_items)
    return _Log(
        users=users,
        items=items,
        w_user=w_user,
        w_item=w_item,
        w_ts=w_ts,
        w_start=user_offsets(w_user, users.n),
        s_user=s_user,
        s_ts=s_ts,
        s_tokens=tokens,
        s_tok_off=tok_off,
        s_start=user_offsets(s_user, users.n),
        imp=imp,
    )


# --------------------------------------------------------------------------- vectorised helpers


def gather_ranges(
    values: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate values[starts[i]:ends[i]] for all i: (flat [sum len], offsets [B + 1])."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.maximum(np.asarray(ends, dtype=np.int64) - starts, 0)
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
    return values[idx], offsets


def drop_zeros(flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove id 0 (OOV / padding) from bags given as flat ids + offsets [B + 1]."""
    keep = flat != 0
    if keep.all():
        return flat, offsets
    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    return flat[keep], kept[offsets]


def _list_array(flat: np.ndarray, offsets: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=type_))


def _sample_per_user(user: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices into `user` (grouped by user) keeping at most `cap` random ones per user."""
    n = len(user)
    if cap is None:
        return np.arange(n)
    key = rng.random(n)
    order = np.lexsort((key, user))
    u_sorted = user[order]
    first = np.searchsorted(u_sorted, u_sorted, side="left")
    rank = np.arange(n) - first
    return np.sort(order[rank < cap])


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


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


# --------------------------------------------------------------------------- transforms


@dataclass(eq=False)
class UserEncoder:
    """Demographics -> (region ids, device ids, dense [B, F]) with fitted transforms."""

    region: Vocabulary
    device: Vocabulary
    gender: Vocabulary | None
    normalizer: QuantileNormalizer  # age (no powers); may have no columns
    has_age: bool
    has_logged_in: bool

    @property
    def dense_columns(self) -> list[str]:
        cols: list[str] = []
        if self.has_age:
            cols += self.normalizer.output_columns
        if self.has_logged_in:
            cols += ["logged_in", "logged_in_missing"]
        if self.gender is not None:
            cols += [f"gender={v}" for v in self.gender.values] + ["gender_missing"]
        return cols

    def encode(
        self,
        *,
        age: np.ndarray | None,
        logged_in: np.ndarray | None,
        gender: pa.Array | None,
        region: pa.Array | None,
        device: pa.Array | None,
        n: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n] region ids, [n] device ids, [n, F] float32 dense."""
        parts = []
        if self.has_age:
            a = age if age is not None else np.full(n, np.nan)
            parts.append(self.normalizer.transform({"age": a}))
        if self.has_logged_in:
            li = logged_in if logged_in is not None else np.full(n, np.nan)
            miss = np.isnan(li)
            parts.append(np.stack([np.where(miss, 0.0, li), miss], axis=1).astype(np.float32))
        if self.gender is not None:
            g = gender if gender is not None else pa.nulls(n, pa.string())
            gid = self.gender.lookup(g)
            onehot = np.zeros((n, len(self.gender)), dtype=np.float32)
            onehot[np.arange(n), gid] = 1.0
            missing = np.asarray(pc.is_null(g).to_numpy(zero_copy_only=False), dtype=np.float32)
            # Column 0 of the one-hot is "gender not in vocabulary": it is not emitted.
            parts.append(np.concatenate([onehot[:, 1:], missing[:, None]], axis=1))
        dense = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)
        r = self.region.lookup(region) if region is not None else np.zeros(n, np.int32)
        d = self.device.lookup(device) if device is not None else np.zeros(n, np.int32)
        return r, d, dense.astype(np.float32)


def _fit_user_encoder(users: _Users, train_users: np.ndarray, cfg: FeaturesConfig) -> UserEncoder:
    def col(a: pa.Array | None) -> pa.Array:
        return a.take(pa.array(train_users)) if a is not None else pa.nulls(0, pa.string())

    region = Vocabulary.fit("region", col(users.region), min_count=cfg.min_count)
    device = Vocabulary.fit("device", col(users.device), min_count=cfg.min_count)
    gender = (
        Vocabulary.fit("gender", col(users.gender), max_size=16, min_count=cfg.min_count)
        if users.gender is not None
        else None
    )
    ages = {"age": users.age[train_users]} if users.age is not None else {}
    normalizer = QuantileNormalizer.fit(
        ages,
        n_quantiles=cfg.n_quantiles,
        powers=False,
        nullable=("age",),
        max_values=cfg.quantile_sample,
        seed=cfg.seed,
    )
    return UserEncoder(
        region=region,
        device=device,
        gender=gender,
        normalizer=normalizer,
        has_age=users.age is not None,
        has_logged_in=users.logged_in is not None,
    )


def _encode_all_users(enc: UserEncoder, users: _Users) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return enc.encode(
        age=users.age,
        logged_in=users.logged_in,
        gender=users.gender,
        region=users.region,
        device=users.device,
        n=users.n + 1,
    )


# --------------------------------------------------------------------------- candidate examples


@dataclass(eq=False)
class _CandidateContext:
    log: _Log
    split: Split
    item_ids: np.ndarray  # [W] item vocabulary id of each sorted watch
    token_ids: np.ndarray  # [T] token vocabulary id of each flat query token
    region: np.ndarray  # [U + 1] per user id
    device: np.ndarray
    dense: np.ndarray  # [U + 1, F]
    item_vocab_size: int
    search_index: TimeIndex  # searches by (user, ts)
    t_min: int
    t_max: int


def _search_bags(
    ctx: _CandidateContext, user: np.ndarray, before_ts: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the last n queries of each user with ts < before_ts (flat, offsets)."""
    log = ctx.log
    if log.s_user.size == 0:
        return np.zeros(0, np.int32), np.zeros(len(user) + 1, np.int64)
    # Searches are already sorted by (user, ts), so the index's positions are theirs.
    start, end = ctx.search_index.before(user, before_ts)
    lo = np.maximum(start, end - n)
    return gather_ranges(ctx.token_ids, log.s_tok_off[lo], log.s_tok_off[end])


def _candidate_table(
    ctx: _CandidateContext,
    pos: np.ndarray,
    *,
    held_out: bool,
    random_holdout: bool,
    cfg: FeaturesConfig,
    rng: np.random.Generator,
    stats: dict[str, float],
) -> pa.Table:
    """Examples labelled by sorted watch positions `pos` (all one part)."""
    log = ctx.log
    n = cfg.history_n
    user = log.w_user[pos]
    t = log.w_ts[pos]
    us = log.w_start[user]
    if random_holdout:
        # A window of n + 1 training watches containing the label, then the label removed.
        te = ctx.split.train_end[user]
        lo = np.clip(pos - n // 2, us, np.maximum(us, te - (n + 1)))
        hi = np.minimum(lo + n + 1, te)
        idx, off = gather_ranges(np.arange(len(log.w_ts), dtype=np.int64), lo, hi)
        owner = np.repeat(np.arange(len(pos)), np.diff(off))
        keep = idx != pos[owner]
        hist, hist_off = (
            ctx.item_ids[idx[keep]],
            np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(pos)))]),
        )
        # Searches up to the last watch of the window (strictly before the boundary).
        last = hi - 1
        search_before = np.where(last > pos, log.w_ts[last] + 1, t)
        search_before = np.minimum(search_before, ctx.split.valid_from[user])
    else:
        hist, hist_off = gather_ranges(ctx.item_ids, np.maximum(us, pos - n), pos)
        search_before = t
    stats["history_ids"] += hist.size
    stats["history_oov"] += int((hist == 0).sum())
    hist, hist_off = drop_zeros(hist, hist_off)
    toks, tok_off = _search_bags(ctx, user, search_before, cfg.search_n)
    stats["search_ids"] += toks.size
    stats["search_oov"] += int((toks == 0).sum())
    toks, tok_off = drop_zeros(toks, tok_off)
    label = ctx.item_ids[pos]
    if held_out:
        age = np.zeros(len(pos), dtype=np.float32)
    else:
        span = max(ctx.t_max - ctx.t_min, 1)
        age = np.clip((ctx.t_max - t) / span, 0.0, 1.0).astype(np.float32)
    dense = ctx.dense[user]
    f = dense.shape[1]
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(user),
        "ts": pa.array(t),
        "item_id": pa.array(log.w_item[pos]),
        "label": pa.array(label, type=pa.int32()),
        "history": _list_array(hist, hist_off, pa.int32()),
        "search": _list_array(toks, tok_off, pa.int32()),
        "region": pa.array(ctx.region[user], type=pa.int32()),
        "device": pa.array(ctx.device[user], type=pa.int32()),
        "dense": _list_array(
            dense.reshape(-1), np.arange(len(pos) + 1, dtype=np.int64) * f, pa.float32()
        ),
        "example_age": pa.array(age, type=pa.float32()),
    }
    if held_out:
        seen, seen_off = gather_ranges(ctx.item_ids, us, pos)
        owner = np.repeat(np.arange(len(pos), dtype=np.int64), np.diff(seen_off))
        vocab_n = ctx.item_vocab_size
        keyed = np.sort(owner * vocab_n + seen)  # distinct (example, item) pairs, sorted
        keyed = keyed[np.concatenate([[True], keyed[1:] != keyed[:-1]])]
        ids = keyed % vocab_n
        own = keyed // vocab_n
        keep = ids != 0
        ids, own = ids[keep], own[keep]
        seen_off = np.concatenate([[0], np.cumsum(np.bincount(own, minlength=len(pos)))])
        cols["seen"] = _list_array(ids.astype(np.int32), seen_off, pa.int32())
    table = pa.table(cols)
    if not held_out:
        table = table.take(pa.array(rng.permutation(table.num_rows)))
    return table


def _candidate_positions(
    ctx: _CandidateContext, part: int, cap: int | None, rng: np.random.Generator
) -> np.ndarray:
    split = ctx.split
    n_w = len(ctx.log.w_ts)
    users = np.arange(len(split.train_end))
    if part == TRAIN:
        lo, hi = split.user_start[:-1], split.train_end
    elif part == VALID:
        lo, hi = split.train_end, split.valid_end
    else:
        lo, hi = split.valid_end, split.user_start[1:]
    pos, off = gather_ranges(np.arange(n_w, dtype=np.int64), lo, hi)
    owner = np.repeat(users, np.diff(off))
    return pos[_sample_per_user(owner, cap, rng)]


# --------------------------------------------------------------------------- ranking examples


@dataclass(eq=False)
class _RankingContext:
    """Time indexes over all events, for features "before ts" of any impression."""

    log: _Log
    rank_ids: np.ndarray  # [W] rank_item vocabulary id of each sorted watch
    token_ids: np.ndarray
    by_user: TimeIndex  # watches by user (positions = sorted watch positions)
    by_user_channel: TimeIndex | None
    by_user_topic: TimeIndex | None
    by_user_item: TimeIndex
    by_item: CountsBefore  # every user's watches of an item before t (popularity)
    shown: TimeIndex  # impressions by (user, item)
    n_items: int
    n_channels: int
    n_topics: int


def _channel_code(log: _Log) -> tuple[np.ndarray | None, int]:
    """Per item id: a dense code of its channel (0 = none), and the number of codes."""
    ch = log.items.channel
    if ch is None:
        return None, 0
    uniq, code = np.unique(ch, return_inverse=True)
    code = code.astype(np.int64)
    if uniq[0] == 0:
        return code, len(uniq)
    return code + 1, len(uniq) + 1


def _rank_context(
    log: _Log, rank_ids: np.ndarray, token_ids: np.ndarray, by_item: CountsBefore
) -> _RankingContext:
    assert log.imp is not None
    ch_code, n_ch = _channel_code(log)
    n_items = log.items.n + 1
    by_user_channel = by_user_topic = None
    if ch_code is not None:
        wc = ch_code[log.w_item]
        m = wc > 0
        by_user_channel = TimeIndex(log.w_user[m] * (n_ch + 1) + wc[m], log.w_ts[m])
    n_topics = 0
    if log.items.topic_code is not None:
        n_topics = int(log.items.topic_code.max()) + 1
        wt = log.items.topic_code[log.w_item]
        m = wt > 0
        by_user_topic = TimeIndex(log.w_user[m] * (n_topics + 1) + wt[m], log.w_ts[m])
    i_user = np.asarray(log.imp.column("user_id").to_numpy(), dtype=np.int64)
    i_item = np.asarray(log.imp.column("item_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(log.imp.column("ts").to_numpy(), dtype=np.int64)
    return _RankingContext(
        log=log,
        rank_ids=rank_ids,
        token_ids=token_ids,
        by_user=TimeIndex(log.w_user, log.w_ts),
        by_user_channel=by_user_channel,
        by_user_topic=by_user_topic,
        by_user_item=TimeIndex(log.w_user * n_items + log.w_item, log.w_ts),
        by_item=by_item,
        shown=TimeIndex(i_user * n_items + i_item, i_ts),
        n_items=n_items,
        n_channels=n_ch,
        n_topics=n_topics,
    )


def _count_and_ago(
    index: TimeIndex | None,
    group: np.ndarray,
    ts: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    sort_queries: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Events of each query's group before ts: count and seconds since the latest (NaN).

    Queries come sorted by (user, ts), so groups that start with the user are already in
    near order; for the item alone, and for the (large) impression index, sorting the
    queries first measured faster."""
    if index is None:
        nan = np.full(len(ts), np.nan)
        return nan, nan.copy()
    start, end = index.before(group, ts, sort_queries=sort_queries)
    count = (end - start).astype(np.float64)
    last = index.ts[np.maximum(end - 1, 0)] if len(index.ts) else np.zeros(len(ts), np.int64)
    ago = np.where(count > 0, (ts - last).astype(np.float64), np.nan)
    if valid is not None:
        count = np.where(valid, count, np.nan)
        ago = np.where(valid, ago, np.nan)
    return count, ago


def _ranking_raw(
    ctx: _RankingContext, user: np.ndarray, item: np.ndarray, ts: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Raw continuous features (RANKING_CONTINUOUS) of impressions sorted by (user, ts),
    plus the [start, end) positions of each user's watches before ts (for the seed item)."""
    log, items = ctx.log, ctx.log.items
    out: dict[str, np.ndarray] = {}
    start, end = ctx.by_user.before(user, ts, sort_queries=False)
    out["user_prior_watches"] = (end - start).astype(np.float64)
    last = log.w_ts[np.maximum(end - 1, 0)]
    out["user_last_watch_ago_s"] = np.where(end > start, (ts - last).astype(np.float64), np.nan)
    ch_code, n_ch = _channel_code(log)
    if ch_code is not None:
        c = ch_code[item]
        out["channel_watches"], out["channel_last_watch_ago_s"] = _count_and_ago(
            ctx.by_user_channel, user * (n_ch + 1) + c, ts, valid=c > 0
        )
    else:
        out["channel_watches"], out["channel_last_watch_ago_s"] = _count_and_ago(None, user, ts)
    if items.topic_code is not None:
        tc = items.topic_code[item]
        out["topic_watches"], out["topic_last_watch_ago_s"] = _count_and_ago(
            ctx.by_user_topic, user * (ctx.n_topics + 1) + tc, ts, valid=tc > 0
        )
    else:
        out["topic_watches"], out["topic_last_watch_ago_s"] = _count_and_ago(None, user, ts)
    ui = user * ctx.n_items + item
    out["item_watched_before"], _ = _count_and_ago(ctx.by_user_item, ui, ts)
    out["item_shown_before"], out["item_last_shown_ago_s"] = _count_and_ago(
        ctx.shown, ui, ts, sort_queries=True
    )
    out["item_prior_watches"] = ctx.by_item.count_before(item, ts).astype(np.float64)
    if items.upload_ts is not None:
        out["item_age_s"] = np.maximum(ts - items.upload_ts[item], 0.0)
    else:
        out["item_age_s"] = np.full(len(ts), np.nan)
    out["duration_s"] = (
        items.duration[item] if items.duration is not None else np.full(len(ts), np.nan)
    )
    return out, start, end


@dataclass(eq=False)
class _RankingVocabs:
    item: Vocabulary
    channel: Vocabulary | None
    topic: Vocabulary | None
    source: Vocabulary | None


def _request_table(
    ctx: _RankingContext,
    cand: _CandidateContext,
    first: np.ndarray,
    *,
    cfg: FeaturesConfig,
    stats: dict[str, float],
) -> pa.Table:
    """The query-side bags of requests, given each request's first impression row.

    The watch history and search tokens are the same for every impression of a request
    (SPEC 3: query features are computed once per request), so they are stored once per
    request and joined by the loader, not repeated for each of the slate's impressions.
    """
    log = ctx.log
    assert log.imp is not None
    user = np.asarray(log.imp.column("user_id").take(pa.array(first)).to_numpy(), np.int64)
    ts = np.asarray(log.imp.column("ts").take(pa.array(first)).to_numpy(), np.int64)
    start, end = ctx.by_user.before(user, ts)
    hist, hist_off = gather_ranges(ctx.rank_ids, np.maximum(start, end - cfg.history_n), end)
    stats["history_ids"] += hist.size
    stats["history_oov"] += int((hist == 0).sum())
    hist, hist_off = drop_zeros(hist, hist_off)
    toks, tok_off = _search_bags(cand, user, ts, cfg.search_n)
    toks, tok_off = drop_zeros(toks, tok_off)
    return pa.table(
        {
            "request_id": log.imp.column("request_id").take(pa.array(first)).combine_chunks(),
            "user_id": pa.array(user),
            "ts": pa.array(ts),
            "history": _list_array(hist, hist_off, pa.int32()),
            "search": _list_array(toks, tok_off, pa.int32()),
        }
    )


def _ranking_table(
    ctx: _RankingContext,
    cand: _CandidateContext,
    vocabs: _RankingVocabs,
    rows: np.ndarray,
    request_index: np.ndarray,
    *,
    stats: dict[str, float],
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Ranking examples for impression rows `rows` (indices into the sorted impressions);
    `request_index` is each row's position in its split's requests table."""
    log = ctx.log
    assert log.imp is not None
    # Work on the rows in (user, ts) order, the impressions' own, so that every time-index
    # lookup walks its arrays in order; the caller's (shuffled) order is restored at the end.
    order = np.argsort(rows, kind="stable")
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    rows, request_index = rows[order], request_index[order]
    imp = log.imp.take(pa.array(rows))
    user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    item = np.asarray(imp.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    raw, start, end = _ranking_raw(ctx, user, item, ts)
    seed = np.where(end > start, ctx.rank_ids[np.maximum(end - 1, 0)], 0).astype(np.int32)
    item_id = vocabs.item.lookup(item)
    stats["items"] += len(item_id)
    stats["item_oov"] += int((item_id == 0).sum())
    cols: dict[str, pa.Array] = {
        "request_id": imp.column("request_id").combine_chunks(),
        "user_id": pa.array(user),
        "ts": pa.array(ts),
        "item_id": pa.array(item),
        "position": imp.column("position").combine_chunks(),
        "label": pc.cast(imp.column("clicked"), pa.float32()).combine_chunks(),
        "watch_time": pc.cast(imp.column("watch_time_s"), pa.float32()).combine_chunks(),
        "request_index": pa.array(request_index, type=pa.int64()),
        "item": pa.array(item_id, type=pa.int32()),
        "seed": pa.array(seed, type=pa.int32()),
        "region": pa.array(cand.region[user], type=pa.int32()),
        "device": pa.array(cand.device[user], type=pa.int32()),
    }
    if vocabs.channel is not None and log.items.channel is not None:
        ch = log.items.channel[item]
        cols["channel"] = pa.array(
            vocabs.channel.lookup(pa.array(ch, mask=ch == 0)), type=pa.int32()
        )
    if vocabs.topic is not None and log.items.topic is not None:
        cols["topic"] = pa.array(
            vocabs.topic.lookup(log.items.topic.take(pa.array(item))), type=pa.int32()
        )
    if vocabs.source is not None:
        cols["source"] = pa.array(
            vocabs.source.lookup(imp.column(CANDIDATE_SOURCE)), type=pa.int32()
        )
    if CANDIDATE_SCORE in imp.column_names:
        raw[CANDIDATE_SCORE] = np.asarray(
            pc.fill_null(imp.column(CANDIDATE_SCORE).cast(pa.float64()), np.nan).to_numpy(),
            dtype=np.float64,
        )
    for name, values in raw.items():
        cols[name] = pa.array(values.astype(np.float32), type=pa.float32())
    table = pa.table(cols).take(pa.array(restore))
    return table, {name: values[restore] for name, values in raw.items()}


# --------------------------------------------------------------------------- build


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def _rate(done: int, elapsed: float) -> str:
    return f"{done / elapsed:,.0f} ex/s" if elapsed > 0 else ""


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
            for lo in (p.t_min,):
                if lo is not None:
                    out.t_min = lo if out.t_min is None else min(out.t_min, lo)
            for hi in (p.t_max,):
                if hi is not None:
                    out.t_max = hi if out.t_max is None else max(out.t_max, hi)
            out.rank_train_rows += p.rank_train_rows
            out.requests += p.requests
            out.held_out_users += p.held_out_users
            out.rank_columns = out.rank_columns or p.rank_columns
        return out

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
        acc.t_min = int(t.min()) if acc.t_min is None else min(acc.t_min, int(t.min()))
        acc.t_max = int(t.max()) if acc.t_max is None else max(acc.t_max, int(t.max()))
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
            self.task = self.bar.add_task(desc, total=total, rate="")
        else:
            self.bar.reset(self.task, total=total, description=desc, rate="")
        task, t0, done = self.task, time.perf_counter(), [0]

        def advance(n: int) -> None:
            done[0] += n
            self.bar.update(task, advance=n, rate=_rate(done[0], time.perf_counter() - t0))

        return advance


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
    with _progress(progress) as bar:
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
        with _progress(self.show) as bar:
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
            blocks_task = bar.add_task("blocks written", total=plan.n_blocks, rate="")
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
        task = bar.add_task("partition by user", total=self.n_events, rate="")
        t0, done = time.perf_counter(), [0]

        def on_rows(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=_rate(done[0], time.perf_counter() - t0))

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
        task = bar.add_task("fit transforms (blocks)", total=plan.n_blocks, rate="")
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


# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class Demographics:
    """A user's demographics at serving time; None = unknown."""

    age: float | None = None
    gender: str | None = None
    region: str | None = None
    device: str | None = None
    logged_in: bool | None = None


@dataclass(eq=False)
class Features:
    """An opened features directory: its manifest, transforms and example counts."""

    path: Path
    manifest: dict[str, Any]
    config: FeaturesConfig
    _vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    _norms: dict[str, QuantileNormalizer] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | str) -> Features:
        path = Path(path)
        file = path / MANIFEST
        try:
            manifest = json.loads(file.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not a features directory (no {MANIFEST})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{file}: unreadable ({e})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{file}: features format version {manifest.get('format_version')}, "
                f"this funnelrec reads {FORMAT_VERSION}"
            )
        known = set(FeaturesConfig.__dataclass_fields__)
        config = FeaturesConfig(**{k: v for k, v in manifest["config"].items() if k in known})
        return cls(path=path, manifest=manifest, config=config)

    @property
    def split(self) -> str:
        return str(self.manifest["split"]["kind"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["data"]["fingerprint"])

    def check_dataset(self, ds: Dataset) -> None:
        """Raise ArtifactError unless `ds` is the data these features were built from."""
        if ds.fingerprint() != self.fingerprint:
            raise ArtifactError(
                f"{self.path} was built from data with fingerprint {self.fingerprint}, "
                f"{ds.path} has {ds.fingerprint()}: rebuild the features"
            )

    def vocab(self, name: str) -> Vocabulary:
        if name not in self._vocabs:
            entry = self.manifest["vocabularies"].get(name)
            if entry is None:
                raise ArtifactError(
                    f"{self.path}: no vocabulary '{name}' "
                    f"(have {', '.join(self.manifest['vocabularies'])})"
                )
            self._vocabs[name] = Vocabulary.load(self.path / entry["file"])
        return self._vocabs[name]

    def normalizer(self, stage: Literal["candidates", "ranking"]) -> QuantileNormalizer:
        if stage not in self._norms:
            file = self.path / "transforms" / f"{stage}_dense.json"
            if not file.exists():
                raise ArtifactError(f"{self.path}: no {stage} normaliser ({file.name})")
            self._norms[stage] = QuantileNormalizer.load(file)
        return self._norms[stage]

    @property
    def candidate_spec(self) -> dict[str, Any]:
        return dict(self.manifest["candidates"])

    @property
    def has_ranking(self) -> bool:
        return bool(self.manifest["ranking"].get("available"))

    @property
    def ranking_spec(self) -> dict[str, Any]:
        """The ranking feature spec (`ranking.RankingFeatureSpec.from_dict` reads it)."""
        if not self.has_ranking:
            raise ArtifactError(
                f"{self.path}: no ranking examples ({self.manifest['ranking'].get('reason')})"
            )
        return dict(self.manifest["ranking"]["spec"])

    def num_examples(self, stage: Literal["candidates", "ranking"], split: str) -> int:
        return int(self.manifest["counts"].get(stage, {}).get(split, 0))

    def shards(self, stage: Literal["candidates", "ranking"], split: str) -> list[Path]:
        if split not in PART_NAMES:
            raise FunnelrecError(f"split must be one of {', '.join(PART_NAMES)}, got '{split}'")
        if stage == "ranking" and not self.has_ranking:
            self.ranking_spec  # raises with the reason  # noqa: B018
        folder = self.path / stage / split
        files = sorted(folder.glob("part-*.parquet"))
        if not files:
            raise ArtifactError(f"{folder}: no example shards")
        return files

    def item_label_counts(self) -> np.ndarray:
        """[V] how often each item vocabulary id is a training label (id 0: 0)."""
        t = pq.read_table(self.path / "transforms" / "item_label_counts.parquet")
        return np.asarray(t.column("count").to_numpy(), dtype=np.int64)

    def item_counts(self) -> np.ndarray:
        """[V] training watch count of each item vocabulary id (the sampling proposal's base)."""
        return np.asarray(self.vocab("item").counts, dtype=np.int64)

    def candidate_batch(
        self,
        histories: Sequence[Sequence[int]],
        queries: Sequence[Sequence[str]] = (),
        demographics: Sequence[Demographics | None] = (),
        *,
        user_ids: Sequence[int] | None = None,
        ts: Sequence[int] | None = None,
    ) -> CandidateBatch:
        """A serving-time batch: B users' raw context -> CandidateBatch (example_age 0).

        histories[b]:   dataset item ids the user watched, oldest first (last N used)
        queries[b]:     the user's query strings, oldest first (last N used)
        demographics[b]: their demographics (None or missing entries: unknown)
        Labels are 0 (there is nothing to predict).
        """
        b = len(histories)
        cfg = self.config
        qs = list(queries) or [[] for _ in range(b)]
        dems = list(demographics) or [None] * b
        if len(qs) != b or len(dems) != b:
            raise FunnelrecError(
                "candidate_batch: histories, queries, demographics differ in length"
            )
        item_vocab, token_vocab = self.vocab("item"), self.vocab("token")
        hist_raw = [list(h)[-cfg.history_n :] for h in histories]
        lens = np.array([len(h) for h in hist_raw], dtype=np.int64)
        flat = np.array([i for h in hist_raw for i in h], dtype=np.int64)
        hist = item_vocab.lookup(flat)
        hist, hist_off = drop_zeros(hist, np.concatenate([[0], np.cumsum(lens)]))
        q_raw = [list(q)[-cfg.search_n :] for q in qs]
        q_flat = [s for q in q_raw for s in q]
        tokens, tok_off = tokenize_array(pa.array(q_flat, type=pa.string()))
        q_off = np.concatenate([[0], np.cumsum([len(q) for q in q_raw])]).astype(np.int64)
        toks = token_vocab.lookup(tokens)
        toks, t_off = drop_zeros(toks, tok_off[q_off])
        d = [x or Demographics() for x in dems]
        enc = self._user_encoder()
        region, device, dense = enc.encode(
            age=np.array([np.nan if x.age is None else x.age for x in d], dtype=np.float64),
            logged_in=np.array(
                [np.nan if x.logged_in is None else float(x.logged_in) for x in d], dtype=np.float64
            ),
            gender=pa.array([x.gender for x in d], type=pa.string()),
            region=pa.array([x.region for x in d], type=pa.string()),
            device=pa.array([x.device for x in d], type=pa.string()),
            n=b,
        )
        return CandidateBatch(
            history=torch.from_numpy(hist.astype(np.int64)),
            history_offsets=torch.from_numpy(hist_off[:-1].astype(np.int64)),
            search=torch.from_numpy(toks.astype(np.int64)),
            search_offsets=torch.from_numpy(t_off[:-1].astype(np.int64)),
            region=torch.from_numpy(region.astype(np.int64)),
            device=torch.from_numpy(device.astype(np.int64)),
            dense=torch.from_numpy(dense),
            example_age=torch.zeros(b, dtype=torch.float32),
            label=torch.zeros(b, dtype=torch.int64),
            user_id=torch.tensor(
                list(user_ids) if user_ids is not None else [0] * b, dtype=torch.int64
            ),
            ts=torch.tensor(list(ts) if ts is not None else [0] * b, dtype=torch.int64),
        )

    def _user_encoder(self) -> UserEncoder:
        names = self.manifest["vocabularies"]
        cols = self.candidate_spec["dense_columns"]
        return UserEncoder(
            region=self.vocab("region"),
            device=self.vocab("device"),
            gender=self.vocab("gender") if "gender" in names else None,
            normalizer=self.normalizer("candidates"),
            has_age="age" in cols,
            has_logged_in="logged_in" in cols,
        )
