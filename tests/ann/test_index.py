"""ItemIndex: every kind against brute force, exclusion, save/load and the mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from funnelrec.ann import index as ann
from funnelrec.ann.index import (
    KINDS,
    IndexParams,
    ItemIndex,
    SearchOptions,
    default_kind,
    item_ids_hash,
)
from funnelrec.errors import ArtifactError, FunnelrecError

N, D = 2000, 16
# Small enough to be quick, generous enough that hnsw/ivf are near exact on 2000 items.
PARAMS = IndexParams(
    hnsw_m=16, ef_construction=64, ef_search=64, nlist=16, nprobe=16, pq_m=8, pq_bits=4
)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """[n, d] float32: 20 Gaussian clusters of unequal size, norms varying (dot product)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    which = rng.choice(20, size=n, p=np.arange(1, 21) / 210)
    x = centres[which] + 0.5 * rng.standard_normal((n, d))
    return (x * rng.lognormal(0, 0.2, (n, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [N, D], item ids [N]: sparse, shuffled, queries [8, D])."""
    rng = np.random.default_rng(1)
    ids = rng.permutation(np.arange(N, dtype=np.int64) * 3 + 7)
    both = clustered(N + 8, D, 0)  # queries from the same clusters as the items
    return both[:N], ids, both[N:]


@pytest.fixture(scope="module")
def built(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, ItemIndex]:
    x, ids, _ = data
    return {k: ItemIndex.build(x, ids, k, PARAMS, threads=1) for k in KINDS}


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item ids [B, k] by numpy."""
    scores = q @ x.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def exact_scores(x: np.ndarray, ids: np.ndarray, q: np.ndarray, got: np.ndarray) -> np.ndarray:
    """[B, k] dot products of each query with the items it got (by numpy)."""
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.vectorize(row_of.__getitem__)(got)
    return np.einsum("bd,bkd->bk", q, x[rows])


@pytest.mark.parametrize("kind", KINDS)
def test_search_matches_brute_force_and_survives_save_load(
    kind: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    built: dict[str, ItemIndex],
    tmp_path: Path,
) -> None:
    x, ids, q = data
    index = built[kind]
    got, scores = index.search(q, 10)
    assert got.shape == scores.shape == (8, 10)
    assert got.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    truth = brute_force(x, ids, q, 10)
    overlap = np.mean([len(np.intersect1d(g, t)) / 10 for g, t in zip(got, truth, strict=True)])
    if kind == "ivfpq":  # compressed codes: approximate scores, looser agreement
        assert overlap >= 0.6
    elif kind in ann.RERANKED:  # compressed search, exact re-rank: exact scores of what it finds
        assert overlap >= 0.9
        np.testing.assert_allclose(scores, exact_scores(x, ids, q, got), rtol=1e-5)
    else:
        assert overlap == 1.0
        np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], rtol=1e-4)

    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.faiss", "index.json"]
    again = ItemIndex.load(tmp_path / "index", expected_dim=D, expected_item_ids=ids, threads=1)
    assert again.kind == kind and again.count == N and again.dim == D
    assert again.params.for_kind(kind) == index.params.for_kind(kind)
    got2, scores2 = again.search(q, 10)
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_allclose(scores2, scores)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_single_queries(
    kind: str, data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex]
) -> None:
    _, _, q = data
    index = built[kind]
    ids, scores = index.search(q, 7)
    for i in range(len(q)):
        one_ids, one_scores = index.search(q[i], 7)
        assert one_ids.shape == (7,)
        np.testing.assert_array_equal(one_ids, ids[i])
        np.testing.assert_allclose(one_scores, scores[i], rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_exclusion_keeps_k_and_drops_excluded(
    kind: str, data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex]
) -> None:
    x, ids, q = data
    index = built[kind]
    k = 20
    top = brute_force(x, ids, q, 60)
    rng = np.random.default_rng(3)
    exclude = [
        top[0, :20],  # exactly the true top-k
        top[1, :60],  # more than k
        np.array([], dtype=np.int64),
        np.array([-5, 10**9, top[3, 0]]),  # unknown ids are ignored
        rng.choice(ids, ann.OVERFETCH_MAX + 200, replace=False),  # the id-selector path
        top[5, ::2],
        ids[:1500],  # leaves 500 items
        top[7, :5],
    ]
    got, scores = index.search(q, k, exclude=exclude)
    assert got.shape == (8, k)
    assert (got >= 0).all() and np.isfinite(scores).all()  # K kept
    for row, ex in zip(got, exclude, strict=True):
        assert not np.isin(row, ex).any()
        assert len(np.unique(row)) == k
    if kind == "exact":
        for r, ex in enumerate(exclude):
            keep = ~np.isin(ids, ex)
            np.testing.assert_array_equal(
                got[r], brute_force(x[keep], ids[keep], q[r : r + 1], k)[0]
            )

    # One array excludes the same ids for every query.
    shared, _ = index.search(q, k, exclude=top[0, :10])
    assert not np.isin(shared, top[0, :10]).any() and (shared >= 0).all()


