"""The ivfpq_fs search in C: buckets of 4-bit PQ codes scanned with SIMD byte shuffles,
then an exact re-rank, one query per call on one thread (`funnelrec/ann/_fastscan.c`).

FAISS builds and stores the index (k-means buckets, the product quantizer, the codes,
the float vectors); this module reads them once into the layout the kernel scans and
searches them. It does the same work as FAISS's fast-scan search followed by
`IndexRefine` (the same buckets, codes and re-rank depth, so recall is the same to the
rounding of the 8-bit tables), in less time per query (timed in turns with FAISS in one
process on the 1M x 128 benchmark: docs/ann.md, "The scan kernel", and
benchmarks/results/ann_settings.json). What it saves is the bookkeeping around the same
SIMD lookups: a block's 32 sums are compared with the current cut in SIMD and only blocks
holding a candidate leave it, candidates are cut back with a branch-free selection, and
their rows are looked up only at the end.

The kernel is a compiled extension, built when the package is installed if a C compiler
is at hand (it is optional: without it `available()` is False and ItemIndex searches
through FAISS). It picks AVX-512, AVX2 or portable C by what the CPU runs, all giving
identical numbers; ItemIndex uses it only where AVX2 or better runs (the portable C is
the reference the SIMD code is tested against, and far slower: docs/ann.md).

    scan = FastScan.from_faiss(ivf_fast_scan_index, flat_ip_index)   # or None
    rows, scores = scan.search(queries, k=100, nprobe=112, rerank=6.0)
"""

from __future__ import annotations

import ctypes
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np

from funnelrec.errors import FunnelrecError
from funnelrec.kernels import native

# The kernel's limits (see _fastscan.c): 16-bit sums need 255 * m < 2^15.
MAX_SUB_QUANTIZERS = 128
_BLOCK = 32  # vectors per block of codes
# Batches at least this long are split over threads (each call is one thread).
_SPLIT_MIN = 64


