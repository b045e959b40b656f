"""The ivfpq_fs scan kernel (funnelrec.ann.fastscan, C) against FAISS and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from funnelrec.ann import fastscan
from funnelrec.ann.index import IndexParams, ItemIndex, SearchOptions
from funnelrec.errors import FunnelrecError
from tests.ann.test_index import clustered  # the same kind of data as the other index tests

pytestmark = pytest.mark.skipif(
    not fastscan.available(), reason="the C kernel was not built (no compiler at install)"
)

N, D, NLIST = 3000, 32, 32
PARAMS = IndexParams(nlist=NLIST, nprobe=8, pq_m=16, pq_bits=4, rerank=4.0)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [N, D], item ids [N]: sparse, shuffled, queries [200, D]): 20 clusters."""
    both = clustered(N + 200, D, 3)
    ids = np.random.default_rng(4).permutation(np.arange(N, dtype=np.int64) * 5 + 11)
    return both[:N], ids, both[N:]


@pytest.fixture(scope="module")
def index(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ItemIndex:
    x, ids, _ = data
    return ItemIndex.build(x, ids, "ivfpq_fs", PARAMS, threads=1)


@pytest.fixture()
def scan(index: ItemIndex) -> fastscan.FastScan:
    """The kernel's view of `index`."""
    assert index._scan is not None
    return index._scan


@pytest.fixture()
def faiss_only(index: ItemIndex) -> ItemIndex:
    """The same FAISS index, searched by FAISS."""
    faiss = SearchOptions(scan_kernel=False)
    return ItemIndex(index._idmap, "ivfpq_fs", index.params, threads=1, options=faiss)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(r, s)) / len(s) for r, s in zip(a, b, strict=True)]))


def test_the_kernel_searches_ivfpq_fs_by_default(index: ItemIndex) -> None:
    assert index.scan_implementation.startswith("funnelrec kernel (")
    assert fastscan.level() in index.scan_implementation


def test_the_layout_holds_each_vectors_pq_code_of_its_residual(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], index: ItemIndex, scan: fastscan.FastScan
) -> None:
    x, _, _ = data
    ivf = index._fs
    _, codebook, list_start, list_size, codes, rows, _ = scan._arrays
    m = codebook.shape[0]
    assert (list_start[1:] - list_start[:-1] >= list_size).all()
    centroids = ivf.quantizer.reconstruct_n(0, NLIST)
    for bucket in range(NLIST):
        first, size = int(list_start[bucket]), int(list_size[bucket])
        held = rows[first : first + size]
        assert (rows[first + size : list_start[bucket + 1]] == -1).all()  # padding
        # the kernel's blocks back to one row of m / 2 bytes per vector
        blocks = codes[first // 32 : (first + size + 31) // 32]  # [b, m/2, 32]
        unpacked = blocks.transpose(0, 2, 1).reshape(-1, m // 2)[:size]
        want = ivf.pq.compute_codes(x[held] - centroids[bucket])
        np.testing.assert_array_equal(unpacked, want)
    assert np.array_equal(np.sort(rows[rows >= 0]), np.arange(N))


def test_every_bucket_and_a_full_rerank_give_the_exact_top_k(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], scan: fastscan.FastScan
) -> None:
    x, _, q = data
    rows, scores = scan.search(q, 10, nprobe=NLIST, rerank=N / 10)
    exact = q @ x.T
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), rtol=1e-5)


def test_the_kernel_finds_what_faiss_finds(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], index: ItemIndex, faiss_only: ItemIndex
) -> None:
    x, ids, q = data
    for rerank in (1.0, 4.0):
        index.set_search_params(rerank=rerank)
        faiss_only.set_search_params(rerank=rerank)
        got, scores = index.search(q, 20)
        theirs, _ = faiss_only.search(q, 20)
        # the same buckets, codes and re-rank depth; only the 8-bit tables round apart
        assert overlap(got, theirs) >= (0.95 if rerank > 1 else 0.85)
        assert (np.diff(scores, axis=1) <= 0).all()  # best first
        row_of = {int(i): r for r, i in enumerate(ids)}
        rows = np.vectorize(row_of.__getitem__)(got)
        np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q, x[rows]), rtol=1e-5)
        # one query at a time (the serving path) gives the batch's results
        for i in range(0, len(q), 37):
            one, one_scores = index.search(q[i], 20)
            np.testing.assert_array_equal(one, got[i])
            np.testing.assert_allclose(one_scores, scores[i], rtol=1e-6)
    index.set_search_params(rerank=PARAMS.rerank)
    assert index.recall_vs_exact(q, 20) >= faiss_only.recall_vs_exact(q, 20) - 0.02


