"""Item-to-item neighbourhoods: `CoWatch` (asymmetric "watched next" counts) and
`ItemKNN` (cosine similarity of user sets), each a sparse top-N item -> item matrix."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from numpy.typing import ArrayLike

from funnelrec.baselines.base import Baseline, _with_padding_column
from funnelrec.baselines.data import (
    Histories,
    Interactions,
    Jagged,
    _binary_user_items,
    _check_ids,
    _history_matrix,
)
from funnelrec.errors import ArtifactError, FunnelrecError


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
        ids, vals = self._score_row(h, self._weights(h, **kwargs))
        dense = np.full(self.num_items + 1, -np.inf, dtype=np.float32)
        dense[ids] = vals
        if exclude is not None:
            ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
            _check_ids(ex, self.num_items, "exclude")
            dense[ex] = -np.inf
        good = ids[dense[ids] > self.min_candidate_score]
        order = np.lexsort((good, -dense[good]))[:k]
        return good[order], dense[good[order]]

    def _score_row(self, h: Jagged, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One history's scores: (item ids, float32 scores) of its non-zero entries."""
        keep = (h.values > 0) & (weights != 0)
        if np.count_nonzero(keep) == 1 and self.sim.dtype == np.float32:
            # One weighted item (co-watched with the last watch, the default): its row of
            # S times its weight, the float32 products the sparse product below makes,
            # without building the sparse matrices (most of a serving call's time).
            item = int(h.values[keep][0])
            lo, hi = int(self.sim.indptr[item]), int(self.sim.indptr[item + 1])
            vals = np.float32(weights[keep][0]) * self.sim.data[lo:hi]
            nonzero = vals != 0  # the product leaves out sums of 0
            return self.sim.indices[lo:hi][nonzero].astype(np.int64), vals[nonzero]
        row = (_history_matrix(h, weights, self.num_items) @ self.sim).tocsr()
        return row.indices.astype(np.int64), row.data.astype(np.float32)

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
    """Asymmetric item-to-item co-watch counts (Covington et al. 2016, section 3.4).

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
    """neighbours: kept per item (100, as in the peer ItemKNN of benchmarks/real_data.py)."""

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