def test_approximate_search_that_runs_dry_is_completed_exhaustively(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, ids, q = data
    # One bucket of ~125 vectors cannot hold k=300 results; the index must still fill them.
    index = ItemIndex.build(x, ids, "ivf", IndexParams(nlist=16, nprobe=1), threads=1)
    got, scores = index.search(q, 300, exclude=ids[:100])
    assert (got >= 0).all() and np.isfinite(scores).all()
    assert not np.isin(got, ids[:100]).any()
    keep = ~np.isin(ids, ids[:100])
    truth = brute_force(x[keep], ids[keep], q, 300)
    # The exhaustive fallback is exact: same items as brute force.
    for g, t in zip(got, truth, strict=True):
        assert set(g) == set(t)


@pytest.mark.parametrize("kind", ["hnsw", "hnsw_sq", "ivfpq_fs"])
def test_k_beyond_what_remains_is_padded(
    kind: str, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x, ids, q = data
    params = IndexParams(hnsw_m=8)
    index = ItemIndex.build(x[:50], ids[:50], kind, params, threads=1)  # type: ignore[arg-type]
    got, scores = index.search(q, 60, exclude=ids[:5])
    assert (got[:, :45] >= 0).all() and (got[:, 45:] == -1).all()
    assert np.isneginf(scores[:, 45:]).all()
    assert set(got[0, :45]) == set(ids[5:50])


def test_default_kind_by_corpus_size(
    monkeypatch: pytest.MonkeyPatch, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    assert default_kind(ann.EXACT_MAX_ITEMS) == "exact"
    assert default_kind(ann.EXACT_MAX_ITEMS + 1) == "ivfpq_fs"
    x, ids, _ = data
    assert ItemIndex.build(x[:100], ids[:100], threads=1).kind == "exact"
    monkeypatch.setattr(ann, "EXACT_MAX_ITEMS", 999)
    assert ItemIndex.build(x[:1000], ids[:1000], threads=1).kind == "ivfpq_fs"


def test_auto_params_follow_corpus_size() -> None:
    p = IndexParams().resolved("ivfpq", 1_000_000, 128)
    assert p.nlist == 4096 and p.train_size == 64 * 4096 and p.pq_m == 16
    small = IndexParams().resolved("ivf", 1000, 8)
    assert small.nlist <= 1000 // 39 and small.train_size == 1000
    with pytest.raises(FunnelrecError, match="pq_m=5 must divide"):
        IndexParams(pq_m=5).resolved("ivfpq", 1000, 16)
    fs = IndexParams().resolved("ivfpq_fs", 1_000_000, 128)
    assert fs.nlist == 2048 and fs.pq_m == 64 and fs.rerank == ann.DEFAULT_RERANK["ivfpq_fs"]
    sq = IndexParams(rerank=3).resolved("hnsw_sq", 1_000_000, 128)
    assert sq.rerank == 3.0 and sq.sq_type == "sq8"
    assert IndexParams().resolved("hnsw_sq", 10, 4).rerank == ann.DEFAULT_RERANK["hnsw_sq"]
    with pytest.raises(FunnelrecError, match="sq_type='int4' must be one of"):
        IndexParams(sq_type="int4").resolved("hnsw_sq", 1000, 16)
    with pytest.raises(FunnelrecError, match=r"rerank=0\.5 must be between 1 and 64"):
        IndexParams(rerank=0.5).resolved("ivfpq_fs", 1000, 16)


def test_recall_against_exact(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex]
) -> None:
    x, _, q = data
    assert built["exact"].recall_vs_exact(q, 50) == 1.0
    assert built["ivf"].recall_vs_exact(q, 50) == 1.0  # nprobe = nlist scans everything
    assert built["hnsw"].recall_vs_exact(q, 50, query_source="test") >= 0.9
    # the re-ranked kinds keep the float vectors: exact ground truth without `embeddings`
    assert built["hnsw_sq"].recall_vs_exact(q, 50) >= 0.9
    assert built["ivfpq_fs"].recall_vs_exact(q, 50) >= 0.9
    assert built["ivfpq_fs"].recall is not None
    rerank = ann.DEFAULT_RERANK["ivfpq_fs"]
    assert built["ivfpq_fs"].recall["search_params"] == {"nprobe": 16, "rerank": rerank}
    assert built["hnsw"].recall is not None and built["hnsw"].recall["query_source"] == "test"
    with pytest.raises(FunnelrecError, match="needs the original embeddings"):
        built["ivfpq"].recall_vs_exact(q, 50)
    r = built["ivfpq"].recall_vs_exact(q, 50, embeddings=x)
    assert 0.0 < r < 1.0


def test_tune_picks_smallest_knob_reaching_target(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, ids, q = data
    index = ItemIndex.build(x, ids, "ivf", IndexParams(nlist=16, nprobe=1), threads=1)
    reached = index.tune(q, k=50, target_recall=0.99, query_source="held-out")
    chosen = index.params.nprobe
    assert reached >= 0.99 and 1 <= chosen <= 16
    if chosen > 1:  # the next smaller value on the ladder must miss the target
        smaller = max(v for v in ann._LADDER if v < chosen)
        index.set_search_params(nprobe=smaller)
        assert index.recall_vs_exact(q, 50) < 0.99
        index.set_search_params(nprobe=chosen)
        index.recall_vs_exact(q, 50, query_source="held-out")
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["recall"]["recall"] >= 0.99 and meta["recall"]["query_source"] == "held-out"
    assert meta["params"]["nprobe"] == chosen
    assert ItemIndex.load(tmp_path / "idx").params.nprobe == chosen


def test_tune_ignores_settings_that_only_an_exhaustive_completion_makes_exact(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, ids, q = data
    # ~31 vectors per bucket: nprobe 1 or 2 cannot fill k=100, and `search` completes such
    # rows exhaustively (recall 1); tuning must not take that for a good setting.
    index = ItemIndex.build(x, ids, "ivf", IndexParams(nlist=64, nprobe=1), threads=1)
    index.set_search_params(nprobe=1)
    assert index.recall_vs_exact(q, 100) == 1.0
    assert index.tune(q, k=100, target_recall=0.9) >= 0.9
    assert index.params.nprobe >= 4


def test_load_refuses_mismatches(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex], tmp_path: Path
) -> None:
    _, ids, _ = data
    path = built["exact"].save(tmp_path / "index")
    with pytest.raises(ArtifactError, match=r"dimension 16 does not match .* 32"):
        ItemIndex.load(path, expected_dim=32)
    with pytest.raises(ArtifactError, match="item-id mapping"):
        ItemIndex.load(path, expected_item_ids=ids[::-1])  # same ids, other order
    with pytest.raises(ArtifactError, match="item-id mapping"):
        ItemIndex.load(path, expected_item_ids_hash=item_ids_hash(ids[:-1]))
    ItemIndex.load(path, expected_item_ids_hash=item_ids_hash(ids))  # the right one loads

    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        ItemIndex.load(path)
    (path / "index.json").write_text(json.dumps({**meta, "count": N + 1}))
    with pytest.raises(ArtifactError, match="says"):
        ItemIndex.load(path)
    (path / "index.faiss").write_bytes(b"not faiss")
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unreadable FAISS index"):
        ItemIndex.load(path)
    with pytest.raises(ArtifactError, match="no ANN index"):
        ItemIndex.load(tmp_path / "missing")


def test_save_is_atomic_and_does_not_overwrite_by_default(
    built: dict[str, ItemIndex], tmp_path: Path
) -> None:
    built["exact"].save(tmp_path / "index")
    with pytest.raises(FunnelrecError, match="already exists"):
        built["hnsw"].save(tmp_path / "index")
    built["hnsw"].save(tmp_path / "index", force=True)
    assert ItemIndex.load(tmp_path / "index").kind == "hnsw"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temporary leftovers


def test_bad_input_is_refused(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    x, ids, q = data
    with pytest.raises(FunnelrecError, match="unique"):
        ItemIndex.build(x[:3], np.array([1, 1, 2]))
    with pytest.raises(FunnelrecError, match=">= 0"):
        ItemIndex.build(x[:3], np.array([0, -1, 2]))
    with pytest.raises(FunnelrecError, match="shape"):
        ItemIndex.build(x[:3], ids[:2])
    with pytest.raises(FunnelrecError, match="unknown index kind"):
        ItemIndex.build(x[:3], ids[:3], "lsh")  # type: ignore[arg-type]
    index = ItemIndex.build(x[:100], ids[:100], "exact")
    with pytest.raises(FunnelrecError, match="dimension 8, the index 16"):
        index.search(q[:, :8], 5)
    bad = q.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FunnelrecError, match="NaN"):
        index.search(bad, 5)
    none_ids, none_scores = index.search(np.zeros((0, D), dtype=np.float32), 5)
    assert none_ids.shape == none_scores.shape == (0, 5)
    with pytest.raises(FunnelrecError, match="2 id lists for 8 queries"):
        index.search(q, 5, exclude=[ids[:2], ids[2:4]])


# --------------------------------------------------------------------------- re-ranked kinds


def test_reranking_deeper_never_loses_recall_and_fixes_the_order(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, ids, q = data
    # A shallow graph and a coarse IVF: their compressed scores misorder items near the top.
    for kind, params in (
        ("hnsw_sq", IndexParams(hnsw_m=4, ef_construction=8, ef_search=10)),
        ("ivfpq_fs", IndexParams(nlist=16, nprobe=2, pq_m=4)),
    ):
        index = ItemIndex.build(x, ids, kind, params, threads=1)  # type: ignore[arg-type]
        recalls = []
        for rerank in (1.0, 4.0, 16.0):
            index.set_search_params(rerank=rerank)
            recalls.append(index.recall_vs_exact(q, 20))
            got, scores = index.search(q, 20)
            np.testing.assert_allclose(scores, exact_scores(x, ids, q, got), rtol=1e-5)
            assert (np.diff(scores, axis=1) <= 0).all()  # exact scores, best first
        assert recalls[0] <= recalls[1] <= recalls[2], (kind, recalls)
        assert recalls[0] < 1.0, kind  # the shallow settings are really approximate
    with pytest.raises(FunnelrecError, match="rerank applies to"):
        ItemIndex.build(x[:100], ids[:100], "exact").set_search_params(rerank=2)


def test_hnsw_converts_to_hnsw_sq_with_the_same_graph(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex], tmp_path: Path
) -> None:
    _, ids, q = data
    hnsw = ItemIndex.build(data[0], ids, "hnsw", PARAMS, threads=1)
    converted = hnsw.to_hnsw_sq("sq8", rerank=2)
    assert converted.kind == "hnsw_sq" and converted.params.rerank == 2.0
    # one thread builds the same graph every time: converting equals building hnsw_sq
    got, scores = converted.search(q, 10)
    want, want_scores = built["hnsw_sq"].search(q, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert hnsw.search(q, 10)[0].shape == (8, 10)  # the hnsw index still works
    converted.save(tmp_path / "sq")
    assert ItemIndex.load(tmp_path / "sq", expected_item_ids=ids).params.for_kind("hnsw_sq") == (
        converted.params.for_kind("hnsw_sq")
    )
    fp16 = hnsw.to_hnsw_sq("fp16")
    assert fp16.recall_vs_exact(q, 10) == 1.0
    with pytest.raises(FunnelrecError, match="only an hnsw index"):
        built["ivf"].to_hnsw_sq()


def test_load_refuses_an_index_of_another_kind_than_its_record(
    built: dict[str, ItemIndex], tmp_path: Path
) -> None:
    path = built["hnsw"].save(tmp_path / "index")
    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "kind": "hnsw_sq"}))
    with pytest.raises(ArtifactError, match=r"holds IndexHNSWFlat, but index\.json says kind"):
        ItemIndex.load(path)
    path = built["ivfpq_fs"].save(tmp_path / "fs")
    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "kind": "hnsw_sq"}))
    with pytest.raises(ArtifactError, match="IndexRefine/IndexIVFPQFastScan"):
        ItemIndex.load(path)


