"""The inputs of every baseline: training interactions and users' histories.

`Interactions` validates and sorts a training table; `Jagged` holds B histories as flat
item ids + [B + 1] offsets, and `Histories` is what a model's `score` accepts (a list of
arrays or a `Jagged`). The private helpers turn them into the sparse matrices the models
multiply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from numpy.typing import ArrayLike

from funnelrec.errors import DataError, FunnelrecError


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
