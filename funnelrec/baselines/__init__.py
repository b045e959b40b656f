"""Non-neural recommenders: candidate sources for serving and baselines for evaluation.

Every model here is fitted on a training interaction table only (columns user_id, item_id,
ts: a pyarrow table or a mapping of numpy arrays; ids are dataset ids, 1..N) and answers
in two ways:

    score(histories)          -> [B, N + 1] float32 scores over every item id, column 0
                                 (padding) -inf: full-corpus evaluation
    top_k(history, k, exclude) -> (item ids [<= k], scores): a candidate source at serving

Histories are each user's watched item ids, oldest first (0 = padding, ignored): a list
of arrays or a `Jagged` (flat values + [B + 1] offsets).

The models:
- `Popularity`: (time-windowed, time-decayed) watch counts up to a reference time, the
  same ranking for everyone; with `fresh_half_life_s` the "fresh and popular now" source,
  which boosts recently uploaded items (formula in the class docstring).
- `CoWatch`: asymmetric item-to-item counts, i -> j when j is watched within the next few
  watches after i, normalised into P(j follows | i), top-N neighbours per item; a user is
  scored from their last watch (the serving source) or their last few (a baseline).
- `ItemKNN`: cosine similarity of items' user sets, top-N neighbours per item (100 as in
  shared/BENCHMARKS.md), a user's score is the sum over their history's neighbours.
- `BPR`, `ALS`: matrix factorisation through the `implicit` library's CPU models.

Each saves to a directory (`baseline.json` with a format version + NPY arrays, written
atomically, no pickle) and `load_baseline(path)` reads any of them back.

    pop = Popularity(window_s=7 * 86400).fit(train, num_items=n)
    covisit = CoWatch(next_n=5, neighbours=100).fit(train, num_items=n)
    ids, scores = covisit.top_k(history=[12, 7, 40], k=100, exclude=[12, 7, 40])
    covisit.save(out / "cowatch"); load_baseline(out / "cowatch").score([[12, 7, 40]])
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from numpy.typing import ArrayLike

from funnelrec import __version__
from funnelrec.dataset import AtomicDirectory, write_json_atomic
from funnelrec.errors import ArtifactError, DataError, FunnelrecError

FORMAT_VERSION = 1
META = "baseline.json"

# ---------------------------------------------------------------------------------------
# Inputs: training interactions and histories


@dataclass(frozen=True)
class Interactions:
    """Training interactions sorted by (user, ts), ties in the given row order.

    user, item, ts: [E] int64 each; `start`: [U_max + 2] position of user u's first
    interaction (user ids index it directly).
    """

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray

    @classmethod
    def of(
        cls, train: pa.Table | Mapping[str, ArrayLike] | Interactions, *, need_ts: bool = True
    ) -> Interactions:
        """Validate and sort a table with columns user_id, item_id (and ts)."""
        if isinstance(train, Interactions):
            return train
        names = train.column_names if isinstance(train, pa.Table) else list(train)
        wanted = ["user_id", "item_id", *(["ts"] if need_ts else [])]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)}", path="training interactions")
        cols: dict[str, np.ndarray] = {}
        for c in ["user_id", "item_id", "ts"]:
            if c not in names:
                continue
            raw = train.column(c).to_numpy() if isinstance(train, pa.Table) else train[c]
            arr = np.asarray(raw)
            if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                raise DataError(
                    f"expected a 1-D integer array, got {arr.dtype} of shape {arr.shape}",
                    path="training interactions",
                    column=c,
                )
            cols[c] = arr.astype(np.int64, copy=False)
        n = cols["user_id"].size
        for c, arr in cols.items():
            if arr.size != n:
                raise DataError(
                    f"has {arr.size} values, user_id has {n}",
                    path="training interactions",
                    column=c,
                )
        if n == 0:
            raise DataError("no training interactions", path="training interactions")
        for c in ("user_id", "item_id"):
            bad = np.flatnonzero(cols[c] < 1)
            if bad.size:
                raise DataError(
                    f"id {cols[c][bad[0]]} is below 1",
                    path="training interactions",
                    column=c,
                    row=int(bad[0]) + 1,
                )
        ts = cols.get("ts", np.arange(n, dtype=np.int64))
        order = np.lexsort((ts, cols["user_id"]))  # stable: ties keep row order
        return cls(cols["user_id"][order], cols["item_id"][order], ts[order])

    def __len__(self) -> int:
        return int(self.user.size)


@dataclass(frozen=True)
class Jagged:
    """B variable-length rows of item ids: row b is values[offsets[b]:offsets[b + 1]].

    values: [M] int64, offsets: [B + 1] int64 (offsets[0] == 0, non-decreasing).
    Example: rows [3, 5] and [] -> values [3, 5], offsets [0, 2, 2].
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[ArrayLike]) -> Jagged:
        arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(values.astype(np.int64, copy=False), offsets)

    @classmethod
    def from_bag(cls, values: ArrayLike, starts: ArrayLike) -> Jagged:
        """From the EmbeddingBag form of `batch.CandidateBatch`: [B] start offsets."""
        v = np.asarray(values, dtype=np.int64).reshape(-1)
        s = np.asarray(starts, dtype=np.int64).reshape(-1)
        return cls(v, np.append(s, v.size))

    @classmethod
    def of(cls, histories: Histories) -> Jagged:
        j = histories if isinstance(histories, Jagged) else cls.from_rows(histories)
        if j.offsets.ndim != 1 or j.offsets.size < 1 or j.offsets[0] != 0:
            raise FunnelrecError("histories: offsets must start at 0")
        if np.any(np.diff(j.offsets) < 0) or j.offsets[-1] != j.values.size:
            raise FunnelrecError("histories: offsets must be non-decreasing and end at len(values)")
        return j

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    def rows(self) -> np.ndarray:
        """[M] the row of each value."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    def from_end(self) -> np.ndarray:
        """[M] 1 for the last value of its row, 2 for the one before, ..."""
        return self.offsets[self.rows() + 1] - np.arange(self.values.size, dtype=np.int64)


Histories = Sequence[ArrayLike] | Jagged


def _check_ids(ids: np.ndarray, num_items: int, what: str) -> None:
    bad = (ids < 0) | (ids > num_items)
    if bad.any():
        raise FunnelrecError(
            f"{what}: item id {int(ids[bad][0])} is outside the model's items 0..{num_items}"
        )


def _history_matrix(h: Jagged, weights: np.ndarray, num_items: int) -> sp.csr_matrix:
    """[B, N + 1] sparse matrix of per-(row, item) weights (duplicates summed, 0s dropped)."""
    keep = (h.values > 0) & (weights != 0)
    m = sp.csr_matrix(
        (weights[keep].astype(np.float32), (h.rows()[keep], h.values[keep])),
        shape=(len(h), num_items + 1),
    )
    m.sum_duplicates()
    return m


# ---------------------------------------------------------------------------------------
# The shared interface


class Baseline:
    """What every model here offers; subclasses fill in `_fit`, `score` and the arrays."""

    kind: ClassVar[str]
    # top_k returns only items scoring above this (count models: no evidence = 0).
    min_candidate_score: ClassVar[float] = 0.0

    def __init__(self) -> None:
        self.num_items = 0
        self.fit_seconds = 0.0
        self._fitted = False

    # -- configuration, saved with the model
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        """An unfitted model of the configuration `config()` returned."""
        return cls(**config)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise FunnelrecError(f"{type(self).__name__} is not fitted (call fit first)")

    def _n(self, train: Interactions, num_items: int | None) -> int:
        top = int(train.item.max())
        if num_items is not None and num_items < top:
            raise DataError(
                f"item id {top} in training data is above num_items={num_items}",
                path="training interactions",
                column="item_id",
            )
        return int(num_items) if num_items is not None else top

    def score(self, histories: Histories, **kwargs: Any) -> np.ndarray:
        """[B, N + 1] float32 scores of every item for each history; column 0 is -inf."""
        raise NotImplementedError

    def top_k(
        self,
        history: ArrayLike,
        k: int,
        exclude: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best k items for one history: (item ids [<= k] int64, scores float32),
        best first, ties by smaller id; excluded ids and items without evidence (score not
        above `min_candidate_score`) are left out, so fewer than k may come back."""
        self._check_fitted()
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        s = self.score([np.asarray(history, dtype=np.int64).reshape(-1)], **kwargs)[0]
        return _top_of(s, k, exclude, self.min_candidate_score, self.num_items)

    # -- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        return {}

    def save(self, path: Path | str, *, force: bool = False) -> Path:
        """Write the model to directory `path` atomically (temporary name, then rename)."""
        self._check_fitted()
        d = AtomicDirectory(Path(path), force=force)
        try:
            names = {}
            for name, arr in self._arrays().items():
                np.save(d.tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
                names[name] = f"{name}.npy"
            meta = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "created_by": f"funnelrec {__version__}",
                "config": self.config(),
                "num_items": self.num_items,
                "fit_seconds": self.fit_seconds,
                "arrays": names,
                **self._meta(),
            }
            write_json_atomic(d.tmp / META, meta)
            return d.commit()
        except BaseException:
            d.abort()
            raise

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Read a model saved by `save`; the directory must hold this class's kind."""
        model = load_baseline(path)
        if not isinstance(model, cls):
            raise ArtifactError(f"{path}: holds a '{model.kind}' model, not '{cls.kind}'")
        return model


