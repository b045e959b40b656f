"""The funnel for data that logs only what users watched: candidate sources mixed, then
ranked by the ranking network (Covington et al. 2016, sections 2 and 4).

Sequence data (MovieLens, Amazon reviews, a shop's purchases) has no impressions, so the
ranker learns from pages staged with the sources themselves: at a moment of a user's
history, the sources' candidates for the history before it make a page, and the item the
user took next is the page's one positive. Pages whose next item no source nominated are
dropped (nothing to order).

Sources, each good at something (section 2), united, with the history's items excluded:
- deep:    the candidate network's user vector against every item embedding, top `deep_k`
           (section 3; example age 0 at request time, section 3.3)
- cowatch: items watched right after the last few (`CoWatch`, section 3.4), top `cowatch_k`
- popular: the training window's most watched items, top `popular_k`

Features of a (request, candidate) pair, in the paper's spirit: "the user's past
interaction with the item itself and other similar items" (section 4.1):
- each source's score and rank for the candidate, whether or not that source nominated
  it (the deep dot product and the co-watch score exist for every item), and how many
  sources nominated it: scores that are not comparable across sources become inputs of
  one model that makes them comparable (section 2)
- co-occurrence of the candidate with each of the last `last_n` items separately, the
  most recent first: `CoWatch`'s normalised counts S[h_m, c] (the candidate taken after
  the item) and S[c, h_m] (taken before it: items bought together come in either order)
- its popularity, the history's length and, where the data has real times, the seconds
  since the user's last interaction
- categorical: the candidate and the last item, read from ONE shared item table but each
  fed in its own slice (section 4.1, "Embedding Categorical Features"), and the bag of the
  last `last_n` items
Continuous features are quantile-normalised with x^2 and sqrt(x) (section 4.1,
"Normalizing Continuous Features"), fitted on the training pages.

The network is `RankingModel` trained by logistic regression on the pages (every positive
weighs 1: sequence data has no watch time, so the watch-time weights of section 4.2 are
all equal), with the epoch chosen by the funnel's NDCG@10 on validation requests.

What the pages' sources are fitted on is the caller's choice and matters: a source fitted
on the very watches that become the pages' positives has seen each (history, next item)
pair, and a ranker trained on such pages learns to trust it far more than it deserves on
new requests. `funnelrec.ranking.sequence_fit` (`funnelrec train funnel`) fits the sources
on each user's history but the last two training items and stages the pages at those two
moments (docs/evaluation.md, "The funnel on sequence data").

    funnel = SequenceFunnel(sources, SequenceFunnelConfig())
    funnel.fit(train_requests, train_next, valid_requests, valid_next, progress=True)
    ids, scores = funnel.recommend(requests, k=10)       # [Q, 10] best first
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from funnelrec.baselines import CoWatch, Jagged
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import RankingBatch
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.progress import progress_bar
from funnelrec.ranking.model import IdSpace, RankingConfig, RankingFeatureSpec, RankingModel

DEEP, COWATCH, POPULAR = "deep", "cowatch", "popular"
UserVectors = Callable[[np.ndarray, Jagged], np.ndarray]  # (users [b], histories) -> [b, d]
NAN = float("nan")


@dataclass(frozen=True)
class SequenceFunnelConfig:
    """The sources' depths, the features and the ranker's training.

    deep_k, cowatch_k, popular_k: candidates nominated by each source (0 = source off)
    last_n:      co-occurrence features with each of the last `last_n` items, and the size
                 of the recent-items bag
    item_dim:    width of the shared item embedding of the candidate, the last item and
                 the recent items (0, the default: the ranker sees no item ids, only the
                 features above; on the real data sets measured, item ids let the ranker
                 memorise its pages' positives and validation got no better: docs/evaluation.md)
    tower:       the ranking network's hidden ReLU widths
    lr, batch_size: Adam's learning rate; rows (candidates) per step, whole pages
    loss:        "logistic": each candidate a positive or a negative, weight 1 (section 4.2
                 with every watch time equal); "softmax": the page's positive against the
                 page's other candidates (a listwise alternative: each page has one
                 positive, and only the order within a page is served)
    max_epochs, patience: training stops when validation NDCG@10 has not improved for
                 `patience` epochs, keeping the best epoch's weights
    valid_max:   validation requests scored after each epoch: a seeded sample of this
                 many when there are more (None: all); NDCG@10 over ten thousand requests
                 is precise enough to pick an epoch, and scoring them all each epoch
                 costs more than the epoch's training
    chunk:       requests whose candidates are built at once (bounds memory: a few dense
                 [chunk, N] score matrices)
    seed:        initialisation and row shuffling
    """

    deep_k: int = 100
    cowatch_k: int = 100
    popular_k: int = 50
    last_n: int = 5
    item_dim: int = 0
    tower: tuple[int, ...] = (256,)
    lr: float = 1e-3
    batch_size: int = 4096
    loss: Literal["logistic", "softmax"] = "logistic"
    max_epochs: int = 30
    patience: int = 2
    valid_max: int | None = 10_000
    chunk: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("deep_k", "cowatch_k", "popular_k"):
            if getattr(self, name) < 0:
                raise FunnelrecError(f"sequence funnel: {name} must be >= 0")
        if self.deep_k + self.cowatch_k + self.popular_k < 1:
            raise FunnelrecError("sequence funnel: every source is off (all depths 0)")
        if self.item_dim < 0:
            raise FunnelrecError("sequence funnel: item_dim must be >= 0 (0: no item ids)")
        if self.valid_max is not None and self.valid_max < 1:
            raise FunnelrecError("sequence funnel: valid_max must be >= 1 (or none)")
        for name in ("last_n", "batch_size", "max_epochs", "patience", "chunk"):
            if getattr(self, name) < 1:
                raise FunnelrecError(f"sequence funnel: {name} must be >= 1")
        if self.loss not in ("logistic", "softmax"):
            raise FunnelrecError(
                f"sequence funnel: loss must be logistic or softmax, got {self.loss!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FunnelrecError(f"sequence funnel: lr must be > 0, got {self.lr}")
        object.__setattr__(self, "tower", tuple(int(w) for w in self.tower))


@dataclass
class Sources:
    """The fitted candidate sources over items 1..num_items.

    cowatch:      a fitted `CoWatch` (its `last_n` sets the co-watch score's history)
    popularity:   [N + 1] training watch counts (entry 0 ignored)
    deep_users:   (users, histories) -> user vectors [b, d]; None: no deep source
    deep_items:   [N + 1, d] item vectors (rows of items the model does not know are 0)
    deep_known:   [N + 1] whether the deep model knows each item (others never nominated)
    topic:        [N + 1] each item's category code (0: none), where the data has them
    """

    num_items: int
    cowatch: CoWatch
    popularity: np.ndarray
    deep_users: UserVectors | None = None
    deep_items: np.ndarray | None = None
    deep_known: np.ndarray | None = None
    topic: np.ndarray | None = None

    def __post_init__(self) -> None:
        n1 = self.num_items + 1
        if self.topic is not None:
            self.topic = np.asarray(self.topic, dtype=np.int64)
            if self.topic.shape != (n1,) or (self.topic < 0).any():
                raise FunnelrecError(
                    f"sequence funnel: topic must be [{n1}] codes >= 0 (0: none), got shape "
                    f"{self.topic.shape}"
                )
        if self.cowatch.num_items != self.num_items:
            raise FunnelrecError(
                f"sequence funnel: co-watch knows {self.cowatch.num_items} items, the "
                f"sources {self.num_items}"
            )
        self.popularity = np.asarray(self.popularity, dtype=np.float64)
        if self.popularity.shape != (n1,):
            raise FunnelrecError(
                f"sequence funnel: popularity has shape {self.popularity.shape}, expected ({n1},)"
            )
        if (self.deep_users is None) != (self.deep_items is None):
            raise FunnelrecError("sequence funnel: deep_users and deep_items go together")
        if self.deep_items is not None:
            self.deep_items = np.ascontiguousarray(self.deep_items, dtype=np.float32)
            if self.deep_items.ndim != 2 or self.deep_items.shape[0] != n1:
                raise FunnelrecError(
                    f"sequence funnel: deep_items has shape {self.deep_items.shape}, "
                    f"expected ({n1}, d)"
                )
            known = (
                np.abs(self.deep_items).sum(axis=1) > 0
                if self.deep_known is None
                else np.asarray(self.deep_known, dtype=bool)
            )
            known[0] = False
            self.deep_known = known


@dataclass
class Requests:
    """Q requests: who asks, what they watched before (oldest first), and when.

    users:      [Q] user ids (passed to the deep source)
    history:    Jagged [Q] item ids 1..N
    since_last: [Q] seconds between the last history item and the request (NaN: unknown),
                or None when the data has no real times
    """

    users: np.ndarray
    history: Jagged
    since_last: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.users.size)

    def subset(self, idx: np.ndarray) -> Requests:
        """The requests `idx` (indices), in that order."""
        lo, hi = self.history.offsets[idx], self.history.offsets[idx + 1]
        n = hi - lo
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(n, out=offsets[1:])
        at = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - lo, n)
        since = None if self.since_last is None else self.since_last[idx]
        return Requests(self.users[idx], Jagged(self.history.values[at], offsets), since)

    def rows(self, lo: int, hi: int) -> Requests:
        a, b = int(self.history.offsets[lo]), int(self.history.offsets[hi])
        h = Jagged(self.history.values[a:b], self.history.offsets[lo : hi + 1] - a)
        since = None if self.since_last is None else self.since_last[lo:hi]
        return Requests(self.users[lo:hi], h, since)


@dataclass
class Pool:
    """The candidates of Q requests, flattened: row r is candidate `item[r]` of request
    `query[r]` (rows grouped by request); raw features by name; per request its last item
    and recent-items bag [Q, last_n] (0 = padding)."""

    query: np.ndarray
    item: np.ndarray
    raw: dict[str, np.ndarray]
    last_item: np.ndarray
    recent: np.ndarray

    def __len__(self) -> int:
        return int(self.item.size)

    def select(self, queries: np.ndarray) -> Pool:
        """The pool of the requests `queries` (sorted indices), renumbered 0..len-1."""
        keep = np.isin(self.query, queries)
        renumber = np.full(self.last_item.size, -1, dtype=np.int64)
        renumber[queries] = np.arange(queries.size)
        return Pool(
            renumber[self.query[keep]],
            self.item[keep],
            {k: v[keep] for k, v in self.raw.items()},
            self.last_item[queries],
            self.recent[queries],
        )

    @staticmethod
    def concat(pools: list[Pool]) -> Pool:
        shift = np.cumsum([0] + [p.last_item.size for p in pools[:-1]])
        return Pool(
            np.concatenate([p.query + s for p, s in zip(pools, shift, strict=True)]),
            np.concatenate([p.item for p in pools]),
            {k: np.concatenate([p.raw[k] for p in pools]) for k in pools[0].raw},
            np.concatenate([p.last_item for p in pools]),
            np.concatenate([p.recent for p in pools]),
        )


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the k best columns ([b, k] ids, best first) and their scores; columns
    scored -inf come back as id 0."""
    k = min(k, scores.shape[1] - 1)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1)
    ids[~np.isfinite(vals)] = 0
    return ids, vals