def test_fast_scan_picks_its_single_query_scan_and_gives_the_batch_results(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    built: dict[str, ItemIndex],
) -> None:
    _, ids, q = data
    built_index = built["ivfpq_fs"]
    faiss_only = SearchOptions(scan_kernel=False)  # FAISS's own search (the fallback)
    index = ItemIndex(
        built_index._idmap, "ivfpq_fs", built_index.params, threads=1, options=faiss_only
    )
    assert index.scan_implementation == "FAISS"
    fs = index._fs
    batch_ids, batch_scores = index.search(q, 20)
    assert fs.implem == ann._FS_IMPLEM_BATCH
    for i in range(len(q)):
        one_ids, one_scores = index.search(q[i], 20)
        assert fs.implem == ann._FS_IMPLEM_SINGLE
        np.testing.assert_array_equal(one_ids, batch_ids[i])
        np.testing.assert_allclose(one_scores, batch_scores[i], rtol=1e-5)
    # Exclusion by id selector goes back to FAISS's own choice, and still excludes.
    drop = ids[: ann.OVERFETCH_MAX + 1]
    got, _ = index.search(q[:1], 20, exclude=drop)
    assert fs.implem == ann._FS_IMPLEM_BATCH
    assert not np.isin(got, drop).any() and (got >= 0).all()


