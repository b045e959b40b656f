"""Ranking features at serving time, computed by the very code that built the training examples.

A ranking example (Covington et al. 2016, section 4.1) describes one impression: a user at
time t and one item. In training, `examples.ranking._ranking_table` and `_request_table`
compute its features from time indexes over the whole event log ("watches of this channel
before t", "times shown before t", ...). Reimplementing those formulas for serving would let
the two drift apart, so serving builds the same inputs for ONE request instead (the user's
recent events from the live state, the candidates as the request's impressions) and calls
the same functions; the resulting table goes through the same quantile normaliser as the
loader applies to training shards (`loader.RankingConverter`).

    items = ServingItems.from_table(pq.read_table(ART / "items.parquet"))
    featurizer = RankingFeaturizer(Features.open(ART / "features"), items)
    batch = featurizer.batch(
        UserEvents(history=[12, 7], history_ts=[t0, t1], shown={40: 2}, shown_ts={40: t1}),
        candidates=np.array([40, 41, 99]), ts=t1 + 60, region=3, device=1,
    )                                   # RankingBatch of 3 impressions, dense normalised

What differs from training, by necessity:
- a request sees only the events the caller passes in (the live store keeps each user's
  last N watches and queries), so counts over a user's past ("watches of this channel")
  are counted over that window; for users with at most N watches they are exact;
- "the item's watches by everyone so far" (`item_prior_watches`) is the item's watch count
  in the whole data set, frozen when the artifact was packaged;
- the request's items live in a small local id space (the candidates and the history
  items): the feature code indexes per-item arrays by id, and slicing the corpus' arrays
  down to the few hundred items of a request keeps that cheap (sizing them by the corpus
  would cost a sort of every channel id per request).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import CANDIDATE_SCORE, CANDIDATE_SOURCE, Features
from funnelrec.features.batch import RankingBatch
from funnelrec.features.candidate_examples import _CandidateContext
from funnelrec.features.ranking_examples import (
    _rank_context,
    _ranking_table,
    _RankingVocabs,
    _request_table,
)
from funnelrec.features.splits import Split, TimeIndex, user_offsets
from funnelrec.features.tables import _Items, _Log, _Users
from funnelrec.features.tokenize import tokenize_array
from funnelrec.features.vocab import Vocabulary

# Local user ids of one request: the user, and a second one that owns a placeholder watch
# so that the event arrays are never empty (the feature code reads the latest watch of a
# user by position, which needs at least one element to index; the placeholder cannot
# change the first user's features, as every index is keyed by user).
_USER, _PLACEHOLDER_USER = 1, 2


@dataclass(eq=False)
class ServingItems:
    """Per-item columns indexed by dataset item id (row 0 unused), for the whole corpus.

    known:       [N + 1] bool, the item is in the items table
    upload_ts, duration: [N + 1] float64, NaN = unknown (None: no such column)
    channel:     [N + 1] int64 channel id, 0 = unknown
    topic:       [N + 1] topic strings (null = unknown)
    topic_code:  [N + 1] int64 dense code of the topic string, 0 = unknown
    watches:     [N + 1] int64 the item's watches in the data (`item_prior_watches`)
    """

    known: np.ndarray
    upload_ts: np.ndarray | None
    duration: np.ndarray | None
    channel: np.ndarray | None
    topic: pa.Array | None
    topic_code: np.ndarray | None
    watches: np.ndarray

    @property
    def num_items(self) -> int:
        """N: the largest item id."""
        return len(self.known) - 1

    @classmethod
    def from_table(cls, items: pa.Table, watches: np.ndarray | None = None) -> ServingItems:
        """From an items table (item_id and the optional canonical columns) and the
        per-item watch counts ([N + 1], or a column `watches` of the table)."""
        ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
        n = int(ids.max()) if ids.size else 0
        known = np.zeros(n + 1, dtype=bool)
        known[ids] = True

        def floats(name: str) -> np.ndarray | None:
            if name not in items.column_names:
                return None
            col = pc.fill_null(items.column(name).cast(pa.float64()), np.nan)
            out = np.full(n + 1, np.nan)
            out[ids] = np.asarray(col.to_numpy(), dtype=np.float64)
            return out

        channel = None
        if "channel_id" in items.column_names:
            channel = np.zeros(n + 1, dtype=np.int64)
            channel[ids] = np.asarray(pc.fill_null(items.column("channel_id"), 0).to_numpy())
        topic = topic_code = None
        if "topic" in items.column_names:
            index = np.full(n + 1, -1, dtype=np.int64)
            index[ids] = np.arange(len(ids))
            mask = index < 0
            topic = (
                items.column("topic")
                .combine_chunks()
                .cast(pa.string())
                .take(pa.array(np.where(mask, 0, index), mask=mask))
            )
            enc = pc.dictionary_encode(topic)
            codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False))
            topic_code = codes.astype(np.int64) + 1
        if watches is None:
            watches = np.zeros(n + 1, dtype=np.int64)
            if "watches" in items.column_names:
                watches[ids] = np.asarray(items.column("watches").to_numpy(), dtype=np.int64)
        if watches.shape != (n + 1,):
            raise ArtifactError(
                f"item watch counts have shape {watches.shape}, expected ({n + 1},)"
            )
        return cls(
            known=known,
            upload_ts=floats("upload_ts"),
            duration=floats("duration_s"),
            channel=channel,
            topic=topic,
            topic_code=topic_code,
            watches=np.asarray(watches, dtype=np.int64),
        )

    def local(self, ids: np.ndarray) -> _Items:
        """The columns of dataset items `ids` ([M], sorted, unique) as items 1..M."""

        def take(a: np.ndarray | None, fill: Any) -> np.ndarray | None:
            if a is None:
                return None
            return np.concatenate([np.array([fill], dtype=a.dtype), a[ids]])

        topic = None
        if self.topic is not None:
            topic = pa.concat_arrays([pa.nulls(1, pa.string()), self.topic.take(pa.array(ids))])
        return _Items(
            n=len(ids),
            upload_ts=take(self.upload_ts, np.nan),
            duration=take(self.duration, np.nan),
            channel=take(self.channel, 0),
            topic_code=take(self.topic_code, 0),
            topic=topic,
        )


@dataclass(frozen=True)
class UserEvents:
    """What is known of the user at request time; lists are oldest first.

    history, history_ts: dataset item ids watched and when (aligned)
    queries, queries_ts: search queries and when (aligned)
    shown:               item id -> times already shown to the user (churn, paper 4.1)
    shown_ts:            item id -> when it was last shown (missing: at the user's latest
                         event, the best guess when the store keeps counts only)
    """

    history: Sequence[int] = ()
    history_ts: Sequence[int] = ()
    queries: Sequence[str] = ()
    queries_ts: Sequence[int] = ()
    shown: Mapping[int, int] = field(default_factory=dict)
    shown_ts: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class _IdTable(Vocabulary):
    """A vocabulary lookup through a table: local item id -> `rank_item` vocabulary id.

    The feature code maps impression item ids through the item vocabulary; a request's
    items have local ids, so their vocabulary ids are looked up once and served from here.
    """

    table: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int32))

    def lookup(self, values: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
        return np.asarray(self.table[np.asarray(values, dtype=np.int64)], dtype=np.int32)


class _PastCounts:
    """Every event of each group is in the past: `item_prior_watches` from the packaged
    per-item watch counts (the feature code asks for "watches of the item before t")."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)

    def count_before(self, group: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return self.counts[np.asarray(group, dtype=np.int64)]


class RankingFeaturizer:
    """Builds the ranking batch of one request with the training code (see the module doc).

    features: the features the ranker was trained on (vocabularies, normaliser, spec)
    items:    the corpus' per-item columns
    """

    def __init__(self, features: Features, items: ServingItems) -> None:
        self.features = features
        self.items = items
        self.config = features.config
        spec = features.ranking_spec
        self.categorical = [str(f) for f, _ in spec["categorical"]]
        self.bags = [str(f) for f, _ in spec["bags"]]
        self.raw = [str(c) for c in features.manifest["ranking"]["raw_continuous"]]
        self.normalizer = features.normalizer("ranking")
        names = features.manifest["vocabularies"]

        def vocab(name: str) -> Vocabulary | None:
            return features.vocab(name) if name in names else None

        rank_item, token = vocab("rank_item"), vocab("token")
        if rank_item is None or token is None:
            raise ArtifactError(f"{features.path}: no rank_item or token vocabulary")
        self.rank_item, self.token = rank_item, token
        self.channel, self.topic, self.source = vocab("channel"), vocab("topic"), vocab("source")
        self.uses_score = CANDIDATE_SCORE in self.raw

    def batch(
        self,
        events: UserEvents,
        candidates: np.ndarray,
        ts: int,
        *,
        region: int = 0,
        device: int = 0,
        sources: Sequence[str | None] | None = None,
        scores: np.ndarray | None = None,
    ) -> RankingBatch:
        """The ranking batch of `candidates` ([C] dataset item ids) shown at time `ts`.

        region, device: the user's vocabulary ids (`Features.candidate_batch` makes them).
        sources, scores: [C] the nominating candidate source and its score, used only when
        the ranker was trained with them (`cand_source`, `cand_score` impression columns).
        Events at or after `ts` are ignored, as in training.
        """
        cand = np.asarray(candidates, dtype=np.int64)
        c = len(cand)
        hist = np.asarray(events.history, dtype=np.int64)
        hist_ts = np.asarray(events.history_ts, dtype=np.int64)
        if hist.shape != hist_ts.shape:
            raise FunnelrecError("ranking features: history and history_ts differ in length")
        ids = np.unique(np.concatenate([cand, hist]))
        if ids.size and (ids[0] < 1 or ids[-1] > self.items.num_items):
            bad = ids[0] if ids[0] < 1 else ids[-1]
            raise FunnelrecError(f"ranking features: item id {bad} is not in the corpus")
        local_cand = np.searchsorted(ids, cand) + 1
        local_hist = np.searchsorted(ids, hist) + 1
        placeholder_item = local_cand[:1] if c else np.ones(1, dtype=np.int64)

        # Watches: the user's (sorted by time, ties in the given order), then the placeholder.
        order = np.argsort(hist_ts, kind="stable")
        w_item = np.concatenate([local_hist[order], placeholder_item])
        w_ts = np.concatenate([hist_ts[order], [ts]]).astype(np.int64)
        w_user = np.concatenate([np.full(len(hist), _USER), [_PLACEHOLDER_USER]]).astype(np.int64)
        w_dataset_item = np.concatenate([hist[order], ids[placeholder_item - 1]])

        # Searches: the user's queries, sorted by time.
        q_ts = np.asarray(events.queries_ts, dtype=np.int64)
        if len(q_ts) != len(events.queries):
            raise FunnelrecError("ranking features: queries and queries_ts differ in length")
        q_order = np.argsort(q_ts, kind="stable")
        queries = pa.array([events.queries[i] for i in q_order], type=pa.string())
        s_ts = q_ts[q_order]
        s_user = np.full(len(s_ts), _USER, dtype=np.int64)
        tokens, tok_off = tokenize_array(queries)

        imp = self._impressions(events, cand, local_cand, ts, sources, scores)
        n_past = imp.num_rows - c
        users = _Users(n=2, age=None, logged_in=None, gender=None, region=None, device=None)
        log = _Log(
            users=users,
            items=self.items.local(ids),
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
        token_ids = self.token.lookup(tokens)
        user_ids = np.array([0, region, 0], dtype=np.int32), np.array([0, device, 0], np.int32)
        no_split = np.zeros(users.n + 1, dtype=np.int64)
        cand_ctx = _CandidateContext(
            log=log,
            split=Split("last", log.w_start, no_split, no_split, no_split, no_split),
            item_ids=np.zeros(len(w_item), dtype=np.int32),
            token_ids=token_ids,
            region=user_ids[0],
            device=user_ids[1],
            dense=np.zeros((users.n + 1, 0), dtype=np.float32),
            item_vocab_size=1,
            search_index=TimeIndex(s_user, s_ts),
            t_min=int(ts),
            t_max=int(ts),
        )
        rank_ids = self.rank_item.lookup(w_dataset_item)
        watches = np.concatenate([[0], self.items.watches[ids]])
        ctx = _rank_context(log, rank_ids, token_ids, _PastCounts(watches))
        vocabs = _RankingVocabs(
            item=_IdTable(
                "rank_item",
                np.zeros(0, dtype=np.int64),
                np.zeros(1, dtype=np.int64),
                "int",
                table=np.concatenate([[0], self.rank_item.lookup(ids)]).astype(np.int32),
            ),
            channel=self.channel,
            topic=self.topic,
            source=self.source,
        )
        stats = dict.fromkeys(("history_ids", "history_oov", "items", "item_oov"), 0.0)
        request = _request_table(
            ctx, cand_ctx, np.array([n_past], dtype=np.int64), cfg=self.config, stats=stats
        )
        table, _ = _ranking_table(
            ctx,
            cand_ctx,
            vocabs,
            np.arange(n_past, n_past + c, dtype=np.int64),
            np.zeros(c, dtype=np.int64),
            stats=stats,
        )
        return self._to_batch(table, request)

    def _impressions(
        self,
        events: UserEvents,
        cand: np.ndarray,
        local_cand: np.ndarray,
        ts: int,
        sources: Sequence[str | None] | None,
        scores: np.ndarray | None,
    ) -> pa.Table:
        """Past impressions of the candidates (one row per time shown, at the last time it
        was shown), then this request's: one page, request id 2, at `ts`."""
        latest = max([*events.history_ts, *events.queries_ts], default=ts - 1)
        shown = np.maximum(_by_key(events.shown, cand, 0), 0)
        shown_at = np.minimum(_by_key(events.shown_ts, cand, latest), ts - 1)
        past_item = np.repeat(local_cand, shown)
        past_ts = np.repeat(shown_at, shown)
        p, c = len(past_item), len(cand)
        cols: dict[str, Any] = {
            "request_id": np.concatenate([np.ones(p, np.int64), np.full(c, 2, np.int64)]),
            "user_id": np.full(p + c, _USER, dtype=np.int64),
            "item_id": np.concatenate([past_item, local_cand]).astype(np.int64),
            "ts": np.concatenate([past_ts, np.full(c, ts, np.int64)]),
            "position": pa.array(
                np.concatenate([np.zeros(p, np.int32), np.arange(c, dtype=np.int32)])
            ),
            "clicked": np.zeros(p + c, dtype=bool),
            "watch_time_s": pa.array(np.zeros(p + c), pa.float32()),
        }
        if self.uses_score:
            s = np.full(c, np.nan) if scores is None else np.asarray(scores, np.float64)
            cols[CANDIDATE_SCORE] = pa.array(np.concatenate([np.full(p, np.nan), s]))
        if self.source is not None:
            src = list(sources) if sources is not None else [None] * c
            cols[CANDIDATE_SOURCE] = pa.array([None] * p + src, type=pa.string())
        return pa.table(cols)

    def _to_batch(self, table: pa.Table, request: pa.Table) -> RankingBatch:
        """Rows of `_ranking_table` -> RankingBatch, as `loader.RankingConverter` does it
        for training shards (every impression shares the one request's bags)."""
        c = table.num_rows

        def ids(name: str) -> torch.Tensor:
            col = table.column(name).combine_chunks()
            return torch.from_numpy(np.array(col.to_numpy(), dtype=np.int64))

        bags: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.bags:
            arr = request.column(name).combine_chunks()
            offs = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
            values = np.asarray(arr.values.to_numpy(), dtype=np.int64)[offs[0] : offs[1]]
            bags[name] = (
                torch.from_numpy(np.tile(values, c)),
                torch.arange(c, dtype=torch.int64) * len(values),
            )
        raw = {
            name: np.asarray(table.column(name).combine_chunks().to_numpy(), dtype=np.float64)
            for name in self.raw
        }
        zeros = torch.zeros(c, dtype=torch.float32)
        return RankingBatch(
            categorical={name: ids(name) for name in self.categorical},
            bags=bags,
            dense=torch.from_numpy(self.normalizer.transform(raw)),
            label=zeros,
            watch_time=zeros.clone(),
            user_id=torch.full((c,), _USER, dtype=torch.int64),
            request_id=torch.full((c,), 2, dtype=torch.int64),
        )


def _by_key(mapping: Mapping[int, int], keys: np.ndarray, default: int) -> np.ndarray:
    """[K] int64 mapping[key] for each key, `default` where absent (vectorised)."""
    if not mapping:
        return np.full(len(keys), default, dtype=np.int64)
    k = np.fromiter(mapping.keys(), dtype=np.int64, count=len(mapping))
    v = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
    order = np.argsort(k)
    k, v = k[order], v[order]
    pos = np.minimum(np.searchsorted(k, keys), len(k) - 1)
    return np.where(k[pos] == keys, v[pos], default).astype(np.int64)
