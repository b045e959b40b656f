"""Training examples for both stages, built from canonical tables with leak-free splits.

    build_features(DATA, FEAT, split="last", config=FeaturesConfig())   # funnelrec.build
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from funnelrec.batch import CandidateBatch
from funnelrec.blocks import (
    CountsBefore,
    EventTables,
)
from funnelrec.dataset import Dataset
from funnelrec.errors import ArtifactError, DataError, FunnelrecError
from funnelrec.normalize import QuantileNormalizer
from funnelrec.schema import validate_table
from funnelrec.splits import (
    PART_NAMES,
    TRAIN,
    VALID,
    Split,
    TimeIndex,
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
                    `funnelrec.blocks`); a block needs ~0.2 GiB per million events
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