def test_every_instruction_set_gives_the_same_results(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], scan: fastscan.FastScan
) -> None:
    _, _, q = data
    best = fastscan.level()
    runnable = ["portable C", *(["AVX2"] if best in ("AVX2", "AVX-512") else [])]
    runnable += ["AVX-512"] if best == "AVX-512" else []
    results = {}
    try:
        for name in runnable:
            assert fastscan.force_level(name) == name
            results[name] = scan.search(q, 15, nprobe=6, rerank=2.0)
    finally:
        fastscan.force_level(None)
    assert fastscan.level() == best
    rows0, scores0 = results["portable C"]
    for rows, scores in results.values():
        np.testing.assert_array_equal(rows, rows0)
        np.testing.assert_allclose(scores, scores0, rtol=1e-5)


def test_a_batch_split_over_threads_gives_the_one_thread_results(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], scan: fastscan.FastScan
) -> None:
    _, _, q = data
    one = scan.search(q, 10, nprobe=4, rerank=3.0, threads=1)
    two = scan.search(q, 10, nprobe=4, rerank=3.0, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_buckets_too_small_for_k_come_back_short_and_search_completes_them(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], index: ItemIndex, scan: fastscan.FastScan
) -> None:
    _, _, q = data
    k = 400  # more than one bucket holds (~94 items on average)
    rows, scores = scan.search(q[:3], k, nprobe=1, rerank=1.0)
    short = rows < 0
    assert short.any() and np.isneginf(scores[short]).all()
    assert (np.diff(short.astype(int), axis=1) >= 0).all()  # -1 only at the end
    index.set_search_params(nprobe=1)
    try:
        got, _ = index.search(q[:3], k)  # completed exhaustively: k real items
    finally:
        index.set_search_params(nprobe=PARAMS.nprobe)
    assert (got >= 0).all() and all(len(np.unique(r)) == k for r in got)


def test_bad_arguments_are_refused(scan: fastscan.FastScan) -> None:
    with pytest.raises(FunnelrecError, match=r"queries must be \[B, 32\]"):
        scan.search(np.zeros((2, 5), dtype=np.float32), 10, nprobe=4, rerank=1.0)
    with pytest.raises(FunnelrecError, match="bad arguments"):
        scan.search(np.zeros((1, D), dtype=np.float32), 0, nprobe=4, rerank=1.0)
    with pytest.raises(FunnelrecError, match="unknown instruction set"):
        fastscan.force_level("SSE9")


def test_indexes_the_kernel_cannot_search_stay_with_faiss(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, ids, q = data
    # 6 sub-quantizers (of 4 dims): not a multiple of 4, which the kernel needs
    odd = ItemIndex.build(x[:, :24], ids, "ivfpq_fs", IndexParams(nlist=16, pq_m=6), threads=1)
    assert odd._scan is None and odd.scan_implementation == "FAISS"
    assert fastscan.supports(odd._fs) is not None
    got, _ = odd.search(q[:, :24], 5)
    assert (got >= 0).all()


def test_without_avx2_the_index_is_searched_by_faiss(index: ItemIndex) -> None:
    # the portable C scan is the SIMD code's reference, slower than FAISS's own
    try:
        fastscan.force_level("portable C")
        assert fastscan.FastScan.from_faiss(index._fs, index._floats) is None
        assert fastscan.FastScan.from_faiss(index._fs, index._floats, portable=True) is not None
    finally:
        fastscan.force_level(None)


def test_concurrent_searches_give_the_sequential_results(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], index: ItemIndex
) -> None:
    """A server's threads search one index at once (ctypes lets go of the GIL): each
    call has its own working memory, so the results are those of one search at a time."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, q = data
    want = [index.search(v, 10) for v in q]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda v: index.search(v, 10), list(q) * 3))
    for i, (ids, scores) in enumerate(got):
        np.testing.assert_array_equal(ids, want[i % len(q)][0])
        np.testing.assert_array_equal(scores, want[i % len(q)][1])