def _top_of(
    s: np.ndarray, k: int, exclude: ArrayLike | None, floor: float, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    s = s.copy()
    s[0] = -np.inf
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
        _check_ids(ex, num_items, "exclude")
        s[ex] = -np.inf
    ok = np.flatnonzero(s > floor)
    if ok.size > k:
        # the k-th best score; take everything above it, then the smallest ids among ties
        kth = np.partition(s[ok], ok.size - k)[ok.size - k]
        above = ok[s[ok] > kth]
        tied = ok[s[ok] == kth][: k - above.size]
        ok = np.concatenate([above, tied])
    order = np.lexsort((ok, -s[ok]))
    ids = ok[order]
    return ids.astype(np.int64), s[ids].astype(np.float32)


def _with_padding_column(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    scores[:, 0] = -np.inf
    return scores


# ---------------------------------------------------------------------------------------
# Popularity, and "fresh and popular now"


@dataclass(frozen=True)
class PopularityConfig:
    """window_s: count only watches in (now - window_s, now]; None = all up to now.
    half_life_s: a watch `a` seconds before now counts 0.5 ** (a / half_life_s); None = 1.
    fresh_half_life_s: set to make the "fresh and popular now" source (needs upload_ts).
    fresh_boost: how much a brand-new upload's score is multiplied by, minus 1.
    fresh_prior: pseudo-count added to every uploaded item in the fresh variant, so new
    items with no watches yet can still be nominated."""

    window_s: int | None = None
    half_life_s: float | None = None
    fresh_half_life_s: float | None = None
    fresh_boost: float = 3.0
    fresh_prior: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window_s", "half_life_s", "fresh_half_life_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise FunnelrecError(f"popularity: {name} must be positive or None, got {v}")
        if self.fresh_boost < 0 or self.fresh_prior < 0:
            raise FunnelrecError("popularity: fresh_boost and fresh_prior must be >= 0")


class Popularity(Baseline):
    """Items by (windowed, time-decayed) watch counts at a reference time `now`.

    count_i = sum over training watches w of item i with now - window_s < ts_w <= now of
              0.5 ** ((now - ts_w) / half_life_s)       (1 per watch without a half-life)

    "Fresh and popular now" (fresh_half_life_s set; fit needs each item's upload_ts):
        age_i   = now - upload_ts_i
        score_i = (count_i + prior) * (1 + boost * 0.5 ** (age_i / fresh_half_life_s))
    An item uploaded just now has its (smoothed) count multiplied by 1 + boost, one
    fresh_half_life_s old by 1 + boost / 2, an old one by ~1. Items with unknown
    upload_ts get no boost; items uploaded after `now` did not exist then and score 0.
    Without the fresh variant score_i = count_i. Scores do not depend on the history.
    """

    kind = "popularity"

    def __init__(
        self,
        window_s: int | None = None,
        half_life_s: float | None = None,
        *,
        fresh_half_life_s: float | None = None,
        fresh_boost: float = 3.0,
        fresh_prior: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg = PopularityConfig(
            window_s, half_life_s, fresh_half_life_s, fresh_boost, fresh_prior
        )
        self.scores_ = np.zeros(1, dtype=np.float32)
        self.now = 0

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
        *,
        now: int | None = None,
        upload_ts: ArrayLike | None = None,
    ) -> Self:
        """now: reference time (default: the last training ts). upload_ts: [N + 1] upload
        time per item id (entry 0 ignored; NaN = unknown), needed by
        the fresh variant."""
        started = time.perf_counter()
        cfg = self.cfg
        data = Interactions.of(train)
        n = self._n(data, num_items)
        now = int(data.ts.max()) if now is None else int(now)
        keep = data.ts <= now
        if cfg.window_s is not None:
            keep &= data.ts > now - cfg.window_s
        age = (now - data.ts[keep]).astype(np.float64)
        w = 0.5 ** (age / cfg.half_life_s) if cfg.half_life_s is not None else np.ones(age.size)
        counts = np.bincount(data.item[keep], weights=w, minlength=n + 1).astype(np.float64)
        if cfg.fresh_half_life_s is not None:
            if upload_ts is None:
                raise FunnelrecError("fresh popularity needs each item's upload_ts")
            up = np.asarray(upload_ts, dtype=np.float64).reshape(-1)
            if up.size != n + 1:
                raise DataError(f"upload_ts has {up.size} entries, expected N + 1 = {n + 1}")
            known = np.isfinite(up)
            item_age = np.where(known, now - np.where(known, up, 0), np.inf)
            boost = np.where(
                item_age >= 0, 1 + cfg.fresh_boost * 0.5 ** (item_age / cfg.fresh_half_life_s), 0
            )
            counts = (counts + cfg.fresh_prior) * boost
        counts[0] = -np.inf
        self.scores_ = counts.astype(np.float32)
        self.num_items, self.now = n, now
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def score(self, histories: Histories, **_: Any) -> np.ndarray:
        self._check_fitted()
        b = len(Jagged.of(histories))
        return np.broadcast_to(self.scores_, (b, self.num_items + 1)).copy()

    def top_k(
        self, history: ArrayLike, k: int, exclude: ArrayLike | None = None, **_: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        return _top_of(self.scores_, k, exclude, self.min_candidate_score, self.num_items)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores_}

    def _meta(self) -> dict[str, Any]:
        return {"now": self.now}

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        s = arrays["scores"]
        if s.shape != (self.num_items + 1,):
            raise ArtifactError(f"popularity scores of shape {s.shape}, expected N + 1")
        self.scores_ = s.astype(np.float32)
        self.now = int(meta.get("now", 0))


def upload_times(items: pa.Table, num_items: int | None = None) -> np.ndarray:
    """[N + 1] float64 upload_ts by item id (NaN: unknown) from an items table with
    columns item_id and upload_ts: the `upload_ts` argument of the fresh variant."""
    if "item_id" not in items.column_names or "upload_ts" not in items.column_names:
        raise DataError("items table needs columns item_id and upload_ts", path="items")
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    ts = items.column("upload_ts").to_numpy(zero_copy_only=False)
    n = max(int(ids.max()) if ids.size else 0, num_items or 0)
    out = np.full(n + 1, np.nan)
    out[ids] = np.asarray(ts, dtype=np.float64)  # nulls arrive as NaN
    return out


# ---------------------------------------------------------------------------------------
# Item-to-item neighbourhoods: co-watch and cosine kNN


class _Neighbours(Baseline):
    """A sparse [N + 1, N + 1] item -> item score matrix (top-N per row) and the weights
    of a history's items; a user's score = sum over history items h of w_h * S[h, :]."""

    def __init__(self) -> None:
        super().__init__()
        self.sim = sp.csr_matrix((1, 1), dtype=np.float32)

    def _weights(self, h: Jagged, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError

    def score(self, histories: Histories, **kwargs: Any) -> np.ndarray:
        self._check_fitted()
        h = Jagged.of(histories)
        _check_ids(h.values, self.num_items, "history")
        m = _history_matrix(h, self._weights(h, **kwargs), self.num_items)
        return _with_padding_column((m @ self.sim).toarray())

    def top_k(
        self, history: ArrayLike, k: int, exclude: ArrayLike | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        # Sparse: only the history items' neighbour rows are touched, never all N items.
        self._check_fitted()
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        h = Jagged.from_rows([np.asarray(history, dtype=np.int64).reshape(-1)])
        _check_ids(h.values, self.num_items, "history")
        row = _history_matrix(h, self._weights(h, **kwargs), self.num_items) @ self.sim
        row = row.tocsr()
        ids, vals = row.indices.astype(np.int64), row.data.astype(np.float32)
        dense = np.full(self.num_items + 1, -np.inf, dtype=np.float32)
        dense[ids] = vals
        if exclude is not None:
            ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
            _check_ids(ex, self.num_items, "exclude")
            dense[ex] = -np.inf
        good = ids[dense[ids] > self.min_candidate_score]
        order = np.lexsort((good, -dense[good]))[:k]
        return good[order], dense[good[order]]

    def neighbours(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """An item's kept neighbours: (ids, scores), best first."""
        self._check_fitted()
        _check_ids(np.array([item]), self.num_items, "item")
        lo, hi = self.sim.indptr[item], self.sim.indptr[item + 1]
        ids, vals = self.sim.indices[lo:hi].astype(np.int64), self.sim.data[lo:hi]
        order = np.lexsort((ids, -vals))
        return ids[order], vals[order]

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "indptr": self.sim.indptr.astype(np.int64),
            "indices": self.sim.indices.astype(np.int64),
            "data": self.sim.data.astype(np.float32),
        }

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        n1 = self.num_items + 1
        indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
        if (
            indptr.shape != (n1 + 1,)
            or indices.shape != data.shape
            or int(indptr[-1]) != indices.size
            or (indices.size and (indices.min() < 0 or indices.max() >= n1))
        ):
            raise ArtifactError(f"{self.kind}: neighbour matrix arrays do not fit {n1} items")
        self.sim = sp.csr_matrix((data, indices, indptr), shape=(n1, n1))


def top_n_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Keep each row's n largest entries (ties: smaller column first); drop zeros."""
    m = m.tocsr()
    m.eliminate_zeros()
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(order.size, dtype=np.int64) - m.indptr[rows[order]]
    keep = order[rank < n]
    out = sp.csr_matrix(
        (m.data[keep].astype(np.float32), (rows[keep], m.indices[keep])), shape=m.shape
    )
    out.sort_indices()
    return out


@dataclass(frozen=True)
class CoWatchConfig:
    """next_n: j counts as co-watched after i when it is among the next `next_n` watches
    of the same user; window_s: ... and at most this many seconds later (None: any).
    neighbours: kept per item. target_power: divide by (times j follows anything) **
    target_power, to damp items that follow everything (0 = plain P(j follows | i)).
    last_n, last_decay: scoring uses the user's last `last_n` watches, the m-th last
    weighted last_decay ** (m - 1) (last_n = 1: "co-watched with the last watch")."""

    next_n: int = 5
    window_s: int | None = None
    neighbours: int = 100
    target_power: float = 0.0
    last_n: int = 1
    last_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.next_n < 1 or self.neighbours < 1 or self.last_n < 1:
            raise FunnelrecError("co-watch: next_n, neighbours and last_n must be >= 1")
        if self.window_s is not None and self.window_s <= 0:
            raise FunnelrecError(f"co-watch: window_s must be positive, got {self.window_s}")
        if not 0 < self.last_decay <= 1 or self.target_power < 0:
            raise FunnelrecError("co-watch: last_decay must be in (0, 1], target_power >= 0")


class CoWatch(_Neighbours):
    """Asymmetric item-to-item co-watch counts (SPEC 2.2: co-watch is asymmetric).

    C[i, j] = #{(user, p, q): p < q <= p + next_n, ts_q - ts_p <= window_s,
               item_p = i, item_q = j != i}   (j watched after i; never i after j)
    S[i, j] = C[i, j] / sum_j' C[i, j'] / colsum_j ** target_power
    keeping the `neighbours` best j per i. score(user)_j = sum_m w_m S[h_m, j] over the
    last `last_n` history items h_m (m = 1 the last), w_m = last_decay ** (m - 1).
    """

    kind = "cowatch"

    def __init__(
        self,
        next_n: int = 5,
        window_s: int | None = None,
        neighbours: int = 100,
        *,
        target_power: float = 0.0,
        last_n: int = 1,
        last_decay: float = 0.5,
    ) -> None:
        super().__init__()
        self.cfg = CoWatchConfig(next_n, window_s, neighbours, target_power, last_n, last_decay)

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
    ) -> Self:
        started = time.perf_counter()
        cfg = self.cfg
        data = Interactions.of(train)
        n = self._n(data, num_items)
        src: list[np.ndarray] = []
        dst: list[np.ndarray] = []
        for d in range(1, cfg.next_n + 1):
            same = data.user[:-d] == data.user[d:]
            if cfg.window_s is not None:
                same &= data.ts[d:] - data.ts[:-d] <= cfg.window_s
            same &= data.item[:-d] != data.item[d:]
            src.append(data.item[:-d][same])
            dst.append(data.item[d:][same])
        i, j = np.concatenate(src), np.concatenate(dst)
        counts = sp.csr_matrix((np.ones(i.size, dtype=np.float64), (i, j)), shape=(n + 1, n + 1))
        counts.sum_duplicates()
        rowsum = np.asarray(counts.sum(axis=1)).ravel()
        colsum = np.asarray(counts.sum(axis=0)).ravel()
        inv_row = np.divide(1.0, rowsum, out=np.zeros_like(rowsum), where=rowsum > 0)
        norm = sp.diags(inv_row) @ counts
        if cfg.target_power > 0:
            col = np.where(colsum > 0, colsum, 1.0) ** -cfg.target_power
            norm = norm @ sp.diags(col)
        self.sim = top_n_per_row(sp.csr_matrix(norm), cfg.neighbours)
        self.num_items = n
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def _weights(self, h: Jagged, *, last_n: int | None = None, **_: Any) -> np.ndarray:
        n = self.cfg.last_n if last_n is None else int(last_n)
        if n < 1:
            raise FunnelrecError(f"last_n must be at least 1, got {n}")
        back = h.from_end()
        return np.where(back <= n, self.cfg.last_decay ** (back - 1.0), 0.0)

    def score(self, histories: Histories, *, last_n: int | None = None, **_: Any) -> np.ndarray:
        """[B, N + 1] scores from each history's last `last_n` watches (default: config)."""
        return super().score(histories, last_n=last_n)


@dataclass(frozen=True)
class ItemKNNConfig:
    """neighbours: kept per item (100 in shared/BENCHMARKS.md)."""

    neighbours: int = 100

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise FunnelrecError(f"item kNN: neighbours must be >= 1, got {self.neighbours}")


class ItemKNN(_Neighbours):
    """Item-based kNN with cosine similarity of the items' (binary) user sets.

    sim[i, j] = |U_i & U_j| / sqrt(|U_i| |U_j|)  (i != j), keeping the `neighbours` most
    similar j of each i; score(user)_j = sum over distinct history items h of sim[h, j].
    """

    kind = "itemknn"

    def __init__(self, neighbours: int = 100) -> None:
        super().__init__()
        self.cfg = ItemKNNConfig(neighbours)

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
    ) -> Self:
        started = time.perf_counter()
        data = Interactions.of(train, need_ts=False)
        n = self._n(data, num_items)
        x = _binary_user_items(data, n)  # [U, N + 1]
        co = (x.T @ x).tocsr().astype(np.float64)  # [N + 1, N + 1] common users
        norms = np.sqrt(co.diagonal())
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        cos = sp.csr_matrix(sp.diags(inv) @ co @ sp.diags(inv))
        cos.setdiag(0.0)
        self.sim = top_n_per_row(cos, self.cfg.neighbours)
        self.num_items = n
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def _weights(self, h: Jagged, **_: Any) -> np.ndarray:
        # each distinct history item once: duplicates are summed, so weight 1 / multiplicity
        key = h.rows() * (self.num_items + 1) + h.values
        _keys, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse]


def _binary_user_items(data: Interactions, num_items: int) -> sp.csr_matrix:
    """[U, N + 1] 0/1 matrix of the training users (rows in sorted user-id order)."""
    _, row = np.unique(data.user, return_inverse=True)
    m = sp.csr_matrix(
        (np.ones(data.item.size, dtype=np.float32), (row, data.item)),
        shape=(int(row.max()) + 1, num_items + 1),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


# ---------------------------------------------------------------------------------------
# Matrix factorisation through `implicit`


@dataclass(frozen=True)
class MFConfig:
    """factors: latent dimension. iterations, regularization, learning_rate (BPR only),
    alpha (ALS only: confidence of an observed item, implicit's alpha), threads (0 = all
    cores; BPR is only reproducible with 1), seed: implicit's random_state."""

    factors: int = 64
    iterations: int = 100
    regularization: float = 0.01
    learning_rate: float = 0.01
    alpha: float = 1.0
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 1 or self.threads < 0:
            raise FunnelrecError("matrix factorisation: factors, iterations >= 1; threads >= 0")


class _MatrixFactorisation(Baseline):
    """Scores are dot products of a user vector with each item vector (item 0: -inf).

    Users seen in training can be scored by their learned vectors (`users=`); a history
    without a user id needs a fold-in, which only ALS has (`_fold_in`)."""

    min_candidate_score = -math.inf

    def __init__(self, cfg: MFConfig | None = None) -> None:
        super().__init__()
        cfg = self.cfg = cfg or MFConfig()
        self.item_factors = np.zeros((1, cfg.factors), dtype=np.float32)  # [N + 1, f]
        self.user_factors = np.zeros((0, cfg.factors), dtype=np.float32)  # [U, f]
        self.user_ids = np.zeros(0, dtype=np.int64)  # [U] sorted dataset ids

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        model = cls()
        model.cfg = MFConfig(**config)
        return model

    def _model(self) -> Any:
        raise NotImplementedError

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
    ) -> Self:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        started = time.perf_counter()
        data = Interactions.of(train, need_ts=False)
        n = self._n(data, num_items)
        # implicit sees items 1..N as columns 0..N-1: padding must not be a sampled negative
        x = _binary_user_items(data, n)[:, 1:].tocsr()
        # implicit's own threads do the work; a multi-threaded BLAS underneath only fights
        # them. Import first: it loads scipy's BLAS, which the limit must find loaded.
        import implicit.cpu.als
        import implicit.cpu.bpr  # noqa: F401

        with threadpool_limits(1, "blas"):
            model = self._model()
            model.fit(x, show_progress=False)
        items = np.asarray(model.item_factors, dtype=np.float32)
        users = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])
        self.user_factors = users
        self.user_ids = np.unique(data.user)
        self.num_items = n
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def _fold_in(self, h: Jagged) -> np.ndarray:
        raise FunnelrecError(
            f"{type(self).__name__} cannot score a history without a training user id (pass users=)"
        )

    def user_vectors(self, histories: Histories, users: ArrayLike | None = None) -> np.ndarray:
        """[B, f'] user vectors: learned ones for `users` (dataset ids) seen in training,
        a fold-in of the history for the others (ALS only)."""
        self._check_fitted()
        h = Jagged.of(histories)
        _check_ids(h.values, self.num_items, "history")
        if users is None:
            return self._fold_in(h)
        u = np.asarray(users, dtype=np.int64).reshape(-1)
        if u.size != len(h):
            raise FunnelrecError(f"{u.size} users for {len(h)} histories")
        pos = np.zeros(u.size, dtype=np.int64)
        known = np.zeros(u.size, dtype=bool)
        if self.user_ids.size:
            pos = np.minimum(np.searchsorted(self.user_ids, u), self.user_ids.size - 1)
            known = self.user_ids[pos] == u
        out = np.zeros((u.size, self.user_factors.shape[1]), dtype=np.float32)
        out[known] = self.user_factors[pos[known]]
        if not known.all():
            idx = np.flatnonzero(~known)
            lo, hi = h.offsets[idx], h.offsets[idx + 1]
            sub = Jagged.from_rows([h.values[a:b] for a, b in zip(lo, hi, strict=True)])
            out[idx] = self._fold_in(sub)
        return out

    def score(
        self, histories: Histories, *, users: ArrayLike | None = None, **_: Any
    ) -> np.ndarray:
        """[B, N + 1] dot-product scores; `users`: [B] dataset user ids (see user_vectors)."""
        vec = self.user_vectors(histories, users)
        return _with_padding_column(vec @ self.item_factors.T)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "item_factors": self.item_factors,
            "user_factors": self.user_factors,
            "user_ids": self.user_ids,
        }

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        items, users, ids = arrays["item_factors"], arrays["user_factors"], arrays["user_ids"]
        if (
            items.ndim != 2
            or items.shape[0] != self.num_items + 1
            or users.ndim != 2
            or users.shape[1] != items.shape[1]
            or ids.shape != (users.shape[0],)
        ):
            raise ArtifactError(f"{self.kind}: factor arrays of inconsistent shapes")
        self.item_factors = items.astype(np.float32)
        self.user_factors = users.astype(np.float32)
        self.user_ids = ids.astype(np.int64)


