"""Top-N retrieval by dot product over item embeddings: a FAISS index with item ids attached.

At serving, candidate generation is a nearest-neighbour search in dot-product space over
the item (output) embeddings of the candidate model (Covington et al. 2016, section 3.1).
`ItemIndex` wraps one FAISS inner-product index and the mapping from its rows to dataset
item ids:

    index = ItemIndex.build(embeddings, item_ids)          # kind chosen by corpus size
    ids, scores = index.search(user_vectors, k=100, exclude=watched_per_user)
    index.tune(heldout_user_vectors, k=100, target_recall=0.95)   # smallest efSearch/nprobe
    index.save(art / "index")
    index = ItemIndex.load(art / "index", expected_dim=d, expected_item_ids=item_ids)

Kinds (see docs/ann.md for the measurements behind the defaults):
    exact     IndexFlatIP: brute force, exact; the default up to EXACT_MAX_ITEMS items.
    hnsw      IndexHNSWFlat (inner product): graph search over the float vectors, knob
              `ef_search`.
    hnsw_sq   the same graph searched over 8-bit scalar-quantised codes (or fp16), then
              the best `rerank` x k candidates re-scored exactly with the float vectors.
    ivf       IndexIVFFlat (inner product): k-means buckets, knob `nprobe`.
    ivfpq     IndexIVFPQ (inner product): like ivf with vectors compressed to `pq_m` bytes;
              scores are approximate (the only kind where they are).
    ivfpq_fs  IVF over 4-bit PQ codes scanned with SIMD byte shuffles ("fast scan"), then
              the best `rerank` x k candidates re-scored exactly with the float vectors;
              the default above EXACT_MAX_ITEMS (the fastest at recall@100 0.95 on 1M
              items, and the quickest to build). FAISS builds it; searches run through
              funnelrec's own scan kernel (`funnelrec.ann.fastscan`) where it is installed,
              else through FAISS, with the same results up to the rounding of 8-bit tables.

On disk, DIR/index.faiss is a FAISS `IndexIDMap` (the search index plus its row -> item id
map) and DIR/index.json records format version, kind, parameters, dimension, count, a hash
of the item ids and the recall measured against exact search; both are written in a
temporary directory renamed into place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import faiss as _faiss
import numpy as np
from numpy.typing import ArrayLike

from funnelrec import __version__
from funnelrec.ann import fastscan
from funnelrec.data.dataset import AtomicDirectory, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError

# FAISS's bundled type stubs lack much of the SWIG API used here (SearchParametersHNSW,
# `sel=`, HNSW storage, ...): treat the module as untyped.
faiss: Any = _faiss

Kind = Literal["exact", "hnsw", "hnsw_sq", "ivf", "ivfpq", "ivfpq_fs"]
KINDS: tuple[Kind, ...] = ("exact", "hnsw", "hnsw_sq", "ivf", "ivfpq", "ivfpq_fs")
# Kinds that search compressed codes, then re-score the best rerank * k exactly
# (FAISS IndexRefine over an IndexFlatIP of the float vectors).
RERANKED: tuple[Kind, ...] = ("hnsw_sq", "ivfpq_fs")
_GRAPH: tuple[Kind, ...] = ("hnsw", "hnsw_sq")
_BUCKETS: tuple[Kind, ...] = ("ivf", "ivfpq", "ivfpq_fs")
SQ_TYPES = ("sq8", "fp16")
# Candidates re-ranked per result when `rerank` is 0. hnsw_sq: 8-bit codes misorder only
# near-ties, so re-scoring 2 k is enough to recover them. ivfpq_fs: 4-bit codes of 2
# dimensions are coarse, and 6 k reached recall@100 0.95 at the least search time of the
# depths tried on the 1M benchmark (docs/ann.md, "Results: 1M x 128").
DEFAULT_RERANK: dict[str, float] = {"hnsw_sq": 2.0, "ivfpq_fs": 6.0}

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"

# Up to this many items the default is exact search: one query over 50k x 128 floats stays
# well inside the serving budget of tens of ms (Covington et al. 2016, section 3.1;
# timings in docs/ann.md, "Threshold"), and exact needs no build, no tuning and loses no
# recall.
EXACT_MAX_ITEMS = 50_000

# Exclusion by over-fetching (search k + m, drop the excluded) is batched and cheap while
# m is small; rows that exclude more than this use a FAISS id selector, one query at a time.
OVERFETCH_MAX = 1024

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25

# Rows added per call while building: small enough for a live progress bar.
_ADD_CHUNK = 50_000

# FAISS fast-scan search implementations (IndexIVFFastScan.implem) for ivfpq_fs. One query
# (the serving path): 11 scans its probed lists into a reservoir of the rerank * k best;
# FAISS's automatic choice (0) keeps a heap, which costs more when rerank * k is in the
# hundreds, for the same results. Batches: 0, which splits them over threads by query.
# One query is not split over threads: FAISS's 14 (one query's lists over threads, one
# heap) was no faster with 2 threads, and its 15 (a reservoir per thread) helped the
# median on an idle machine but made the p99 far worse whenever the other core was taken.
# Timings: docs/ann.md, "The single-query path" and "Threads".
_FS_IMPLEM_SINGLE, _FS_IMPLEM_BATCH = 11, 0


@dataclass(frozen=True)
class IndexParams:
    """Build and search parameters; each kind reads only its own fields.

    Zero means "choose from the corpus size" (see `resolved`).
    """

    hnsw_m: int = 32  # hnsw: links per node; memory (4 d + 8 M) bytes/vector (FAISS wiki)
    ef_construction: int = 100  # hnsw: candidate list while inserting; build time ~ linear
    ef_search: int = 128  # hnsw: candidate list while searching (raised to k when smaller)
    nlist: int = 0  # ivf*: k-means buckets; 0 = 4 sqrt(N) (ivfpq_fs: 2 sqrt(N)), a power of 2
    nprobe: int = 32  # ivf*: buckets scanned per query
    train_size: int = 0  # ivf*: vectors sampled for k-means; 0 = 64 per bucket (and per PQ code)
    pq_m: int = 0  # ivfpq: sub-quantizers (bytes per vector at 8 bits); 0 = d/8, a divisor
    pq_bits: int = 8  # ivfpq: bits per sub-quantizer code (ivfpq_fs: always 4)
    sq_type: str = "sq8"  # hnsw_sq: codes the graph search reads: "sq8" (d bytes) or "fp16"
    rerank: float = 0.0  # hnsw_sq, ivfpq_fs: re-score rerank * k candidates; 0 = DEFAULT_RERANK

    def resolved(self, kind: Kind, count: int, dim: int) -> IndexParams:
        """Fill the automatic (zero) fields for `count` vectors of `dim` and check ranges."""
        p = self
        if kind in _BUCKETS:
            nlist = p.nlist or _auto_nlist(count, kind)
            if not 1 <= nlist <= count:
                raise FunnelrecError(f"nlist={nlist} must be between 1 and the {count} items")
            train = p.train_size or 64 * nlist
            if kind == "ivfpq" and not p.train_size:
                train = max(train, 64 * 2**p.pq_bits)  # each sub-quantizer runs k-means too
            p = dataclasses.replace(p, nlist=nlist, train_size=min(train, count))
            if p.nprobe < 1:
                raise FunnelrecError(f"nprobe={p.nprobe} must be at least 1")
        if kind in ("ivfpq", "ivfpq_fs"):
            # ivfpq_fs: 2 dimensions per 4-bit code (d / 2 codes, 32 bytes at d = 128); with 4
            # per code (d / 4) the codes are too coarse: reaching recall@100 0.95 then takes a
            # deeper scan and re-rank than the smaller codes save (docs/ann.md, "Half-size
            # codes").
            pq_m = p.pq_m or (_auto_pq_m(dim) if kind == "ivfpq" else max(1, dim // 2))
            if dim % pq_m != 0:
                raise FunnelrecError(f"pq_m={pq_m} must divide the embedding dimension {dim}")
            if kind == "ivfpq" and not 1 <= p.pq_bits <= 16:
                raise FunnelrecError(f"pq_bits={p.pq_bits} must be between 1 and 16")
            p = dataclasses.replace(p, pq_m=pq_m)
        if kind in _GRAPH and (p.hnsw_m < 2 or p.ef_construction < 1 or p.ef_search < 1):
            raise FunnelrecError("hnsw_m must be >= 2, ef_construction and ef_search >= 1")
        if kind == "hnsw_sq" and p.sq_type not in SQ_TYPES:
            raise FunnelrecError(f"sq_type={p.sq_type!r} must be one of {', '.join(SQ_TYPES)}")
        if kind in RERANKED:
            rerank = float(p.rerank or DEFAULT_RERANK[kind])
            if not 1.0 <= rerank <= 64.0:
                raise FunnelrecError(f"rerank={rerank} must be between 1 and 64")
            p = dataclasses.replace(p, rerank=rerank)
        return p

    def for_kind(self, kind: Kind) -> dict[str, Any]:
        """The fields `kind` uses, as recorded in index.json."""
        names = {
            "exact": (),
            "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
            "hnsw_sq": ("hnsw_m", "ef_construction", "ef_search", "sq_type", "rerank"),
            "ivf": ("nlist", "nprobe", "train_size"),
            "ivfpq": ("nlist", "nprobe", "train_size", "pq_m", "pq_bits"),
            "ivfpq_fs": ("nlist", "nprobe", "train_size", "pq_m", "rerank"),
        }[kind]
        return {n: getattr(self, n) for n in names}


def default_kind(count: int) -> Kind:
    """Exact search up to `EXACT_MAX_ITEMS` items, ivfpq_fs above (docs/ann.md)."""
    return "exact" if count <= EXACT_MAX_ITEMS else "ivfpq_fs"


def item_ids_hash(item_ids: ArrayLike) -> str:
    """SHA-256 of the item ids as little-endian int64, in row order: identifies a mapping."""
    ids = np.ascontiguousarray(np.asarray(item_ids), dtype="<i8")
    return hashlib.sha256(ids.tobytes()).hexdigest()


def _huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back the whole 2 MiB pages inside [address, address + nbytes) with
    huge pages, now (MADV_COLLAPSE) and for later faults (MADV_HUGEPAGE). True if it took."""
    lo = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    hi = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if not sys.platform.startswith("linux") or hi <= lo:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        return False
    return bool(madvise(lo, hi - lo, _MADV_COLLAPSE) == 0)