def _rank_of(pool_key: np.ndarray, ids: np.ndarray, n1: int) -> np.ndarray:
    """Rank (0 = best) of each pool key (query * n1 + item) in a source's list ids [b, k]
    (0 = empty), NaN where the source did not nominate it."""
    b, k = ids.shape
    key = (np.arange(b)[:, None] * n1 + ids).ravel()
    rank = np.tile(np.arange(k, dtype=np.float64), b)
    ok = ids.ravel() > 0
    key, rank = key[ok], rank[ok]
    out = np.full(pool_key.size, np.nan)
    if key.size:
        order = np.argsort(key, kind="stable")
        key, rank = key[order], rank[order]
        pos = np.minimum(np.searchsorted(key, pool_key), key.size - 1)
        found = key[pos] == pool_key
        out[found] = rank[pos[found]]
    return out


@dataclass
class Staged:
    """A ranker's training data: the pages (pool rows, labels, normalised features), the
    validation pools and next items, and what made them."""

    pool: Pool
    label: np.ndarray
    dense: np.ndarray
    vpool: Pool
    vdense: np.ndarray
    valid_next: np.ndarray
    requests: int
    normalizer: QuantileNormalizer
    sources: Sources
    times: bool


class SequenceFunnel:
    """Candidates from the sources, features of each, and the ranking network over them."""

    def __init__(self, sources: Sources, config: SequenceFunnelConfig | None = None) -> None:
        self.sources = sources
        self.config = config or SequenceFunnelConfig()
        self.normalizer: QuantileNormalizer | None = None
        self.model: RankingModel | None = None
        self.times = False  # whether the requests carry since_last
        self.summary: dict[str, Any] = {}

    # -- candidates and their features -------------------------------------------------

    def feature_names(self) -> list[str]:
        names = ["deep_score", "deep_rank", "cowatch_score", "cowatch_rank", "popular_rank"]
        names += [f"cooc_{m}" for m in range(1, self.config.last_n + 1)]
        names += [f"cooc_before_{m}" for m in range(1, self.config.last_n + 1)]
        names += ["popularity", "sources", "history_len"]
        if self.sources.topic is not None:
            names.append("topic_share")
        return names + (["since_last_s"] if self.times else [])

    def pool(self, req: Requests, *, progress: str = "") -> Pool:
        """Every request's candidates and their raw features (chunk by chunk)."""
        chunks = []
        bar = progress_bar("requests", enabled=bool(progress), transient=True)
        with bar:
            task = bar.add_task(progress or "candidates", total=len(req))
            for lo in range(0, len(req), self.config.chunk):
                hi = min(len(req), lo + self.config.chunk)
                chunks.append(self._pool_chunk(req.rows(lo, hi)))
                bar.advance(task, hi - lo)
        if not chunks:
            raise FunnelrecError("sequence funnel: no requests")
        return Pool.concat(chunks)

    def _pool_chunk(self, req: Requests) -> Pool:
        cfg, src = self.config, self.sources
        n1 = src.num_items + 1
        b = len(req)
        h = req.history
        rows = np.repeat(np.arange(b), np.diff(h.offsets))
        seen = np.zeros((b, n1), dtype=bool)
        seen[rows, h.values] = True
        seen[:, 0] = True

        lists: dict[str, np.ndarray] = {}
        deep = None
        if src.deep_users is not None and src.deep_items is not None and cfg.deep_k:
            u = np.asarray(src.deep_users(req.users, h), dtype=np.float32)
            deep = u @ src.deep_items.T
            assert src.deep_known is not None
            masked = np.where(seen | ~src.deep_known[None, :], -np.inf, deep)
            lists[DEEP] = _top(masked, cfg.deep_k)[0]
        co = np.asarray(src.cowatch.score(h), dtype=np.float64)
        if cfg.cowatch_k:
            masked = np.where(seen | (co <= 0), -np.inf, co)
            lists[COWATCH] = _top(masked, cfg.cowatch_k)[0]
        if cfg.popular_k:
            pop = np.broadcast_to(src.popularity, (b, n1))
            lists[POPULAR] = _top(np.where(seen, -np.inf, pop), cfg.popular_k)[0]

        ids = np.concatenate(list(lists.values()), axis=1)
        key = (np.arange(b)[:, None] * n1 + ids)[ids > 0]
        key = np.unique(key)
        query, item = key // n1, key % n1

        raw: dict[str, np.ndarray] = {}
        raw["deep_score"] = (
            deep[query, item].astype(np.float64) if deep is not None else np.full(key.size, NAN)
        )
        if src.deep_known is not None:
            raw["deep_score"][~src.deep_known[item]] = NAN
        nominated = np.zeros(key.size)
        for name in (DEEP, COWATCH, POPULAR):
            r = _rank_of(key, lists[name], n1) if name in lists else np.full(key.size, NAN)
            raw[f"{name}_rank"] = r
            nominated += np.isfinite(r)
        raw["cowatch_score"] = co[query, item]
        back = h.from_end()  # 1 = the last item
        recent = np.zeros((b, cfg.last_n), dtype=np.int64)
        sel = back <= cfg.last_n
        recent[rows[sel], back[sel] - 1] = h.values[sel]
        for m in range(1, cfg.last_n + 1):
            hm = recent[query, m - 1]
            raw[f"cooc_{m}"] = np.where(hm > 0, self._cooc(hm, item), NAN)
            # and the other way: the candidate taken before that item
            raw[f"cooc_before_{m}"] = np.where(hm > 0, self._cooc(item, hm), NAN)
        raw["popularity"] = src.popularity[item]
        raw["sources"] = nominated
        lens = np.diff(h.offsets).astype(np.float64)
        raw["history_len"] = lens[query]
        if src.topic is not None:
            raw["topic_share"] = _topic_share(src.topic, h, rows, query, item, lens)
        if self.times:
            since = req.since_last if req.since_last is not None else np.full(b, NAN)
            raw["since_last_s"] = np.asarray(since, dtype=np.float64)[query]
        return Pool(query, item, raw, recent[:, 0].copy(), recent)

    def _cooc(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Co-watch's S[rows, cols] elementwise (0 where absent)."""
        return np.asarray(self.sources.cowatch.sim[rows, cols], dtype=np.float64).ravel()

    # -- the ranking network -----------------------------------------------------------

    def _spec(self) -> RankingFeatureSpec:
        assert self.normalizer is not None
        ids = self.config.item_dim > 0
        return RankingFeatureSpec(
            id_spaces=(
                (IdSpace("item", self.sources.num_items + 1, self.config.item_dim),) if ids else ()
            ),
            categorical=(("item_id", "item"), ("last_item", "item")) if ids else (),
            bags=(("recent_items", "item"),) if ids else (),
            dense_columns=tuple(self.normalizer.output_columns),
            power_columns=tuple(self.normalizer.power_columns),
        )

    def new_model(self) -> RankingModel:
        """An untrained ranking network for this funnel's features (fitted normaliser)."""
        return RankingModel(self._spec(), RankingConfig(tower=self.config.tower, objective="ctr"))

    def _dense(self, pool: Pool) -> np.ndarray:
        assert self.normalizer is not None
        return self.normalizer.transform({k: pool.raw[k] for k in self.feature_names()})

    def _batches(
        self,
        pool: Pool,
        dense: np.ndarray,
        rows: np.ndarray,
        label: np.ndarray | None,
        cuts: np.ndarray | None = None,
    ) -> Iterator[RankingBatch]:
        """Batches of `rows`, cut every batch_size rows or at `cuts` (positions in rows)."""
        n_recent = self.config.last_n
        if cuts is None:
            cuts = np.arange(0, rows.size, self.config.batch_size)
        bounds = np.append(cuts, rows.size)
        for lo, hi in itertools.pairwise(bounds):
            r = rows[lo:hi]
            q = pool.query[r]
            y = (
                torch.from_numpy(label[r].astype(np.float32))
                if label is not None
                else torch.zeros(r.size)
            )
            yield RankingBatch(
                categorical={
                    "item_id": torch.from_numpy(pool.item[r]),
                    "last_item": torch.from_numpy(pool.last_item[q]),
                },
                bags={
                    "recent_items": (
                        torch.from_numpy(pool.recent[q].ravel()),
                        torch.arange(0, r.size * n_recent, n_recent, dtype=torch.int64),
                    )
                },
                dense=torch.from_numpy(dense[r]),
                label=y,
                watch_time=y.clone(),
                user_id=torch.from_numpy(q),
                request_id=torch.from_numpy(q),
            )

    def _logits(self, pool: Pool, dense: np.ndarray | None = None) -> np.ndarray:
        assert self.model is not None
        dense = self._dense(pool) if dense is None else dense
        out = np.empty(len(pool), dtype=np.float64)
        self.model.eval()
        rows = np.arange(len(pool))
        with torch.no_grad():
            lo = 0
            for batch in self._batches(pool, dense, rows, None):
                z = self.model(batch).double().numpy()
                out[lo : lo + z.size] = z
                lo += z.size
        return out

    def fit(
        self,
        train: Requests,
        train_next: np.ndarray,
        valid: Requests,
        valid_next: np.ndarray,
        *,
        valid_sources: Sources | None = None,
        progress: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> SequenceFunnel:
        """Train the ranker on pages at the `train` requests (positive: `train_next` [Q],
        the item each user took next); the epoch is chosen by the funnel's NDCG@10 on
        the `valid` requests and their next items, served by `valid_sources` (default:
        the pages' sources; afterwards the funnel serves with them)."""
        started = time.perf_counter()
        staged = self.stage(
            train, train_next, valid, valid_next, valid_sources=valid_sources, progress=progress
        )
        return self.fit_staged(staged, on_epoch=on_epoch, started=started)

    def stage(
        self,
        train: Requests,
        train_next: np.ndarray,
        valid: Requests,
        valid_next: np.ndarray,
        *,
        valid_sources: Sources | None = None,
        progress: bool = False,
    ) -> Staged:
        """The pages and validation pools `fit` trains on (see `fit`); a `Staged` serves
        rankers of other settings of the network and its training (not of the sources or
        features) without building the pools again."""
        cfg = self.config
        self.times = train.since_last is not None
        train_next = np.asarray(train_next, dtype=np.int64)
        valid_next = np.asarray(valid_next, dtype=np.int64)
        if train_next.shape != (len(train),) or valid_next.shape != (len(valid),):
            raise FunnelrecError("sequence funnel: one next item per request expected")

        pool = self.pool(train, progress="pages" if progress else "")
        label = pool.item == train_next[pool.query]
        with_pos = np.unique(pool.query[label])
        if with_pos.size == 0:
            raise FunnelrecError(
                "sequence funnel: no source nominated any page's next item: nothing to learn"
            )
        pool = pool.select(with_pos)  # pages without a positive have nothing to order
        label = pool.item == train_next[with_pos][pool.query]
        self.normalizer = QuantileNormalizer.fit(
            {k: pool.raw[k] for k in self.feature_names()},
            nullable=self.feature_names(),
            seed=cfg.seed,
        )
        dense = self._dense(pool)
        if valid_sources is not None:
            self.sources = valid_sources
        if cfg.valid_max is not None and len(valid) > cfg.valid_max:
            keep = np.sort(
                np.random.default_rng(cfg.seed).choice(len(valid), cfg.valid_max, replace=False)
            )
            valid, valid_next = valid.subset(keep), valid_next[keep]
        vpool = self.pool(valid, progress="validation requests" if progress else "")
        return Staged(
            pool, label, dense, vpool, self._dense(vpool), valid_next, len(train),
            self.normalizer, self.sources, self.times,
        )  # fmt: skip

    def fit_staged(
        self,
        staged: Staged,
        *,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        started: float | None = None,
    ) -> SequenceFunnel:
        """Train the ranker on staged pages (`stage`), keeping the best validation epoch."""
        cfg = self.config
        started = time.perf_counter() if started is None else started
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        pool, label, dense = staged.pool, staged.label, staged.dense
        vpool, vdense, valid_next = staged.vpool, staged.vdense, staged.valid_next
        self.normalizer, self.sources, self.times = staged.normalizer, staged.sources, staged.times
        model = self.new_model()
        base = float(label.mean())
        model.set_output_bias(math.log(base / (1 - base)))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        best, best_state, best_epoch, bad = -1.0, None, 0, 0
        history: list[dict[str, Any]] = []
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            # whole pages per step, in a new order each epoch (the softmax loss needs a
            # page's rows together; the logistic one does not mind)
            rows, cuts = _page_rows(
                pool.query, rng.permutation(int(pool.query[-1]) + 1), cfg.batch_size
            )
            total, steps = 0.0, 0
            for batch in self._batches(pool, dense, rows, label, cuts):
                opt.zero_grad(set_to_none=True)
                if cfg.loss == "softmax":
                    loss = page_softmax_loss(model(batch), batch.label, batch.request_id)
                else:
                    loss = model.compute_loss(batch)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            self.model = model
            metrics = self._metrics(vpool, self._logits(vpool, vdense), valid_next)
            rec = {
                "epoch": epoch,
                "loss": total / max(steps, 1),
                **{f"valid {k}": v for k, v in metrics.items()},
                "seconds": time.perf_counter() - t0,
            }
            history.append(rec)
            if on_epoch is not None:
                on_epoch(rec)
            if metrics["ndcg@10"] > best:
                best, best_epoch, bad = metrics["ndcg@10"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        assert best_state is not None
        model.load_state_dict(best_state)
        model.eval()
        self.model = model
        self.summary = {
            "config": asdict(self.config),
            "pages": int(pool.last_item.size),
            "requests": staged.requests,
            "page_rows": len(pool),
            "mean_candidates_valid": len(vpool) / max(valid_next.size, 1),
            "best_epoch": best_epoch,
            "epochs": len(history),
            "best_valid_ndcg@10": best,
            # each source's own order of the same validation pools: what the ranker adds
            "valid_by_source": {
                name: self._metrics(
                    vpool, -np.nan_to_num(vpool.raw[f"{name}_rank"], nan=1e9), valid_next
                )
                for name in (DEEP, COWATCH, POPULAR)
            },
            "history": history,
            "fit_seconds": time.perf_counter() - started,
        }
        return self

    @staticmethod
    def _metrics(pool: Pool, logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """HR@10, NDCG@10 and the pool's hit rate of the pool ordered by `logits`."""
        q = target.size
        hit = pool.item == target[pool.query]
        rank = np.full(q, np.inf)
        if hit.any():
            tq = pool.query[hit]
            tz = logits[hit]
            # rank = candidates of the same request scored higher than the target
            higher = np.bincount(
                pool.query, weights=(logits > _target_logit(pool.query, tq, tz, q)), minlength=q
            )
            rank[tq] = higher[tq]
        in10 = rank < 10
        return {
            "hr@10": float(in10.mean()),
            "ndcg@10": float(np.where(in10, 1 / np.log2(np.minimum(rank, 1e9) + 2), 0).mean()),
            "pool_hit": float(np.isfinite(rank).mean()),
        }

    # -- serving -----------------------------------------------------------------------

    def recommend(self, req: Requests, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each request's top k ([Q, k] item ids, best first, 0 where the pool is smaller)
        and their logits (-inf in empty slots)."""
        if self.model is None:
            raise FunnelrecError("sequence funnel: not fitted")
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        ids = np.zeros((len(req), k), dtype=np.int64)
        vals = np.full((len(req), k), -np.inf)
        for lo in range(0, len(req), self.config.chunk):
            hi = min(len(req), lo + self.config.chunk)
            pool = self._pool_chunk(req.rows(lo, hi))
            z = self._logits(pool)
            order = np.lexsort((pool.item, -z, pool.query))
            q, it, zz = pool.query[order], pool.item[order], z[order]
            start = np.searchsorted(q, np.arange(hi - lo))
            place = np.arange(q.size) - start[q]
            keep = place < k
            ids[lo + q[keep], place[keep]] = it[keep]
            vals[lo + q[keep], place[keep]] = zz[keep]
        return ids, vals

    def describe(self) -> dict[str, Any]:
        return {"config": asdict(self.config), **self.summary}


def _topic_share(
    topic: np.ndarray,
    h: Jagged,
    rows: np.ndarray,
    query: np.ndarray,
    item: np.ndarray,
    lens: np.ndarray,
) -> np.ndarray:
    """The share of each request's history in its candidate's category (NaN for a
    candidate without one or an empty history): "the user's past interaction with ...
    similar items" (section 4.1)."""
    if h.values.size == 0:
        return np.full(item.size, NAN)
    t1 = int(topic.max()) + 1
    key, count = np.unique(rows * t1 + topic[h.values], return_counts=True)
    want = query * t1 + topic[item]
    pos = np.minimum(np.searchsorted(key, want), key.size - 1)
    share = np.where(key[pos] == want, count[pos], 0) / np.maximum(lens[query], 1)
    return np.where((topic[item] > 0) & (lens[query] > 0), share, NAN)


def _page_rows(
    query: np.ndarray, pages: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The row indices of `pages` (in that order) of a pool whose rows are grouped by
    request (`query` sorted), and where batches of about `batch_size` rows start: at page
    boundaries, so that no page is split."""
    start = np.searchsorted(query, pages)
    end = np.searchsorted(query, pages, side="right")
    n = end - start
    first = np.cumsum(n) - n  # each page's first position in the result
    rows = np.arange(int(n.sum())) - np.repeat(first, n) + np.repeat(start, n)
    batch_of = first // batch_size
    cuts = first[np.r_[True, batch_of[1:] != batch_of[:-1]]] if n.size else first
    return rows, cuts


def page_softmax_loss(logit: torch.Tensor, label: torch.Tensor, page: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's pages that hold a positive of -log softmax(page's logits) at
    the positive (pages come whole; a page's positives each count)."""
    _, idx = torch.unique(page, return_inverse=True)
    n = int(idx.max()) + 1 if idx.numel() else 0
    top = torch.full((n,), -torch.inf, dtype=logit.dtype).scatter_reduce(
        0, idx, logit.detach(), reduce="amax"
    )
    sums = torch.zeros(n, dtype=logit.dtype).index_add(0, idx, torch.exp(logit - top[idx]))
    lse = torch.log(sums) + top
    pos = label > 0.5
    if not bool(pos.any()):
        return logit.sum() * 0.0
    return (lse[idx[pos]] - logit[pos]).mean()


def _target_logit(query: np.ndarray, tq: np.ndarray, tz: np.ndarray, q: int) -> np.ndarray:
    """Each row's request's target logit (-inf where the request has no target)."""
    per = np.full(q, np.inf)
    per[tq] = tz
    return per[query]
