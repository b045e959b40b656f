"""Vectorised helpers: bags as flat ids + offsets, and per-user sampling, without a
Python loop per example.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


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