def _auto_nlist(count: int, kind: Kind) -> int:
    # FAISS wiki: 4 sqrt(N) to 16 sqrt(N) buckets; at least 39 training points per bucket.
    # ivfpq_fs: 2 sqrt(N). Its scan pays a fixed cost per bucket besides its cost per code,
    # so at 1M items 2048 buckets reach recall@100 0.95 sooner than 4096 (a few more codes,
    # half the buckets), while 1024 need too many codes (docs/ann.md, "Bucket count").
    target = max(1.0, (2 if kind == "ivfpq_fs" else 4) * math.sqrt(count))
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, count // 39 or 1)))


def _auto_pq_m(dim: int) -> int:
    # 8 dimensions per sub-quantizer: with 4, FAISS 1.15's k-means on 4-d sub-vectors was
    # many times slower per point (a slow kernel for tiny d; docs/ann.md, "Kinds and
    # defaults").
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def _as_matrix(x: ArrayLike, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2:
        raise FunnelrecError(f"{what} must be a 2-d array [rows, dim], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise FunnelrecError(f"{what} contains NaN or infinite values")
    return a


@dataclass(frozen=True)
class SearchOptions:
    """How this process searches an index; not saved with it (`ServingConfig.index`).

    scan_kernel: ivfpq_fs searches without an id selector through funnelrec's scan kernel
                 (`fastscan`, C) where it is built and supports the index: the same
                 buckets, codes and re-rank as FAISS's fast scan + IndexRefine, faster
                 (measured in docs/ann.md). False: FAISS's own search (A/B runs, tests).
    huge_pages:  back the arrays searches read at random (the re-rank's float rows, HNSW's
                 links) with 2 MiB pages where the system allows it (Linux: madvise
                 MADV_HUGEPAGE, then MADV_COLLAPSE): with 4 KiB pages each such read of a
                 large index misses the TLB (docs/ann.md). Best effort: elsewhere nothing
                 changes.
    mmap:        `ItemIndex.load` maps the index file's float vectors, codes and graph
                 links read-only instead of reading them into memory of its own (FAISS
                 IO_FLAG_MMAP_IFC): processes that load the same file (the workers of
                 `funnelrec serve --workers N`) then share one copy, the page cache's.
                 The id map and the scan kernel's layout of ivfpq_fs codes stay a copy
                 per process. Whether a file's pages are mapped 2 MiB at a time is up to
                 the kernel and file system (Linux can, with large page-cache folios),
                 which `huge_pages` only advises; False keeps a private copy instead.
    """

    scan_kernel: bool = True
    huge_pages: bool = True
    mmap: bool = True


class ItemIndex:
    """A FAISS inner-product index over item embeddings, searched by dataset item id.

    Build with `ItemIndex.build` or open with `ItemIndex.load`. `threads` (None = all cores)
    is applied through `faiss.omp_set_num_threads` before each build and search; FAISS's
    setting is process-wide, so the last index used sets it.
    """

    def __init__(
        self,
        idmap: Any,
        kind: Kind,
        params: IndexParams,
        *,
        threads: int | None = None,
        recall: dict[str, Any] | None = None,
        build_seconds: float | None = None,
        options: SearchOptions = SearchOptions(),
    ) -> None:
        self._idmap = idmap  # owns the search index and the row -> item id map
        self._index = faiss.downcast_index(idmap.index)
        # fixed once built: read through SWIG on every query they would cost a measurable
        # share of a sub-millisecond search (docs/ann.md, "The single-query path")
        self._dim, self._count = int(self._index.d), int(self._index.ntotal)
        self.kind: Kind = kind
        self.params = params
        self.threads = threads
        self.recall = recall
        self.build_seconds = build_seconds
        self.options = options
        self._refs: tuple[Any, ...] = ()  # set by `build`: keeps Python wrappers alive
        # FAISS per-call search parameters by (knob, k, rerank): creating one per query
        # would be a sizeable share of it (docs/ann.md, "The single-query path").
        self._param_cache: dict[tuple[int, int, float], Any] = {}
        # The float vectors, searchable exactly, where the index keeps them.
        self._floats: Any = None
        # ivfpq_fs: the fast-scan IVF index, whose search implementation `_fast_scan` picks.
        self._fs: Any = faiss.downcast_index(self._index.base_index) if kind == "ivfpq_fs" else None
        if kind in RERANKED:
            self._floats = faiss.downcast_index(self._index.refine_index)
        elif kind == "hnsw":
            self._floats = faiss.downcast_index(self._index.storage)
        elif kind == "exact":
            self._floats = self._index
        self.item_ids: np.ndarray = faiss.vector_to_array(idmap.id_map).astype(np.int64)
        self.item_ids.flags.writeable = False
        self.ids_hash = item_ids_hash(self.item_ids)
        self._sorter = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[self._sorter]
        self._dense = bool(np.array_equal(self.item_ids, np.arange(len(self.item_ids))))
        # ivfpq_fs: the scan kernel's copy of the codes, where it can search this index
        self._scan: fastscan.FastScan | None = None
        if self._fs is not None and options.scan_kernel:
            self._scan = fastscan.FastScan.from_faiss(self._fs, self._floats)
        if options.huge_pages:
            self._advise_huge_pages()

    def _advise_huge_pages(self) -> None:
        """Back the arrays searches read at random (float rows, HNSW links) with 2 MiB
        pages where the system allows it (see `SearchOptions.huge_pages`)."""
        if self._floats is not None and self._floats.ntotal:
            codes = self._floats.codes
            _huge_pages(int(codes.data()), int(codes.size()))
        hnsw = getattr(self._index, "hnsw", None)
        if hnsw is None and self.kind == "hnsw_sq":
            hnsw = getattr(faiss.downcast_index(self._index.base_index), "hnsw", None)
        if hnsw is not None and hnsw.neighbors.size():
            _huge_pages(int(hnsw.neighbors.data()), 4 * int(hnsw.neighbors.size()))

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self._dim

    @property
    def count(self) -> int:
        """Number of items N in the index."""
        return self._count

    @property
    def scan_implementation(self) -> str:
        """What runs the searches: "funnelrec kernel (AVX-512)" (or AVX2 / portable C) for
        an ivfpq_fs index the kernel searches, else "FAISS"."""
        if self._scan is None:
            return "FAISS"
        return f"funnelrec kernel ({fastscan.level()})"

    # ---------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        embeddings: ArrayLike,
        item_ids: ArrayLike,
        kind: Kind | None = None,
        params: IndexParams | None = None,
        *,
        threads: int | None = None,
        progress: bool = False,
        seed: int = 0,
        options: SearchOptions = SearchOptions(),
    ) -> ItemIndex:
        """Index `embeddings` [N, d] whose row i is item `item_ids[i]` ([N] int64, unique, >= 0).

        `kind` None picks `default_kind(N)`. `progress` shows a Rich bar while adding.
        `seed` fixes the IVF training sample and k-means. `options`: how it is searched.
        """
        x = _as_matrix(embeddings, "embeddings")
        ids = np.ascontiguousarray(np.asarray(item_ids), dtype=np.int64)
        n, d = x.shape
        if n == 0:
            raise FunnelrecError("cannot build an index over zero items")
        if ids.shape != (n,):
            raise FunnelrecError(f"item_ids has shape {ids.shape}, expected ({n},) for {n} rows")
        if (ids < 0).any():
            raise FunnelrecError("item ids must be >= 0 (FAISS uses -1 for 'no result')")
        if len(np.unique(ids)) != n:
            raise FunnelrecError("item ids must be unique")
        kind = kind or default_kind(n)
        if kind not in KINDS:
            raise FunnelrecError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        p = (params or IndexParams()).resolved(kind, n, d)
        if threads is not None:
            faiss.omp_set_num_threads(threads)

        start = time.perf_counter()
        if kind == "hnsw_sq":
            idmap, refs = _build_hnsw_sq(x, ids, p, progress)
        else:
            base = _new_index(kind, p, d)
            idmap = faiss.IndexIDMap(base)
            refs = (base,)
            if kind in _BUCKETS:
                rng = np.random.default_rng(seed)
                sample = x if p.train_size >= n else x[np.sort(rng.choice(n, p.train_size, False))]
                _ivf_of(base).cp.seed = seed
                idmap.train(sample)
            _add(idmap, x, ids, progress, f"index {kind}")
        spent = time.perf_counter() - start
        index = cls(idmap, kind, p, threads=threads, build_seconds=spent, options=options)
        index._refs = refs
        return index

    def to_hnsw_sq(self, sq_type: str = "sq8", rerank: float = 0.0) -> ItemIndex:
        """A new hnsw_sq index with this hnsw index's graph: only the codes are computed
        (seconds at 1M items, where building the graph is the slow part: docs/ann.md,
        "Results: 1M x 128").

        This index is left as it was (the float vectors are copied).
        """
        if self.kind != "hnsw":
            raise FunnelrecError(f"only an hnsw index converts to hnsw_sq, not {self.kind}")
        start = time.perf_counter()
        p = dataclasses.replace(self.params, sq_type=sq_type, rerank=rerank)
        p = p.resolved("hnsw_sq", self.count, self.dim)
        refine, refs = _hnsw_sq_from(self._index, p, take_floats=False)
        spent = time.perf_counter() - start
        index = ItemIndex(
            _idmap_over(refine, self.item_ids),
            "hnsw_sq",
            p,
            threads=self.threads,
            build_seconds=(self.build_seconds or 0.0) + spent,
            options=self.options,
        )
        index._refs = refs
        return index

    # ---------------------------------------------------------------- search

    def set_search_params(
        self,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rerank: float | None = None,
    ) -> None:
        """Change a search-time knob: `ef_search` (hnsw*), `nprobe` (ivf*), `rerank`."""
        changes: dict[str, Any] = {}
        if ef_search is not None:
            if ef_search < 1:
                raise FunnelrecError(f"ef_search={ef_search} must be at least 1")
            changes["ef_search"] = ef_search
        if nprobe is not None:
            if not 1 <= nprobe <= max(1, self.params.nlist):
                raise FunnelrecError(f"nprobe={nprobe} must be between 1 and {self.params.nlist}")
            changes["nprobe"] = nprobe
        if rerank is not None:
            if self.kind not in RERANKED:
                raise FunnelrecError(f"rerank applies to {', '.join(RERANKED)}, not {self.kind}")
            if not 1.0 <= rerank <= 64.0:
                raise FunnelrecError(f"rerank={rerank} must be between 1 and 64")
            changes["rerank"] = float(rerank)
        self.params = dataclasses.replace(self.params, **changes)

    def search(
        self,
        queries: ArrayLike,
        k: int,
        exclude: ArrayLike | Sequence[ArrayLike] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` items by dot product for each query.

        queries: [B, d] (or [d] for one query) float32 user vectors.
        exclude: item ids never to return: None; one id array applied to every query; or a
            sequence of B id arrays (or a [B, m] array), one per query. Ids not in the index
            are ignored. Excluding never shortens the result: rows the approximate search
            cannot fill are searched exhaustively (ivfpq: over all compressed codes).
        Returns (item_ids [B, k] int64, scores [B, k] float32), best first ([k] each for a
        [d] query). Only when fewer than k items remain after exclusion are the last
        places filled with item id -1 and score -inf.
        """
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        if single and 1 <= k <= self.count and q.shape[0] == self.dim:
            if exclude is None:
                got = self._search_one(q, k)
            elif isinstance(exclude, np.ndarray) and exclude.ndim == 1:
                got = self._search_one_excluding(q, k, exclude)
            else:
                got = None
            if got is not None:
                return got
        q = _as_matrix(q.reshape(1, -1) if single else q, "queries")
        if q.shape[1] != self.dim:
            raise FunnelrecError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if k < 1:
            raise FunnelrecError(f"k={k} must be at least 1")
        excl = self._exclusions(exclude, len(q))
        if len(q) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        rows, scores = self._search_positions(q, k, excl)
        ids = np.where(rows >= 0, self.item_ids[np.maximum(rows, 0)], -1)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def _search_one(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The serving path: one query [d], nothing excluded, k <= N. None when the
        approximate search comes back short (the general path then completes it).

        One FAISS call into fresh output arrays and no other per-call allocation but the
        id lookup: at 1M items a query takes well under a millisecond, so the time the
        general path's checks and copies add would be a sizeable share of it (docs/ann.md,
        "The single-query path").
        """
        rows, scores = self._rows_one(q, k)
        if rows[-1] < 0:  # short: missing results come last
            return None
        return (rows if self._dense else self.item_ids[rows]), scores

    def _search_one_excluding(
        self, q: np.ndarray, k: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The serving path with the user's watched items excluded: one query [d], k <= N,
        `exclude` [m] item ids. The general path's over-fetch done without its batch
        bookkeeping: the same k + m rows from the same one search, the excluded dropped,
        the first k kept, so the same results. None where that path does more (m beyond
        OVERFETCH_MAX, or fewer than k rows left: padding or an exhaustive completion)."""
        positions = self._positions(exclude)  # sorted, unique
        m = len(positions)
        if m > OVERFETCH_MAX:
            return None
        rows, scores = self._rows_one(q, min(self.count, k + m))
        if m:
            at = np.minimum(np.searchsorted(positions, rows), m - 1)
            keep = positions[at] != rows
            rows, scores = rows[keep], scores[keep]
        rows, scores = rows[:k], scores[:k]
        if len(rows) < k or rows[-1] < 0:
            return None
        return (rows if self._dense else self.item_ids[rows]), scores

    def _rows_one(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [k] and scores [k] of one approximate search for q [d], as `_approximate`
        returns them for a batch of one (-1 / -inf at the end where it runs dry)."""
        q = np.ascontiguousarray(q)
        if self._scan is not None:  # one thread, whatever `threads` says; checks q finite
            p = self.params
            return self._scan.search_one(q, k, p.nprobe, p.rerank)
        if not np.isfinite(q).all():
            raise FunnelrecError("queries contains NaN or infinite values")
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        scores = np.empty(k, dtype=np.float32)
        rows = np.empty(k, dtype=np.int64)
        self._fast_scan(single=True)
        params = self._params(k)
        self._index.search_c(
            1, faiss.swig_ptr(q), k, faiss.swig_ptr(scores), faiss.swig_ptr(rows), params
        )
        return rows, scores

    def _search_positions(
        self, q: np.ndarray, k: int, excl: list[np.ndarray] | None, complete: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (positions, not item ids) and scores; -1 / -inf only past what exists.

        complete=False skips the exhaustive completion of short rows (for `tune`).
        """
        b, n = len(q), self.count
        self._fast_scan(single=b == 1)
        if excl is None and k <= n:  # the serving path: one batched call, nothing to drop
            scores, rows = self._approximate(q, k)
            if rows.min() >= 0:
                return rows, scores
        out_rows = np.full((b, k), -1, dtype=np.int64)
        out_scores = np.full((b, k), -np.inf, dtype=np.float32)
        sizes = np.zeros(b, dtype=np.int64) if excl is None else np.array([len(e) for e in excl])
        available = np.minimum(k, n - sizes)  # results each row can have at all

        # Batched pass: rows excluding at most OVERFETCH_MAX ids fetch k + m and drop them.
        batched = np.flatnonzero(sizes <= OVERFETCH_MAX)
        if len(batched):
            fetch = int(min(n, k + sizes[batched].max()))
            scores, rows = self._approximate(q[batched], fetch)
            if excl is None:
                valid = rows >= 0  # a short approximate row has -1 at its end
                out_rows[:, :fetch] = np.where(valid, rows, -1)[:, :k]
                out_scores[:, :fetch] = np.where(valid, scores, -np.inf)[:, :k]
            for j, r in enumerate(batched if excl is not None else ()):
                keep = rows[j] >= 0
                if excl is not None and sizes[r]:
                    keep &= ~np.isin(rows[j], excl[r])
                got = rows[j][keep][:k]
                out_rows[r, : len(got)] = got
                out_scores[r, : len(got)] = scores[j][keep][:k]
        # Rows with long exclusion lists: one query each, with an id selector.
        for r in np.flatnonzero(sizes > OVERFETCH_MAX):
            assert excl is not None
            kk = int(available[r])
            scores, rows = self._search_selected(q[r : r + 1], kk, excl[r], exhaustive=False)
            got = rows[0] >= 0
            out_rows[r, : got.sum()] = rows[0][got]
            out_scores[r, : got.sum()] = scores[0][got]
        # Whatever is still short (an approximate search that ran dry): exhaustive search.
        filled = (out_rows >= 0).sum(axis=1)
        for r in np.flatnonzero(filled < available) if complete else ():
            kk = int(available[r])
            e = excl[r] if excl is not None else np.zeros(0, dtype=np.int64)
            scores, rows = self._search_selected(q[r : r + 1], kk, e, exhaustive=True)
            out_rows[r, :kk] = rows[0]
            out_scores[r, :kk] = scores[0]
        return out_rows, out_scores

    def _approximate(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [B, k] of the approximate search with the current knobs (no id
        selector): through the scan kernel where it searches this index, else FAISS."""
        if self._scan is not None:
            p = self.params
            threads = self.threads or faiss.omp_get_max_threads()
            rows, scores = self._scan.search(q, k, p.nprobe, p.rerank, threads=threads)
            return scores, rows
        scores, rows = self._index.search(q, k, params=self._params(k))
        return scores, rows

    def _fast_scan(self, *, single: bool) -> None:
        """ivfpq_fs: choose FAISS's fast-scan implementation for one query or a batch.

        Only speed depends on it (the results are the same), so concurrent searches that
        set it differently stay correct.
        """
        if self._fs is not None:
            self._fs.implem = _FS_IMPLEM_SINGLE if single else _FS_IMPLEM_BATCH

    def _params(self, k: int, sel: Any = None, exhaustive: bool = False) -> Any:
        """FAISS per-call search parameters (thread-safe, unlike setting index fields).

        Without a selector they are cached: creating one costs a fair share of a
        sub-millisecond query (docs/ann.md, "The single-query path"). FAISS 1.15 searches
        a graph only `efSearch` deep even when k is larger (and then returns fewer than k),
        so efSearch is raised to what is fetched.
        """
        p = self.params
        fetch = max(k, int(k * p.rerank)) if self.kind in RERANKED else k
        if self.kind in _GRAPH:
            key = (max(p.ef_search, fetch), fetch, p.rerank)
        elif self.kind in _BUCKETS:
            key = (p.nlist if exhaustive else p.nprobe, 0, p.rerank)
        else:
            key = (0, 0, 0.0)
        if sel is None and key in self._param_cache:
            return self._param_cache[key]
        if self.kind in _GRAPH:
            params = faiss.SearchParametersHNSW(efSearch=key[0], sel=sel)
        elif self.kind in _BUCKETS:
            params = faiss.SearchParametersIVF(nprobe=key[0], sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        if self.kind in RERANKED:
            # FAISS keeps a Python reference to base_index_params (and to sel) in params.
            params = faiss.IndexRefineSearchParameters(k_factor=p.rerank, base_index_params=params)
        if sel is None:
            if len(self._param_cache) > 64:
                self._param_cache.clear()
            self._param_cache[key] = params
        return params

    def _search_selected(
        self, q: np.ndarray, k: int, excluded: np.ndarray, *, exhaustive: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search one query over all rows but `excluded` (positions) with an IDSelector."""
        inner = faiss.IDSelectorBatch(excluded)  # both selectors must stay alive here
        sel = faiss.IDSelectorNot(inner)
        if exhaustive and self._floats is not None:
            # The graph or buckets may not reach k allowed rows: scan the float vectors.
            scores, rows = self._floats.search(q, k, params=faiss.SearchParameters(sel=sel))
        else:
            self._fast_scan(single=False)  # what FAISS picks by itself, id selector included
            scores, rows = self._index.search(q, k, params=self._params(k, sel, exhaustive))
        del inner
        return scores, rows

    def _exclusions(
        self, exclude: ArrayLike | Sequence[ArrayLike] | None, b: int
    ) -> list[np.ndarray] | None:
        """Per query, the sorted unique positions of the excluded item ids in the index."""
        if exclude is None:
            return None
        per_query: list[Any]
        if isinstance(exclude, np.ndarray):
            per_query = list(exclude) if exclude.ndim == 2 else [exclude] * b
        elif len(seq := cast(Sequence[Any], exclude)) > 0 and all(np.ndim(e) == 1 for e in seq):
            per_query = list(seq)
        else:
            per_query = [exclude] * b
        if len(per_query) != b:
            raise FunnelrecError(f"exclude has {len(per_query)} id lists for {b} queries")
        return [self._positions(np.asarray(e).reshape(-1)) for e in per_query]

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given item ids (ids not in the index dropped), sorted and unique."""
        ids = ids.astype(np.int64, copy=False)
        if self._dense:
            return np.unique(ids[(ids >= 0) & (ids < self.count)])
        at = np.minimum(np.searchsorted(self._sorted_ids, ids), self.count - 1)
        found = self._sorted_ids[at] == ids
        return np.unique(self._sorter[at[found]])

    # ---------------------------------------------------------------- recall

    def exact_search(
        self, queries: ArrayLike, k: int, *, embeddings: ArrayLike | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-`k` (item_ids [B, k], scores [B, k]) by brute force, for reference.

        ivfpq keeps only compressed vectors, so it needs the original `embeddings` [N, d]
        (rows in the index's order); the other kinds scan their own stored vectors.
        """
        q = _as_matrix(np.atleast_2d(np.asarray(queries, dtype=np.float32)), "queries")
        if q.shape[1] != self.dim:
            raise FunnelrecError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        k = min(k, self.count)
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        if embeddings is not None:
            x = _as_matrix(embeddings, "embeddings")
            if x.shape != (self.count, self.dim):
                raise FunnelrecError(f"embeddings {x.shape} do not match the index's {self.count}")
            scores, rows = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        elif self.kind == "ivfpq":
            raise FunnelrecError("exact search over an ivfpq index needs the original embeddings")
        elif self._floats is not None:
            scores, rows = self._floats.search(q, k)
        else:
            scores, rows = self._index.search(q, k, params=self._params(k, exhaustive=True))
        return self.item_ids[rows], scores

    def recall_vs_exact(
        self,
        queries: ArrayLike,
        k: int = 100,
        *,
        embeddings: ArrayLike | None = None,
        query_source: str = "unspecified",
    ) -> float:
        """Mean over queries [B, d] of |top-k of `search` ∩ exact top-k| / k; kept in `recall`.

        `query_source` says where the queries came from (saved in index.json).
        """
        truth, _ = self.exact_search(queries, k, embeddings=embeddings)
        got, _ = self.search(np.atleast_2d(np.asarray(queries, dtype=np.float32)), truth.shape[1])
        hits = [len(np.intersect1d(g, t)) for g, t in zip(got, truth, strict=True)]
        value = float(np.mean(hits) / truth.shape[1])
        self.recall = {
            "k": int(truth.shape[1]),
            "recall": value,
            "queries": len(truth),
            "query_source": query_source,
            "search_params": self._knob(),
        }
        return value

    def tune(
        self,
        queries: ArrayLike,
        k: int = 100,
        target_recall: float = 0.95,
        *,
        embeddings: ArrayLike | None = None,
        query_source: str = "unspecified",
    ) -> float:
        """Set the smallest ef_search / nprobe whose recall@k on `queries` reaches the target.

        Tries a geometric ladder of values, judging the approximate search alone (without the
        exhaustive completion of rows it leaves short); when none reaches the target, keeps
        the largest. `rerank` stays as set. Returns `recall_vs_exact` at the chosen value
        (also kept in `recall`). exact: nothing to tune.
        """
        if self.kind == "exact":
            return self.recall_vs_exact(
                queries, k, embeddings=embeddings, query_source=query_source
            )
        truth, _ = self.exact_search(queries, k, embeddings=embeddings)
        kk = truth.shape[1]
        if self.kind in _GRAPH:
            # Below what is fetched, efSearch is raised to it (`_params`): the same search.
            fetch = max(kk, int(kk * self.params.rerank)) if self.kind in RERANKED else kk
            values = sorted({max(v, fetch) for v in _LADDER})
        else:
            values = sorted({min(v, self.params.nlist) for v in _LADDER})
        q = _as_matrix(np.atleast_2d(np.asarray(queries, dtype=np.float32)), "queries")
        for v in values:
            if self.kind in _GRAPH:
                self.set_search_params(ef_search=v)
            else:
                self.set_search_params(nprobe=v)
            # Judge the approximate search alone: with the exhaustive completion of short
            # rows, a knob too small to fill k (nprobe=1 on small buckets) would look exact
            # while every query pays for a full scan.
            if self.threads is not None:
                faiss.omp_set_num_threads(self.threads)
            rows, _ = self._search_positions(q, kk, None, complete=False)
            got = np.where(rows >= 0, self.item_ids[np.maximum(rows, 0)], -1)
            hits = [len(np.intersect1d(g, t)) for g, t in zip(got, truth, strict=True)]
            recall = float(np.mean(hits) / kk)
            if recall >= target_recall:
                break
        # Record what `search` delivers at the chosen knob (short rows completed).
        served = self.recall_vs_exact(q, k, embeddings=embeddings, query_source=query_source)
        assert self.recall is not None
        self.recall["target_recall"] = target_recall
        return served

    def _knob(self) -> dict[str, Any]:
        """The search-time settings recall was measured at."""
        knob: dict[str, Any] = {}
        if self.kind in _GRAPH:
            knob["ef_search"] = self.params.ef_search
        elif self.kind in _BUCKETS:
            knob["nprobe"] = self.params.nprobe
        if self.kind in RERANKED:
            knob["rerank"] = self.params.rerank
        return knob

    # ---------------------------------------------------------------- save / load

    def metadata(self) -> dict[str, Any]:
        """What index.json holds."""
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "metric": "inner_product",
            "params": self.params.for_kind(self.kind),
            "dim": self.dim,
            "count": self.count,
            "item_ids_sha256": self.ids_hash,
            "recall": self.recall,
            "build_seconds": self.build_seconds,
            "faiss_version": faiss.__version__,
            "created_by": f"funnelrec {__version__}",
        }

    def save(self, path: Path | str, *, force: bool = False) -> Path:
        """Write DIR/index.faiss and DIR/index.json atomically; `force` replaces DIR."""
        target = Path(path)
        staging = AtomicDirectory(target, force=force)
        try:
            faiss.write_index(self._idmap, str(staging.tmp / INDEX_FILE))
            write_json_atomic(staging.tmp / META_FILE, self.metadata())
            return staging.commit()
        finally:
            staging.abort()

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        expected_dim: int | None = None,
        expected_item_ids: ArrayLike | None = None,
        expected_item_ids_hash: str | None = None,
        threads: int | None = None,
        options: SearchOptions = SearchOptions(),
    ) -> ItemIndex:
        """Open an index saved by `save`, refusing one that does not match the model.

        expected_dim: the model's embedding width. expected_item_ids ([N] int64, rows in
        embedding order) or its `item_ids_hash`: the model's item id mapping.
        Raises ArtifactError naming what does not match.
        """
        path = Path(path)
        meta_path, index_path = path / META_FILE, path / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise ArtifactError(
                f"{path}: no ANN index here (need {META_FILE} and {INDEX_FILE}; "
                "build one with `funnelrec index build`)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{meta_path}: unreadable ({e})") from None
        version = meta.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise ArtifactError(
                f"{meta_path}: index format version {version}, this funnelrec reads "
                f"{INDEX_FORMAT_VERSION}; rebuild it with `funnelrec index build`"
            )
        if expected_dim is not None and meta.get("dim") != expected_dim:
            raise ArtifactError(
                f"{path}: index dimension {meta.get('dim')} does not match the model's "
                f"embedding dimension {expected_dim}; rebuild the index"
            )
        want_hash = expected_item_ids_hash
        if expected_item_ids is not None:
            want_hash = item_ids_hash(expected_item_ids)
        if want_hash is not None and meta.get("item_ids_sha256") != want_hash:
            n_expected = (
                "" if expected_item_ids is None else f" ({np.size(expected_item_ids)} items)"
            )
            raise ArtifactError(
                f"{path}: index item-id mapping ({meta.get('count')} items) does not match "
                f"the model's{n_expected}; rebuild the index"
            )
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ArtifactError(f"{meta_path}: unknown index kind {kind!r}")
        try:
            # Mapped: the arrays are views of the file's pages, shared by every process
            # that maps it, and read-only (nothing writes to a loaded index).
            flags = faiss.IO_FLAG_MMAP_IFC if options.mmap else 0
            idmap = faiss.read_index(str(index_path), flags)
        except RuntimeError as e:
            raise ArtifactError(f"{index_path}: unreadable FAISS index ({e})") from None
        if not isinstance(idmap, faiss.IndexIDMap):
            raise ArtifactError(f"{index_path}: not a funnelrec index (no item id map)")
        held = _structure(idmap.index)
        if held != _STRUCTURE[kind]:
            raise ArtifactError(
                f"{path}: {INDEX_FILE} holds {'/'.join(n for n in held if n)}, but "
                f"{META_FILE} says kind {kind!r}; rebuild the index"
            )
        index = cls(
            idmap,
            kind,
            IndexParams(**meta.get("params", {})),
            threads=threads,
            recall=meta.get("recall"),
            build_seconds=meta.get("build_seconds"),
            options=options,
        )
        if index.dim != meta.get("dim") or index.count != meta.get("count"):
            raise ArtifactError(
                f"{path}: {INDEX_FILE} holds {index.count} x {index.dim}, {META_FILE} says "
                f"{meta.get('count')} x {meta.get('dim')}"
            )
        if index.ids_hash != meta.get("item_ids_sha256"):
            raise ArtifactError(f"{path}: item ids in {INDEX_FILE} do not match {META_FILE}")
        return index


# Knob values `tune` tries: doubling at first, then steps of ~1.15-1.25x where the serving
# settings of 1M-item indexes sit (efSearch / nprobe 128-512), so that it does not
# overshoot the target by a whole doubling of the search cost.
_LADDER: tuple[int, ...] = (
    *(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    *(448, 512, 640, 768, 1024, 1536, 2048),
)


def _new_index(kind: Kind, p: IndexParams, d: int) -> Any:
    """An empty FAISS index of `kind` (all but hnsw_sq, which `_build_hnsw_sq` makes)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "exact":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, ip)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.efSearch = p.ef_search
        # FAISS prunes each node's level-0 links with a heuristic made for metric
        # distances; under inner product with varying norms it drops links that searches
        # need, and recall stalls whatever efSearch is. Keeping the lists full fixes it
        # (docs/ann.md, "Kinds and defaults").
        index.keep_max_size_level0 = True
        return index
    # IVF with inner product clusters on the sphere (FAISS sets spherical k-means).
    quantizer: Any = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, p.nlist, ip)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_bits, ip)
    else:
        index = faiss.IndexIVFPQFastScan(quantizer, d, p.nlist, p.pq_m, 4, ip)
        # Codes of each vector's offset from its bucket's centroid, not of the vector (FAISS's
        # fast-scan default): 4-bit codes of small offsets are finer, and recall is far
        # higher at the same nprobe and rerank (docs/ann.md, "Kinds and defaults").
        index.by_residual = True
    index.nprobe = p.nprobe
    index.own_fields = True  # the IVF index frees its quantizer ...
    quantizer.this.disown()  # ... and Python must not free it again
    if kind == "ivfpq_fs":
        return _reranked(index, faiss.IndexFlatIP(d), p)
    return index


def _reranked(codes: Any, floats: Any, p: IndexParams) -> Any:
    """IndexRefine: search `codes`, re-score the best rerank * k with `floats` (IndexFlatIP)."""
    index = faiss.IndexRefine(codes, floats)
    index.k_factor = p.rerank
    index.own_fields = True  # the refine index frees both ...
    index.own_refine_index = True
    codes.this.disown()  # ... and Python must not free them again
    floats.this.disown()
    return index


def _build_hnsw_sq(
    x: np.ndarray, ids: np.ndarray, p: IndexParams, progress: bool
) -> tuple[Any, tuple[Any, ...]]:
    """(IndexIDMap over the hnsw_sq index of `x` [N, d], Python wrappers to keep alive).

    The graph is built over the float vectors (IndexHNSWFlat), then handed to
    `_hnsw_sq_from`: building it over 8-bit codes is slower, as every insertion decodes
    them (docs/ann.md, "Kinds and defaults").
    """
    graph = _new_index("hnsw", p, x.shape[1])
    _add(graph, x, None, progress, "index hnsw_sq (graph)")
    refine, refs = _hnsw_sq_from(graph, p, take_floats=True)
    del graph
    return _idmap_over(refine, ids), refs


def _hnsw_sq_from(graph: Any, p: IndexParams, *, take_floats: bool) -> tuple[Any, tuple[Any, ...]]:
    """(IndexRefine, wrappers to keep alive): `graph`'s links (an IndexHNSWFlat) over
    scalar-quantised codes of its vectors, re-ranked with the float vectors.

    take_floats: move the float storage out of `graph` (which must then be dropped)
    instead of copying it.
    """
    n, d = int(graph.ntotal), int(graph.d)
    flat = faiss.downcast_index(graph.storage)
    x = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)  # a view of the floats
    qtype = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}
    codes = faiss.IndexHNSWSQ(d, qtype[p.sq_type], p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    codes.hnsw = graph.hnsw  # a copy of the links
    codes.storage.train(x)  # sq8: each dimension's range
    for lo in range(0, n, _ADD_CHUNK):
        codes.storage.add(x[lo : lo + _ADD_CHUNK])
    codes.ntotal = n
    codes.is_trained = True
    if take_floats:
        graph.own_fields = False  # the float vectors outlive the graph index ...
        flat.this.acquire()  # ... owned by Python until `_reranked` hands them to FAISS
        floats = flat
    else:
        floats = faiss.IndexFlatIP(d)
        for lo in range(0, n, _ADD_CHUNK):
            floats.add(x[lo : lo + _ADD_CHUNK])
    refine = _reranked(codes, floats, p)
    return refine, (refine, codes, floats)


def _idmap_over(index: Any, ids: np.ndarray) -> Any:
    """An IndexIDMap giving row i of the filled `index` the item id ids[i]."""
    n = int(index.ntotal)
    index.ntotal = 0  # IndexIDMap insists on wrapping an empty index ...
    idmap = faiss.IndexIDMap(index)
    index.ntotal = n  # ... so its rows get their ids here instead of by add_with_ids
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), idmap.id_map)
    idmap.ntotal = n
    return idmap


def _ivf_of(index: Any) -> Any:
    """The IVF index inside `index` (itself, or the base of a re-ranking index)."""
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _add(index: Any, x: np.ndarray, ids: np.ndarray | None, progress: bool, label: str) -> None:
    """Add `x` [N, d] (with `ids` [N], or in row order) in chunks, with a progress bar."""
    n = len(x)
    with _progress_bar(progress, label, n) as advance:
        for lo in range(0, n, _ADD_CHUNK):
            hi = min(n, lo + _ADD_CHUNK)
            if ids is None:
                index.add(x[lo:hi])
            else:
                index.add_with_ids(x[lo:hi], ids[lo:hi])
            advance(hi - lo)


# What index.faiss must hold (inside its IndexIDMap) for each kind: (class, base class).
_STRUCTURE: dict[str, tuple[str, str | None]] = {
    "exact": ("IndexFlatIP", None),
    "hnsw": ("IndexHNSWFlat", None),
    "hnsw_sq": ("IndexRefine", "IndexHNSWSQ"),
    "ivf": ("IndexIVFFlat", None),
    "ivfpq": ("IndexIVFPQ", None),
    "ivfpq_fs": ("IndexRefine", "IndexIVFPQFastScan"),
}


def _structure(index: Any) -> tuple[str, str | None]:
    """(class name, base class name or None) of a FAISS index, as in `_STRUCTURE`."""
    index = faiss.downcast_index(index)
    name = type(index).__name__
    if isinstance(index, faiss.IndexRefine):
        return "IndexRefine", type(faiss.downcast_index(index.base_index)).__name__
    if isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "IndexFlatIP", None
    return name, None


class _progress_bar:
    """A progress bar (`funnelrec.progress`) of `total` items when enabled; else a no-op."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda _n: None
        from funnelrec.progress import progress_bar  # Rich only where a bar is drawn

        self._bar = progress_bar("items")
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(None, None, None)