def test_huge_pages_change_nothing_but_where_the_arrays_live() -> None:
    # 3 MiB of floats and HNSW links: at least one whole 2 MiB page to advise (the advice
    # is best effort: whether Linux grants it depends on the machine), same results.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, 128)).astype(np.float32)
    ids = np.arange(6000) * 3
    q = rng.standard_normal((20, 128)).astype(np.float32)
    for kind in ("exact", "hnsw", "ivfpq_fs"):
        p = IndexParams(hnsw_m=8, nlist=32, nprobe=8)
        off, on = SearchOptions(huge_pages=False), SearchOptions(huge_pages=True)
        small = ItemIndex.build(x, ids, kind, p, threads=1, options=off).search(q, 10)
        huge = ItemIndex.build(x, ids, kind, p, threads=1, options=on).search(q, 10)
        np.testing.assert_array_equal(small[0], huge[0])
        np.testing.assert_array_equal(small[1], huge[1])
    buf = np.zeros(1 << 20, dtype=np.uint8)  # 1 MiB: no whole 2 MiB page inside
    assert not ann._huge_pages(buf.ctypes.data, buf.nbytes)


@pytest.mark.parametrize("kind", KINDS)
def test_one_query_with_exclusions_gives_what_the_batch_path_gives(
    kind: str, data: tuple[np.ndarray, np.ndarray, np.ndarray], built: dict[str, ItemIndex]
) -> None:
    """The serving path (one query, one id array excluded) against the general one (a batch
    of one with a list of exclusions): the same ids and scores, in every case the general
    path handles differently (nothing excluded, unknown ids, the id selector, too few
    left for k)."""
    x, ids, q = data
    index = built[kind]
    rng = np.random.default_rng(5)
    top = brute_force(x, ids, q, 40)
    cases = [
        np.array([], dtype=np.int64),
        top[0, :10],
        np.array([-5, 10**9, top[1, 0]]),  # unknown ids are ignored
        rng.choice(ids, 60, replace=False),
        rng.choice(ids, ann.OVERFETCH_MAX + 5, replace=False),  # the id-selector path
        ids[: N - 10],  # fewer than k left: padded with -1 / -inf
    ]
    for r, exclude in enumerate(cases):
        query = q[r % len(q)]
        one = index.search(query, 20, exclude=exclude)
        general = index.search(query[None], 20, exclude=[exclude])
        np.testing.assert_array_equal(one[0], general[0][0])
        np.testing.assert_array_equal(one[1], general[1][0])
        assert not np.isin(one[0], exclude).any()


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq_fs"])
def test_a_mapped_index_reads_its_file_and_searches_the_same(
    kind: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    built: dict[str, ItemIndex],
    tmp_path: Path,
) -> None:
    """Loaded with `mmap` (the default), the vectors are the file's pages: what processes
    loading one file share. Without it, a copy of the process's own; the same results."""
    _, ids, q = data
    path = built[kind].save(tmp_path / kind)
    mapped = ItemIndex.load(path, expected_item_ids=ids, options=SearchOptions(mmap=True))
    copied = ItemIndex.load(path, expected_item_ids=ids, options=SearchOptions(mmap=False))
    for got, want in zip(mapped.search(q, 10), copied.search(q, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    if Path("/proc/self/maps").exists():
        maps = Path("/proc/self/maps").read_text()
        assert str((path / ann.INDEX_FILE).resolve()) in maps
        del mapped
        assert str((path / ann.INDEX_FILE).resolve()) not in Path("/proc/self/maps").read_text()
