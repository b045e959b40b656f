"""Vocabularies: raw values of one id space (items, search tokens, regions, ...) -> dense ids.

A vocabulary is fitted in one pass before training (Covington et al. 2016, section 4.1),
over TRAINING data only, so that held-out data cannot leak into it: the values are counted,
sorted by frequency (most frequent first, ties by value), and truncated to the top
`max_size`. Id 0 is out of vocabulary: every value not kept maps to 0, whose embedding is
the zero vector. Ids 1..n are therefore in decreasing training frequency, which is what a
log-uniform negative sampler assumes; `counts` keeps the frequencies themselves (the
candidate model builds its sampling proposal Q from the item vocabulary's counts).
Example:
    v = Vocabulary.fit("region", pa.array(["de", "fr", "de", None]))
    v.lookup(pa.array(["de", "us"]))   # -> array([1, 0], dtype=int32)
    len(v)                             # -> 3 (ids 0, 1, 2)
    v.save(path); Vocabulary.load(path)

Saved as Parquet (id, value, count) with the name, kind and OOV count in the file's
metadata: plain, typed, and fast for million-entry vocabularies. No pickle.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec.errors import ArtifactError, FunnelrecError

FORMAT_VERSION = 1

# Embedding dimension rule (Covington et al. 2016, section 4.1: "roughly proportional to the
# logarithm of the number of unique values").
# dim = EMB_MULTIPLE * ceil(EMB_SCALE * log2(cardinality) / EMB_MULTIPLE), clipped to
# [EMB_MIN, EMB_MAX]. The scale puts the paper's example, 1M ids x 32 dims, on the rule
# (1.6 * log2(1e6) = 31.9); rounding up to a multiple of 4 keeps matrix shapes friendly.
EMB_SCALE = 1.6
EMB_MIN = 4
EMB_MAX = 64
EMB_MULTIPLE = 4

# Lookup structures (built on first use): integer vocabularies whose values span at most
# _DENSE_SPAN x their size are looked up through a dense table indexed by value (4 bytes
# per slot), others by binary search up to _SMALL_SEARCH values per call; strings through
# a dict up to _SMALL_STR values per call. Beyond those, Arrow's hash lookup (which builds
# its table anew per call, small next to hashing that many values).
_DENSE_SPAN = 4
_SMALL_STR = 4096
_SMALL_SEARCH = 1 << 16


def embedding_dim(
    cardinality: int,
    *,
    scale: float = EMB_SCALE,
    minimum: int = EMB_MIN,
    maximum: int = EMB_MAX,
    multiple: int = EMB_MULTIPLE,
) -> int:
    """Embedding width for a vocabulary of `cardinality` ids (including id 0).

    Examples with the defaults: 5 -> 4, 50 -> 12, 10,000 -> 24, 100,000 -> 28, 1M -> 32.
    """
    if cardinality < 1:
        raise FunnelrecError(f"embedding_dim: cardinality must be >= 1, got {cardinality}")
    if multiple < 1 or minimum < 1 or maximum < minimum:
        raise FunnelrecError(
            f"embedding_dim: need multiple >= 1 and 1 <= minimum <= maximum "
            f"(got multiple={multiple}, minimum={minimum}, maximum={maximum})"
        )
    raw = scale * math.log2(max(cardinality, 2))
    dim = multiple * math.ceil(raw / multiple)
    return int(min(max(dim, minimum), maximum))


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a fitted transform's table to `path` through a temporary file and a rename,
    so that a reader never sees half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """One id space. `values[i - 1]` is the raw value of id i; `counts[i]` its training count.

    values:    [n]      raw values (int64 or string), most frequent first
    counts:    [n + 1]  training frequency per id; counts[0] = occurrences mapped to OOV
    kind:      "int" or "str"
    """

    name: str
    values: np.ndarray
    counts: np.ndarray
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("int", "str"):
            raise FunnelrecError(f"vocabulary '{self.name}': kind must be 'int' or 'str'")
        if self.counts.shape != (len(self.values) + 1,):
            raise FunnelrecError(
                f"vocabulary '{self.name}': counts has shape {self.counts.shape}, "
                f"expected ({len(self.values) + 1},)"
            )
        # Lookup structures, built on first use and kept (see `lookup`).
        object.__setattr__(self, "_cache", {})

    def __len__(self) -> int:
        """Number of ids, including the OOV id 0 (the embedding table's row count)."""
        return len(self.values) + 1

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r}, size={len(self)}, kind={self.kind!r})"

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        # Built at most once per vocabulary in practice; two threads racing here both build
        # the same value, which is harmless.
        cache: dict[str, Any] = self._cache  # type: ignore[attr-defined]
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _arrow_values(self) -> pa.Array:
        """The values as one Arrow array (the value set of `pc.index_in`)."""

        def build() -> pa.Array:
            if self.kind == "int":
                return pa.array(np.asarray(self.values, dtype=np.int64), type=pa.int64())
            return pa.array(list(self.values), type=pa.string())

        return self._cached("arrow", build)

    def _int_table(self) -> tuple[int, np.ndarray] | tuple[np.ndarray, np.ndarray]:
        """How integers are found: (offset, dense table) when the values span a compact
        range (dataset ids are 1..N: a direct index), else (sorted values, their ids)."""

        def build() -> tuple[int, np.ndarray] | tuple[np.ndarray, np.ndarray]:
            values = np.asarray(self.values, dtype=np.int64)
            if values.size == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.int32)
            lo, hi = int(values.min()), int(values.max())
            if hi - lo < _DENSE_SPAN * values.size + 1024:
                table = np.zeros(hi - lo + 1, dtype=np.int32)
                table[values - lo] = np.arange(1, values.size + 1, dtype=np.int32)
                return lo, table
            order = np.argsort(values, kind="stable")
            return values[order], (order + 1).astype(np.int32)

        return self._cached("int", build)

    def _str_index(self) -> dict[str, int]:
        return self._cached("str", lambda: {v: i + 1 for i, v in enumerate(self.values.tolist())})

    @classmethod
    def fit(
        cls,
        name: str,
        values: pa.Array | pa.ChunkedArray | np.ndarray,
        *,
        max_size: int | None = None,
        min_count: int = 1,
        weights: np.ndarray | None = None,
    ) -> Vocabulary:
        """Count `values` (nulls ignored), keep the top `max_size` with count >= `min_count`.

        `weights` (same length as values) counts each occurrence with a weight instead of 1.
        """
        arr = _as_arrow(values)
        kind = (
            "str" if (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) else "int"
        )
        if kind == "int" and not pa.types.is_integer(arr.type):
            if arr.null_count == len(arr):
                arr = arr.cast(pa.int64())
            else:
                raise FunnelrecError(
                    f"vocabulary '{name}': values must be integers or strings, got {arr.type}"
                )
        if weights is not None and len(weights) != len(arr):
            raise FunnelrecError(f"vocabulary '{name}': weights and values differ in length")
        valid = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)
        if kind == "int":
            keys = np.asarray(pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(), dtype=np.int64)
            keys = keys[valid]
            uniq, inverse = np.unique(keys, return_inverse=True)
        else:
            enc = pc.dictionary_encode(arr.cast(pa.string()))
            indices = np.asarray(
                pc.fill_null(enc.indices, 0).to_numpy(zero_copy_only=False), dtype=np.int64
            )[valid]
            dict_values = np.array(enc.dictionary.to_pylist(), dtype=object)
            # Order the dictionary by value so ties in frequency break the same way every run.
            order = np.argsort(dict_values.astype(str), kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            uniq = dict_values[order]
            inverse = rank[indices]
        w = None if weights is None else np.asarray(weights, dtype=np.float64)[valid]
        freq = np.bincount(inverse, weights=w, minlength=len(uniq))
        # Most frequent first; np.lexsort's last key is primary, uniq is sorted so the
        # position breaks ties by value.
        order = np.lexsort((np.arange(len(uniq)), -freq))
        keep = order[freq[order] >= min_count]
        if max_size is not None:
            keep = keep[: max(int(max_size), 0)]
        kept_values = uniq[keep]
        counts = np.empty(len(keep) + 1, dtype=np.float64 if weights is not None else np.int64)
        counts[1:] = freq[keep]
        counts[0] = freq.sum() - counts[1:].sum()
        if kind == "int":
            kept_values = np.asarray(kept_values, dtype=np.int64)
        else:
            kept_values = np.asarray(kept_values, dtype=object)
        return cls(name=name, values=kept_values, counts=counts, kind=kind)

    @classmethod
    def from_counts(
        cls,
        name: str,
        values: pa.Array | pa.ChunkedArray | np.ndarray,
        counts: np.ndarray,
        *,
        max_size: int | None = None,
        min_count: int = 1,
    ) -> Vocabulary:
        """`fit` over a multiset given as values and how often each occurs.

        A value may appear more than once (counts of several parts of the data, one after
        the other): its counts are summed. The result is the vocabulary `fit` gives on the
        whole data, integer counts included.
        """
        counts = np.asarray(counts, dtype=np.int64)
        fitted = cls.fit(
            name,
            values,
            max_size=max_size,
            min_count=min_count,
            weights=counts.astype(np.float64),
        )
        return cls(
            name=name,
            values=fitted.values,
            counts=np.rint(fitted.counts).astype(np.int64),
            kind=fitted.kind,
        )

    def extend(
        self, seen: Vocabulary, *, max_new: int | None = None, min_count: int = 1
    ) -> Vocabulary:
        """This vocabulary with the values of `seen` it lacks appended after its own.

        `seen`: the newer data's counts (a `fit` with no truncation). Every id of `self`
        keeps its value, so a model's embedding rows stay valid; new values are taken in
        `seen`'s order (most frequent first), those with count >= `min_count`, at most
        `max_new` of them: truncation applies to the new values only. Counts are `seen`'s
        (an old value absent from it counts 0), so a proposal built from them follows the
        newer data. Ids past the old ones are no longer in decreasing frequency.
        """
        if seen.kind != self.kind and len(seen.values) and len(self.values):
            raise FunnelrecError(
                f"vocabulary '{self.name}': cannot extend {self.kind} values with {seen.kind}"
            )
        old_ids = self.lookup(seen.values) if len(seen.values) else np.zeros(0, np.int32)
        new = np.flatnonzero((old_ids == 0) & (seen.counts[1:] >= min_count))
        if max_new is not None:
            new = new[: max(int(max_new), 0)]
        values = np.concatenate([self.values, seen.values[new]])
        values = (
            np.asarray(values, dtype=np.int64)
            if self.kind == "int"
            else np.asarray(values, dtype=object)
        )
        counts = np.zeros(len(values) + 1, dtype=seen.counts.dtype)
        known = old_ids != 0
        counts[old_ids[known]] = seen.counts[1:][known]
        counts[len(self) :] = seen.counts[1:][new]
        counts[0] = seen.counts.sum() - counts[1:].sum()
        return Vocabulary(name=self.name, values=values, counts=counts, kind=self.kind)

    def extends(self, old: Vocabulary) -> bool:
        """Whether every id of `old` has the same value here (a grown copy of it)."""
        n = len(old.values)
        if n > len(self.values) or (n and old.kind != self.kind):
            return False
        return bool(np.array_equal(self.values[:n], old.values))

    def lookup(self, values: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
        """Dense ids of raw `values`: [n] int32, 0 for nulls and values not in the vocabulary.

        The structures behind it are built on first use and kept, so a lookup costs time
        in the number of values, not in the vocabulary's size (serving looks up a few
        hundred values per request in vocabularies of a million).
        """
        if (
            self.kind == "int"
            and isinstance(values, np.ndarray)
            and values.ndim == 1
            and values.dtype.kind in "iu"
        ):
            return self._lookup_int(values.astype(np.int64, copy=False), None)
        arr = _as_arrow(values)
        n = len(arr)
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        if self.kind == "int":
            if not (pa.types.is_integer(arr.type) or arr.null_count == n):
                raise FunnelrecError(
                    f"vocabulary '{self.name}' holds integers, got values of type {arr.type}"
                )
            arr = arr.cast(pa.int64())
            keys = np.asarray(pc.fill_null(arr, 0).to_numpy(), dtype=np.int64)
            valid = (
                np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)
                if arr.null_count
                else None
            )
            return self._lookup_int(keys, valid)
        if n <= _SMALL_STR and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            index = self._str_index()
            found = map(index.get, arr.to_pylist(), itertools.repeat(0))
            return np.fromiter(found, dtype=np.int32, count=n)
        # Many strings: Arrow's hash lookup (it rebuilds its table per call, which is
        # small next to hashing this many values).
        idx = pc.index_in(arr.cast(pa.string()), value_set=self._arrow_values())
        out = pc.fill_null(pc.add(idx, 1), 0)
        return np.asarray(out.to_numpy(zero_copy_only=False), dtype=np.int32)

    def _lookup_int(self, keys: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """[n] int32 ids of int64 `keys` (`valid`: False where the value was null)."""
        first, second = self._int_table()
        if isinstance(first, int):
            rel = keys - first
            inside = (rel >= 0) & (rel < second.size)
            ids = np.where(inside, second[np.where(inside, rel, 0)], 0)
        elif first.size == 0:
            ids = np.zeros(keys.shape, dtype=np.int32)
        elif keys.size > _SMALL_SEARCH:
            # Many values: Arrow's hash lookup beats a binary search per value.
            idx = pc.index_in(pa.array(keys), value_set=self._arrow_values())
            ids = np.asarray(pc.fill_null(pc.add(idx, 1), 0).to_numpy(), dtype=np.int32)
        else:
            pos = np.minimum(np.searchsorted(first, keys), first.size - 1)
            ids = np.where(first[pos] == keys, second[pos], 0)
        if valid is not None:
            ids = np.where(valid, ids, 0)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Raw values of dense ids (ids must be >= 1)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() >= len(self)):
            raise FunnelrecError(f"vocabulary '{self.name}': ids out of range 1..{len(self) - 1}")
        return self.values[ids - 1]

    def oov_rate(self, values: pa.Array | pa.ChunkedArray | np.ndarray) -> float:
        """Share of non-null `values` that map to id 0 (nan when there are none)."""
        arr = _as_arrow(values)
        n = len(arr) - arr.null_count
        if n == 0:
            return float("nan")
        ids = self.lookup(arr.filter(pc.is_valid(arr)))
        return float((ids == 0).mean())

    def embedding_dim(self, **rule: int | float) -> int:
        """Embedding width by `embedding_dim`'s rule (keyword overrides of its constants)."""
        return embedding_dim(len(self), **rule)  # type: ignore[arg-type]

    def save(self, path: Path | str) -> None:
        """Write Parquet (id, value, count) atomically, metadata in the schema."""
        path = Path(path)
        ids = np.arange(len(self), dtype=np.int64)
        value_type = pa.int64() if self.kind == "int" else pa.string()
        values = pa.array([None, *self.values.tolist()], type=value_type)
        count_type = pa.float64() if self.counts.dtype.kind == "f" else pa.int64()
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "kind": self.kind}
        table = pa.table(
            {"id": ids, "value": values, "count": pa.array(self.counts, type=count_type)}
        ).replace_schema_metadata({"funnelrec.vocabulary": json.dumps(meta)})
        write_table_atomic(table, path)

    @classmethod
    def load(cls, path: Path | str) -> Vocabulary:
        path = Path(path)
        try:
            table = pq.read_table(path)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise ArtifactError(f"{path}: cannot read vocabulary ({e})") from None
        raw = (table.schema.metadata or {}).get(b"funnelrec.vocabulary")
        if raw is None:
            raise ArtifactError(f"{path}: not a funnelrec vocabulary (no metadata)")
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: vocabulary format version {meta.get('format_version')}, "
                f"this funnelrec reads {FORMAT_VERSION}"
            )
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise ArtifactError(f"{path}: vocabulary ids are not 0..n-1")
        values = table.column("value").slice(1)
        kind = meta["kind"]
        vals = (
            np.asarray(values.to_numpy(), dtype=np.int64)
            if kind == "int"
            else np.array(values.to_pylist(), dtype=object)
        )
        counts = np.asarray(table.column("count").to_numpy())
        return cls(name=str(meta["name"]), values=vals, counts=counts, kind=kind)


def _as_arrow(values: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return pa.array(arr.astype(np.int64))
    return pa.array(arr.tolist())
