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

Two paths compute the same batch. `RankingFeaturizer.reference_batch` runs the training
code as described above; building its tables (a local item table, time indexes, Arrow
tables and their `take`s) is most of its cost, for one user and a few hundred items.
`RankingFeaturizer.batch`, the one serving calls, computes the same formulas directly over
the candidate set: every per-item input (vocabulary ids of item, channel and topic, the
keys the counts group by) is looked up once for the whole corpus when the featurizer is
made, and a request's counts ("watches of this channel before t") are one sort of the
user's few watches and a binary search per candidate. The tests hold the two to equal
batches (tests/features/test_serving.py against the training examples themselves), so a
change to a formula on one side shows as a failing test, not as training/serving skew.
A spec with a feature the direct path does not know is served by the reference path.
"""

from __future__ import annotations

import copy
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
from funnelrec.features.config import RANKING_CONTINUOUS
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
    topic: pa.Array | pa.ChunkedArray | None
    topic_code: np.ndarray | None
    watches: np.ndarray
    _growth: GrowingColumns | None = field(default=None, repr=False)

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

    def extended(self, extra: pa.Table) -> ServingItems:
        """These columns with the items of `extra` added (item_id, each above `num_items`,
        and the optional canonical columns; no watches yet). Costs time in the new items
        alone, amortised: the columns are views of buffers with room past their end, which
        the newest extension of a chain of them fills in place (an older one, extended
        again, copies instead, so no view another reader holds ever changes)."""
        ids = np.asarray(extra.column("item_id").to_numpy(), dtype=np.int64)
        if not ids.size:
            return self
        if int(ids.min()) <= self.num_items:
            raise FunnelrecError(
                f"item id {int(ids.min())} is already in the corpus (ids up to {self.num_items})"
            )
        n = int(ids.max())
        grow = self._growth
        if grow is None or not grow.holds(self):
            grow = GrowingColumns.of(self, _GROWN_ITEM_COLUMNS)
            if self.topic is not None:
                assert self.topic_code is not None  # from_table sets both
                grow.start_topics(self.topic, self.topic_code)
        local = ids - self.num_items - 1  # rows of the added range, 0-based

        def rows(name: str, fill: Any, values: np.ndarray | None) -> np.ndarray | None:
            if name not in grow.columns:
                return None
            out = np.full(n - self.num_items, fill, dtype=grow.columns[name].dtype)
            if values is not None:
                out[local] = values
            return grow.append(name, out)

        def floats(name: str) -> np.ndarray | None:
            if name not in extra.column_names:
                return None
            return np.asarray(
                pc.fill_null(extra.column(name).cast(pa.float64()), np.nan).to_numpy(),
                dtype=np.float64,
            )

        channel = None
        if "channel_id" in extra.column_names:
            channel = np.asarray(pc.fill_null(extra.column("channel_id"), 0).to_numpy())
        topic = topic_code = None
        if self.topic is not None:
            names: list[str | None] = [None] * (n - self.num_items)
            given = extra.column("topic").to_pylist() if "topic" in extra.column_names else []
            for row, name in zip(local.tolist(), given, strict=False):
                names[row] = name
            codes = np.array([grow.topic_code(t) for t in names], dtype=np.int64)
            topic = grow.append_topic(pa.array(names, pa.string()))
            topic_code = grow.append("topic_code", codes)
        known = rows("known", False, np.ones(len(ids), dtype=bool))
        assert known is not None  # every ServingItems has the column
        watches = rows("watches", 0, None)
        assert watches is not None
        out = ServingItems(
            known=known,
            upload_ts=rows("upload_ts", np.nan, floats("upload_ts")),
            duration=rows("duration", np.nan, floats("duration_s")),
            channel=rows("channel", 0, channel),
            topic=topic,
            topic_code=topic_code,
            watches=watches,
        )
        out._growth = grow
        return out

    def local(self, ids: np.ndarray) -> _Items:
        """The columns of dataset items `ids` ([M], sorted, unique) as items 1..M."""

        def take(a: np.ndarray | None, fill: Any) -> np.ndarray | None:
            if a is None:
                return None
            return np.concatenate([np.array([fill], dtype=a.dtype), a[ids]])

        topic = None
        if self.topic is not None:
            taken = self.topic.take(pa.array(ids))
            if isinstance(taken, pa.ChunkedArray):  # an extended corpus' topics
                taken = taken.combine_chunks()
            topic = pa.concat_arrays([pa.nulls(1, pa.string()), taken])
        return _Items(
            n=len(ids),
            upload_ts=take(self.upload_ts, np.nan),
            duration=take(self.duration, np.nan),
            channel=take(self.channel, 0),
            topic_code=take(self.topic_code, 0),
            topic=topic,
        )


# The ServingItems arrays that `ServingItems.extended` grows in place.
_GROWN_ITEM_COLUMNS = ("known", "upload_ts", "duration", "channel", "topic_code", "watches")


class GrowingColumns:
    """The buffers behind a chain of `ServingItems.extended` (and of `_ItemColumns`'
    extensions): per column, an array with room past the rows handed out (`used`). Rows
    past `used` belong to no view yet, so the newest view's extension writes them in place
    and no reader's array changes; capacity grows by half when full (amortised O(1) a row).
    """

    def __init__(self) -> None:
        self.columns: dict[str, np.ndarray] = {}
        self.used: dict[str, int] = {}
        self._topics: list[pa.Array] = []
        self._topic_codes: dict[str | None, int] = {}

    @classmethod
    def of(cls, source: object, names: Sequence[str]) -> GrowingColumns:
        """Buffers holding copies of the array attributes `names` of `source` that are
        not None (with room for more)."""
        g = cls()
        for name in names:
            a = getattr(source, name)
            if a is not None:
                g.add(name, a)
        return g

    def holds(self, source: object) -> bool:
        """Whether `source`'s arrays are the newest views of these buffers (its
        extension may write in place)."""
        return all(len(getattr(source, name)) == used for name, used in self.used.items())

    def start_topics(self, topic: pa.Array | pa.ChunkedArray, codes: np.ndarray) -> None:
        """Start the topic strings and their dense codes from `topic` and its `codes`."""
        self._topics = list(topic.chunks) if isinstance(topic, pa.ChunkedArray) else [topic]
        unique, first = np.unique(codes, return_index=True)
        names = topic.take(pa.array(first)).to_pylist()
        self._topic_codes = dict(zip(names, unique.tolist(), strict=True))
        self._topic_codes[None] = 0

    def add(self, name: str, a: np.ndarray) -> None:
        """Start buffer `name` from `a`'s values (rows along the first axis)."""
        buf = np.empty((max(len(a) + len(a) // 2, 16), *a.shape[1:]), dtype=a.dtype)
        buf[: len(a)] = a
        self.columns[name], self.used[name] = buf, len(a)

    def append(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Buffer `name` with `rows` after its used rows: a view of all of them."""
        buf, used = self.columns[name], self.used[name]
        if used + len(rows) > len(buf):
            size = max(used + len(rows), len(buf) + len(buf) // 2)
            bigger = np.empty((size, *buf.shape[1:]), dtype=buf.dtype)
            bigger[:used] = buf[:used]
            self.columns[name] = buf = bigger
        buf[used : used + len(rows)] = rows
        self.used[name] = used + len(rows)
        return buf[: used + len(rows)]

    def topic_code(self, name: str | None) -> int:
        """The dense code of topic `name` (a new topic gets the next one; None: 0)."""
        code = self._topic_codes.get(name)
        if code is None:
            code = self._topic_codes[name] = max(self._topic_codes.values(), default=0) + 1
        return code

    def append_topic(self, names: pa.Array) -> pa.ChunkedArray:
        """The topic strings with `names` after them, as chunks (merged now and then, so a
        lookup over them stays cheap)."""
        self._topics.append(names)
        if len(self._topics) > 32:
            self._topics = [pa.concat_arrays(self._topics)]
        return pa.chunked_array(self._topics, pa.string())


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


@dataclass(frozen=True, eq=False)
class RequestFeatures:
    """The ranking inputs of one request's C candidates, with what every row shares once.

    categorical: names of the categorical features, in the batch's order
    shared:      name -> vocabulary id of a categorical feature the same on every row (the
                 seed, region and device: the request's, not the candidate's)
    rows:        name -> [C] int64 vocabulary ids of a per-candidate categorical feature
    bags:        name -> [L] int64 the request's bag (no OOV ids), the same on every row
    dense:       [C, F] float32 normalised continuous features

    `batch()` lays them out as the RankingBatch the model reads (each row a copy of what
    they share), the form training batches have.
    """

    categorical: tuple[str, ...]
    shared: dict[str, int]
    rows: dict[str, np.ndarray]
    bags: dict[str, np.ndarray]
    dense: np.ndarray

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def batch(self) -> RankingBatch:
        """The RankingBatch of the C rows: shared ids and bags repeated on every row."""
        c = len(self)
        categorical: dict[str, torch.Tensor] = {}
        for name in self.categorical:
            if name in self.shared:
                categorical[name] = torch.full((c,), self.shared[name], dtype=torch.int64)
            else:
                categorical[name] = torch.from_numpy(np.asarray(self.rows[name], dtype=np.int64))
        bags = {
            name: (
                torch.from_numpy(np.tile(values, c)),
                torch.arange(c, dtype=torch.int64) * len(values),
            )
            for name, values in self.bags.items()
        }
        zeros = torch.zeros(c, dtype=torch.float32)
        return RankingBatch(
            categorical=categorical,
            bags=bags,
            dense=torch.from_numpy(self.dense),
            label=zeros,
            watch_time=zeros.clone(),
            user_id=torch.full((c,), _USER, dtype=torch.int64),
            request_id=torch.full((c,), 2, dtype=torch.int64),
        )

    @classmethod
    def of_batch(cls, batch: RankingBatch) -> RequestFeatures:
        """The request of a batch whose rows are one request's (every row the same bags,
        as `RankingFeaturizer.reference_batch` makes them): the first row's bags; every
        categorical feature per row."""
        c = len(batch)
        bags = {}
        for name, (ids, _) in batch.bags.items():
            values = ids[: ids.numel() // c] if c else ids[:0]
            bags[name] = values[values != 0].numpy()
        return cls(
            categorical=tuple(batch.categorical),
            shared={},
            rows={name: ids.numpy() for name, ids in batch.categorical.items()},
            bags=bags,
            dense=batch.dense.numpy(),
        )


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
        self._columns = _ItemColumns.of(self)
        self._source_ids: dict[str | None, int] = {}

    def with_items(self, items: ServingItems) -> RankingFeaturizer:
        """This featurizer over `items`, an extension of its own (`ServingItems.extended`):
        the per-item inputs of the new items alone are computed."""
        out = copy.copy(self)
        out.items = items
        if self._columns is not None:
            out._columns = self._columns.extended(out, self.items.num_items)
        return out

    @property
    def vectorised(self) -> bool:
        """Whether `batch` computes the features directly (False: by the training code,
        for a spec with a feature the direct path does not know)."""
        return self._columns is not None

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
        """The ranking batch of `candidates` ([C] distinct dataset item ids) shown at `ts`.

        region, device: the user's vocabulary ids (`Features.candidate_batch` makes them).
        sources, scores: [C] the nominating candidate source and its score, used only when
        the ranker was trained with them (`cand_source`, `cand_score` impression columns).
        Events at or after `ts` are ignored, as in training. Rows are in candidate order;
        the query-side bags are the request's, repeated on every row.
        """
        if self._columns is None:
            return self.reference_batch(
                events, candidates, ts, region=region, device=device, sources=sources, scores=scores
            )
        return self.request(
            events, candidates, ts, region=region, device=device, sources=sources, scores=scores
        ).batch()

    def request(
        self,
        events: UserEvents,
        candidates: np.ndarray,
        ts: int,
        *,
        region: int = 0,
        device: int = 0,
        sources: Sequence[str | None] | None = None,
        scores: np.ndarray | None = None,
    ) -> RequestFeatures:
        """`batch` before it is laid out in rows: what every row shares appears once (the
        form the serving ranker reads, `serving.inference.RequestRanker.request_logits`).
        The same arguments as `batch`; `request(...).batch()` is `batch(...)`."""
        cols = self._columns
        if cols is None:
            return RequestFeatures.of_batch(
                self.reference_batch(
                    events,
                    candidates,
                    ts,
                    region=region,
                    device=device,
                    sources=sources,
                    scores=scores,
                )
            )
        cand = np.asarray(candidates, dtype=np.int64)
        c = len(cand)
        t = int(ts)
        hist = np.asarray(events.history, dtype=np.int64)
        hist_ts = np.asarray(events.history_ts, dtype=np.int64)
        if hist.shape != hist_ts.shape:
            raise FunnelrecError("ranking features: history and history_ts differ in length")
        q_ts = np.asarray(events.queries_ts, dtype=np.int64)
        if len(q_ts) != len(events.queries):
            raise FunnelrecError("ranking features: queries and queries_ts differ in length")
        for name, given in (("sources", sources), ("scores", scores)):
            if given is not None and len(given) != c:
                raise FunnelrecError(f"ranking features: {c} candidates but {len(given)} {name}")
        self._check_items(cand, hist)

        # The user's watches before t, oldest first (equal times: in the given order), as
        # the training code sorts them: every user-side feature is a count over these.
        order = np.argsort(hist_ts, kind="stable")
        before = int(np.searchsorted(hist_ts[order], t, side="left"))
        w_item, w_ts = hist[order[:before]], hist_ts[order[:before]]
        raw = self._raw_features(cols, events, cand, t, w_item, w_ts, scores)
        # Training stores the raw features as float32 (`_ranking_table`); the normaliser
        # reads them back as float64, so the served values take the same rounding.
        dense = self.normalizer.transform(
            {name: raw[name].astype(np.float32).astype(np.float64) for name in self.raw}
        )

        # The seed, region and device are the request's: the same on every row.
        seed = int(cols.rank_id[w_item[-1]]) if before else 0
        same = {"seed": seed, "region": region, "device": device}
        shared: dict[str, int] = {}
        rows: dict[str, np.ndarray] = {}
        for name in self.categorical:
            if name in same:
                shared[name] = int(same[name])
            elif name == "source":
                rows[name] = self._source_vocab_ids(sources, c)
            else:
                rows[name] = cols.per_item(name)[cand]
        bag_values = {
            "history": cols.rank_id[w_item[max(0, before - self.config.history_n) :]],
            "search": self._search_tokens(events, q_ts, t),
        }
        bags: dict[str, np.ndarray] = {}
        for name in self.bags:
            values = bag_values[name]
            bags[name] = values[values != 0]  # OOV ids are dropped from bags, as in training
        return RequestFeatures(tuple(self.categorical), shared, rows, bags, dense)

    def _raw_features(
        self,
        cols: _ItemColumns,
        events: UserEvents,
        cand: np.ndarray,
        t: int,
        w_item: np.ndarray,
        w_ts: np.ndarray,
        scores: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Every raw continuous feature of the candidates ([C] float64, NaN = missing),
        given the user's watches before t (`w_item`, `w_ts`, oldest first): the formulas
        of `ranking_examples._ranking_raw` for one user at one time."""
        c, before = len(cand), len(w_item)
        nan = np.full(c, np.nan)
        raw: dict[str, np.ndarray] = {
            "user_prior_watches": np.full(c, float(before)),
            "user_last_watch_ago_s": np.full(c, float(t - w_ts[-1]) if before else np.nan),
        }
        for name, key in (("channel", cols.channel_key), ("topic", cols.topic_key)):
            if key is None:
                raw[f"{name}_watches"], raw[f"{name}_last_watch_ago_s"] = nan, nan.copy()
                continue
            k = key[cand]
            count, ago = _counts_before(key[w_item], w_ts, k, t)
            valid = k > 0  # 0: the item has no channel (topic); its features are missing
            raw[f"{name}_watches"] = np.where(valid, count, np.nan)
            raw[f"{name}_last_watch_ago_s"] = np.where(valid, ago, np.nan)
        raw["item_watched_before"], _ = _counts_before(w_item, w_ts, cand, t)
        # Churn: the times shown before this request, the last of them no later than t - 1
        # (missing times: the user's latest event), as `_impressions` lays them out.
        latest = max([*events.history_ts, *events.queries_ts], default=t - 1)
        shown = np.maximum(_by_key(events.shown, cand, 0), 0)
        shown_at = np.minimum(_by_key(events.shown_ts, cand, latest), t - 1)
        raw["item_shown_before"] = shown.astype(np.float64)
        raw["item_last_shown_ago_s"] = np.where(shown > 0, (t - shown_at).astype(np.float64), nan)
        raw["item_prior_watches"] = self.items.watches[cand].astype(np.float64)
        upload, duration = self.items.upload_ts, self.items.duration
        raw["item_age_s"] = np.maximum(t - upload[cand], 0.0) if upload is not None else nan
        raw["duration_s"] = duration[cand] if duration is not None else nan
        if self.uses_score:
            raw[CANDIDATE_SCORE] = nan if scores is None else np.asarray(scores, np.float64)
        return raw

    def _check_items(self, *ids: np.ndarray) -> None:
        lo = min((int(a.min()) for a in ids if a.size), default=1)
        hi = max((int(a.max()) for a in ids if a.size), default=1)
        if lo < 1 or hi > self.items.num_items:
            bad = lo if lo < 1 else hi
            raise FunnelrecError(f"ranking features: item id {bad} is not in the corpus")

    def _search_tokens(self, events: UserEvents, q_ts: np.ndarray, t: int) -> np.ndarray:
        """Token ids of the user's last `search_n` queries before t (oldest first)."""
        order = np.argsort(q_ts, kind="stable")
        end = int(np.searchsorted(q_ts[order], t, side="left"))
        picked = [events.queries[i] for i in order[max(0, end - self.config.search_n) : end]]
        if not picked:
            return np.zeros(0, dtype=np.int64)
        tokens, _ = tokenize_array(pa.array(picked, type=pa.string()))
        return self.token.lookup(tokens).astype(np.int64)

    def _source_vocab_ids(self, sources: Sequence[str | None] | None, c: int) -> np.ndarray:
        """Vocabulary ids of the candidates' sources (a handful of distinct names, each
        looked up once and remembered)."""
        assert self.source is not None
        if sources is None:
            sources = [None] * c
        known = self._source_ids
        for s in set(sources) - known.keys():
            known[s] = int(self.source.lookup(pa.array([s], type=pa.string()))[0])
        return np.fromiter(map(known.__getitem__, sources), dtype=np.int64, count=c)

    def reference_batch(
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
        """`batch` by the training code itself (`_ranking_table`, `_request_table`; see the
        module doc): slower, and the reference the direct path is tested against."""
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


def _counts_before(
    keys: np.ndarray, times: np.ndarray, queries: np.ndarray, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many events have its key, and t minus the latest of their times (NaN
    when none), both float64. Events are in time order (`times` ascending)."""
    order = np.argsort(keys, kind="stable")  # stable: each key's events stay in time order
    k, ts = keys[order], times[order]
    hi = np.searchsorted(k, queries, side="right")
    count = hi - np.searchsorted(k, queries, side="left")
    if not len(ts):
        return count.astype(np.float64), np.full(len(queries), np.nan)
    last = ts[np.maximum(hi - 1, 0)]
    return count.astype(np.float64), np.where(count > 0, (t - last).astype(np.float64), np.nan)


@dataclass(frozen=True, eq=False)
class _ItemColumns:
    """Per-item inputs of the direct path, [N + 1] over the corpus (row 0 unused).

    rank_id:     `rank_item` vocabulary id of the item
    channel_id, topic_id: vocabulary ids of its channel and topic (None: no such feature)
    channel_key, topic_key: what "watches of this channel (topic)" groups by, 0 = none
    """

    rank_id: np.ndarray
    channel_id: np.ndarray | None
    topic_id: np.ndarray | None
    channel_key: np.ndarray | None
    topic_key: np.ndarray | None

    _growth: GrowingColumns | None = field(default=None, repr=False)

    def extended(self, f: RankingFeaturizer, old: int) -> _ItemColumns:
        """These columns for `f.items`, which extends the corpus of items 1..`old` that
        they cover: the new items' ids looked up alone (see `ServingItems.extended`)."""
        items = f.items
        grow = self._growth
        if grow is None or not grow.holds(self):
            grow = GrowingColumns.of(self, ("rank_id", "channel_id", "topic_id"))
        new = np.arange(old + 1, items.num_items + 1, dtype=np.int64)
        channel_id = topic_id = None
        if self.channel_id is not None:
            assert items.channel is not None and f.channel is not None  # as `of` found
            ch = items.channel[new]
            ids = f.channel.lookup(pa.array(ch, mask=ch == 0)).astype(np.int64)
            channel_id = grow.append("channel_id", ids)
        if self.topic_id is not None:
            assert items.topic is not None and f.topic is not None
            topics = items.topic.slice(old + 1)
            ids = f.topic.lookup(topics).astype(np.int64)
            topic_id = grow.append("topic_id", ids)
        return _ItemColumns(
            rank_id=grow.append("rank_id", f.rank_item.lookup(new).astype(np.int64)),
            channel_id=channel_id,
            topic_id=topic_id,
            channel_key=items.channel,
            topic_key=items.topic_code,
            _growth=grow,
        )

    def per_item(self, name: str) -> np.ndarray:
        """The vocabulary ids of categorical feature `name` ("item", "channel", "topic")."""
        ids = {"item": self.rank_id, "channel": self.channel_id, "topic": self.topic_id}[name]
        assert ids is not None  # `of` serves no spec that asks for a missing one
        return ids

    @classmethod
    def of(cls, f: RankingFeaturizer) -> _ItemColumns | None:
        """The columns for featurizer `f`, or None when its spec asks for a feature the
        direct path does not compute (it is then served by the training code)."""
        items = f.items
        channel, topic = items.channel, items.topic
        needs = set(f.categorical)
        if (
            not needs <= {"item", "seed", "region", "device", "channel", "topic", "source"}
            or not set(f.bags) <= {"history", "search"}
            or not set(f.raw) <= {*RANKING_CONTINUOUS, CANDIDATE_SCORE}
            or ("channel" in needs and (f.channel is None or channel is None))
            or ("topic" in needs and (f.topic is None or topic is None))
            or ("source" in needs and f.source is None)
            # The training code codes channels densely from 0 up; a negative channel id
            # would shift which code means "none", a case left to it.
            or (channel is not None and bool((channel < 0).any()))
        ):
            return None
        every = np.arange(items.num_items + 1, dtype=np.int64)
        channel_id = topic_id = None
        if f.channel is not None and channel is not None:
            channel_id = f.channel.lookup(pa.array(channel, mask=channel == 0)).astype(np.int64)
        if f.topic is not None and topic is not None:
            topic_id = f.topic.lookup(topic).astype(np.int64)
        return cls(
            rank_id=f.rank_item.lookup(every).astype(np.int64),
            channel_id=channel_id,
            topic_id=topic_id,
            channel_key=channel,
            topic_key=items.topic_code,
        )