class _Index(ctypes.Structure):
    _fields_ = [
        ("d", ctypes.c_int32),
        ("nlist", ctypes.c_int32),
        ("m", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("centroids", ctypes.c_void_p),
        ("codebook", ctypes.c_void_p),
        ("list_start", ctypes.c_void_p),
        ("list_size", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("vectors", ctypes.c_void_p),
    ]


def _load_library() -> Any:
    """The compiled kernel through ctypes, or None when it was not built."""
    lib = native.load("funnelrec.ann._fastscan")
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.fs_search.argtypes = [p, p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p]
    lib.fs_search.restype = ctypes.c_int
    lib.fs_level.argtypes = []
    lib.fs_level.restype = ctypes.c_int
    lib.fs_force_level.argtypes = [ctypes.c_int]
    lib.fs_force_level.restype = ctypes.c_int
    return lib


_LIB = _load_library()


def available() -> bool:
    """Whether the compiled kernel is installed."""
    return _LIB is not None


def level() -> str:
    """The instruction set searches run with ("AVX-512", "AVX2", "portable C")."""
    if _LIB is None:
        raise FunnelrecError("the fast-scan kernel is not built (funnelrec/ann/_fastscan.c)")
    return native.LEVELS[int(_LIB.fs_level())]


def force_level(name: str | None) -> str:
    """Run searches with the given instruction set ("AVX-512", "AVX2", "portable C"), or
    the best the CPU supports (None). For tests: every level gives identical results."""
    if _LIB is None:
        raise FunnelrecError("the fast-scan kernel is not built (funnelrec/ann/_fastscan.c)")
    if name is not None and name not in native.LEVELS:
        raise FunnelrecError(f"unknown instruction set {name!r}; one of {list(native.LEVELS)}")
    code = -1 if name is None else native.LEVELS.index(name)
    if _LIB.fs_force_level(code) < 0:
        raise FunnelrecError(f"this CPU cannot run {name}")
    return level()


def supports(ivf: Any) -> str | None:
    """Why the kernel cannot search this FAISS fast-scan IVF index, or None if it can."""
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "the kernel searches by inner product only"
    if not ivf.by_residual:
        return "the kernel scans codes of residuals (by_residual) only"
    m, nbits = int(ivf.pq.M), int(ivf.pq.nbits)
    if nbits != 4 or m % 4 or m > MAX_SUB_QUANTIZERS or ivf.d % m:
        return f"the kernel needs 4-bit codes and 4 <= M <= 128, M % 4 == 0 (M={m}, {nbits} bits)"
    if ivf.bbs != _BLOCK:
        return f"the kernel reads blocks of {_BLOCK} codes (bbs={ivf.bbs})"
    return None


def _nibble_positions(packer: Any, m: int) -> np.ndarray:
    """[32, m]: where FAISS's packed block keeps each (vector, sub-quantizer) code, as a
    nibble index (2 * byte + 0 for the low nibble, + 1 for the high one).

    Read off FAISS's own unpacking: for each bit t of the nibble index, a block whose
    every nibble holds that bit of its own index is unpacked, so the codes spell out
    their positions bit by bit (no assumption about FAISS's layout)."""
    size = int(packer.block_size)
    position = np.arange(2 * size)
    found = np.zeros((_BLOCK, m), dtype=np.int64)
    codes = np.empty((_BLOCK, int(packer.code_size)), dtype=np.uint8)
    for t in range(int(2 * size - 1).bit_length()):
        bit = ((position >> t) & 1).astype(np.uint8)
        block = np.ascontiguousarray(bit[0::2] | (bit[1::2] << 4))
        packer.unpack_all(faiss.swig_ptr(block), faiss.swig_ptr(codes))
        unpacked = np.stack([codes & 15, codes >> 4], axis=2).reshape(_BLOCK, -1)[:, :m]
        found |= unpacked.astype(np.int64) << t
    if len(np.unique(found)) != found.size:
        raise FunnelrecError("FAISS's packed code layout is not a one-to-one nibble map")
    return found


class FastScan:
    """An ivfpq_fs index's buckets, codes and float vectors, as the kernel searches them.

    Holds references to the FAISS indexes whose memory it reads (the float vectors are
    not copied), which must not change afterwards (ItemIndex adds nothing once built);
    the codes are copied once into the kernel's layout (32 bytes a vector).
    """

    def __init__(
        self,
        centroids: np.ndarray,
        codebook: np.ndarray,
        list_start: np.ndarray,
        list_size: np.ndarray,
        codes: np.ndarray,
        rows: np.ndarray,
        vectors: np.ndarray,
        owners: tuple[Any, ...] = (),
    ) -> None:
        if _LIB is None:
            raise FunnelrecError("the fast-scan kernel is not built (funnelrec/ann/_fastscan.c)")
        self._arrays = (centroids, codebook, list_start, list_size, codes, rows, vectors)
        self._owners = owners
        m, _, dsub = codebook.shape
        d, nlist = m * dsub, list_size.shape[0]
        self._struct = _Index(d, nlist, m, 0, *(a.ctypes.data for a in self._arrays))
        self.dim = int(d)
        self._ref = ctypes.byref(self._struct)

    @classmethod
    def from_faiss(cls, ivf: Any, floats: Any, *, portable: bool = False) -> FastScan | None:
        """From a FAISS `IndexIVFPQFastScan` (inner product, by residual, 4-bit codes)
        whose row numbers index the `IndexFlat` `floats`; None when the kernel is not
        built or cannot search this index (`supports`), and on a CPU without AVX2 unless
        `portable`: the portable C scan is far slower than the SIMD ones, slower even than
        FAISS's own (which has ARM NEON code; timings in docs/ann.md, "The scan kernel");
        it is the reference the SIMD paths are tested against."""
        if _LIB is None or supports(ivf) is not None:
            return None
        if not portable and int(_LIB.fs_level()) == 0:
            return None
        nlist, d, m = int(ivf.nlist), int(ivf.d), int(ivf.pq.M)
        centroids = _blocked(ivf.quantizer.reconstruct_n(0, nlist).astype(np.float32))
        codebook = faiss.vector_to_array(ivf.pq.centroids).astype(np.float32)
        codebook = np.ascontiguousarray(codebook.reshape(m, 16, d // m))
        invlists = ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        blocks = (sizes + _BLOCK - 1) // _BLOCK
        list_start = np.zeros(nlist + 1, dtype=np.int64)
        list_start[1:] = np.cumsum(blocks * _BLOCK)
        packer = ivf.get_CodePacker()
        block_size = int(packer.block_size)
        packed = np.empty((int(blocks.sum()), block_size), dtype=np.uint8)
        rows = np.full(int(list_start[-1]), -1, dtype=np.int64)
        for i in np.flatnonzero(sizes):
            first = int(list_start[i]) // _BLOCK
            raw = faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(blocks[i]) * block_size)
            packed[first : first + blocks[i]] = np.asarray(raw).reshape(-1, block_size)
            ids = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            rows[list_start[i] : list_start[i] + sizes[i]] = ids
        codes = _to_kernel_layout(packed, _nibble_positions(packer, m), m)
        ntotal = int(floats.ntotal)
        if rows.max(initial=-1) >= ntotal:
            raise FunnelrecError("fast-scan index rows point past the float vectors")
        raw = faiss.rev_swig_ptr(floats.codes.data(), ntotal * d * 4)
        vectors = np.asarray(raw).view(np.float32).reshape(ntotal, d)
        return cls(
            centroids, codebook, list_start, sizes, codes, rows, vectors, owners=(ivf, floats)
        )

    def search(
        self, queries: np.ndarray, k: int, nprobe: int, rerank: float, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [B, k] int64 and exact scores [B, k] float32, best first, of the k best of
        the int(k * rerank) best codes in the nprobe best buckets (-1 / -inf past what
        those buckets hold). queries: [B, d] float32; one holding NaN or an infinity is
        refused (FunnelrecError)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise FunnelrecError(f"queries must be [B, {self.dim}], got {list(q.shape)}")
        b = q.shape[0]
        rows = np.empty((b, k), dtype=np.int64)
        scores = np.empty((b, k), dtype=np.float32)
        fetch = max(k, int(k * rerank))
        parts = min(max(1, threads), b // _SPLIT_MIN) if b >= 2 * _SPLIT_MIN else 1
        if parts <= 1:
            self._call(q, rows, scores, k, nprobe, fetch)
        else:  # one thread per slice: ctypes lets go of the GIL during each call
            bounds = np.linspace(0, b, parts + 1).astype(int)
            with ThreadPoolExecutor(parts) as pool:
                done = [
                    pool.submit(self._call, q[lo:hi], rows[lo:hi], scores[lo:hi], k, nprobe, fetch)
                    for lo, hi in itertools.pairwise(bounds)
                ]
                for f in done:
                    f.result()
        return rows, scores

    def search_one(
        self, query: np.ndarray, k: int, nprobe: int, rerank: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` of one query [d] float32, with the least per-call work: rows [k],
        scores [k]. The serving path: its buffers are ctypes arrays, as reading a numpy
        array's address (`.ctypes.data`) on every call is a visible share of a
        sub-millisecond query (docs/ann.md, "The single-query path")."""
        if query.shape != (self.dim,) or query.dtype != np.float32:
            raise FunnelrecError(f"a query must be [{self.dim}] float32, got {query.shape}")
        floats: Any = ctypes.c_float * self.dim  # (typeshed: from_buffer_copy wants bytes)
        q = floats.from_buffer_copy(np.ascontiguousarray(query))
        rows: Any = (ctypes.c_int64 * k)()
        scores: Any = (ctypes.c_float * k)()
        status = _LIB.fs_search(self._ref, q, 1, nprobe, k, max(k, int(k * rerank)), rows, scores)
        if status != 0:
            _raise(status, k, nprobe)
        return np.frombuffer(rows, dtype=np.int64), np.frombuffer(scores, dtype=np.float32)

    def _call(
        self, q: np.ndarray, rows: np.ndarray, scores: np.ndarray, k: int, nprobe: int, fetch: int
    ) -> None:
        status = _LIB.fs_search(
            self._ref,
            q.ctypes.data,
            q.shape[0],
            nprobe,
            k,
            fetch,
            rows.ctypes.data,
            scores.ctypes.data,
        )
        if status != 0:
            _raise(status, k, nprobe)


def _raise(status: int, k: int, nprobe: int) -> None:
    """The error for a non-zero status of fs_search."""
    if status == -3:
        raise FunnelrecError("queries contains NaN or infinite values")
    what = "out of memory" if status == -2 else f"bad arguments (k={k}, nprobe={nprobe})"
    raise FunnelrecError(f"fast-scan search failed: {what}")


def _blocked(centroids: np.ndarray) -> np.ndarray:
    """[nlist, d] -> [ceil(nlist / 16), d, 16]: blocks of 16 centroids, component-major
    (zeros past nlist), as the kernel scores them."""
    nlist, d = centroids.shape
    blocks = (nlist + 15) // 16
    padded = np.zeros((blocks * 16, d), dtype=np.float32)
    padded[:nlist] = centroids
    return np.ascontiguousarray(padded.reshape(blocks, 16, d).transpose(0, 2, 1))


def _to_kernel_layout(packed: np.ndarray, position: np.ndarray, m: int) -> np.ndarray:
    """FAISS's packed blocks [n_blocks, block_size] -> the kernel's [n_blocks, m/2, 32]:
    in run j, byte i = code of (vector i, sub-quantizer 2j) | code of (i, 2j+1) << 4."""
    out = np.empty((packed.shape[0], m // 2, _BLOCK), dtype=np.uint8)
    low, high = position[:, 0::2].T, position[:, 1::2].T  # [m/2, 32] nibble indices
    chunk = 1 << 14
    for lo in range(0, packed.shape[0], chunk):
        p = packed[lo : lo + chunk]
        nibbles = np.empty((p.shape[0], 2 * p.shape[1]), dtype=np.uint8)
        nibbles[:, 0::2] = p & 15
        nibbles[:, 1::2] = p >> 4
        out[lo : lo + chunk] = nibbles[:, low] | (nibbles[:, high] << 4)
    return out