def _threads(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


class BPR(_MatrixFactorisation):
    """Bayesian Personalised Ranking (implicit.cpu.bpr); no fold-in for new histories."""

    kind = "bpr"

    def __init__(
        self,
        factors: int = 64,
        *,
        iterations: int = 100,
        regularization: float = 0.01,
        learning_rate: float = 0.01,
        threads: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            MFConfig(
                factors=factors,
                iterations=iterations,
                regularization=regularization,
                learning_rate=learning_rate,
                threads=threads,
                seed=seed,
            )
        )

    def _model(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.cfg
        return BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            num_threads=_threads(c.threads),
            random_state=c.seed,
        )


class ALS(_MatrixFactorisation):
    """Implicit-feedback ALS (implicit.cpu.als, Hu, Koren & Volinsky 2008).

    Fold-in of a history (users not given, or unseen): the exact least-squares user step
    with the item factors Y fixed, as implicit's `recalculate_user` does, with confidence
    c = alpha for each distinct history item:
        x_u = (Y'Y + (c - 1) Y_S'Y_S + regularization I)^-1  c Y_S' 1
    """

    kind = "als"

    def __init__(
        self,
        factors: int = 64,
        *,
        iterations: int = 15,
        regularization: float = 0.01,
        alpha: float = 1.0,
        threads: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            MFConfig(
                factors=factors,
                iterations=iterations,
                regularization=regularization,
                alpha=alpha,
                threads=threads,
                seed=seed,
            )
        )

    def _model(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.cfg
        return AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            num_threads=_threads(c.threads),
            random_state=c.seed,
        )

    def _fold_in(self, h: Jagged) -> np.ndarray:
        y = self.item_factors.astype(np.float64)  # [N + 1, f], row 0 all zero
        f = y.shape[1]
        m = _history_matrix(h, np.ones(h.values.size), self.num_items)
        m.data[:] = 1.0  # distinct items
        c = self.cfg.alpha
        base = y.T @ y + self.cfg.regularization * np.eye(f)
        b = c * np.asarray(m @ y)  # [B, f]
        a = np.broadcast_to(base, (len(h), f, f)).copy()
        if c != 1.0:
            for r in range(len(h)):
                ys = y[m.indices[m.indptr[r] : m.indptr[r + 1]]]
                a[r] += (c - 1.0) * ys.T @ ys
        return np.linalg.solve(a, b[..., None])[..., 0].astype(np.float32)


# ---------------------------------------------------------------------------------------
# Loading


_KINDS: dict[str, type[Baseline]] = {c.kind: c for c in (Popularity, CoWatch, ItemKNN, BPR, ALS)}


def load_baseline(path: Path | str) -> Baseline:
    """Read any model written by `Baseline.save` (no pickle: JSON + NPY)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not a saved baseline (no {META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable {META} ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: baseline format version {meta.get('format_version')}, "
            f"this funnelrec reads {FORMAT_VERSION}"
        )
    cls = _KINDS.get(meta.get("kind", ""))
    if cls is None:
        raise ArtifactError(f"{path}: unknown baseline kind {meta.get('kind')!r}")
    try:
        model = cls.from_config(dict(meta["config"]))
        model.num_items = int(meta["num_items"])
        model.fit_seconds = float(meta.get("fit_seconds", 0.0))
        arrays = {
            name: np.load(path / fname, allow_pickle=False)
            for name, fname in dict(meta["arrays"]).items()
        }
        model._set_arrays(arrays, meta)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ArtifactError(f"{path}: broken baseline ({type(e).__name__}: {e})") from None
    model._fitted = True
    return model
