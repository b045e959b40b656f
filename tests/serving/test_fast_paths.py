"""The serving hot path against its references: the direct ranking features against the
training code's (`RankingFeaturizer.reference_batch`), the request ranker's logits and the
user tower's vector against the models' own forward passes, the co-watch source's one-item
row against its sparse product, and the whole funnel against the path they replaced."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from funnelrec.baselines.data import Jagged, _history_matrix
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import RankingBatch
from funnelrec.features.serving import RankingFeaturizer, RequestFeatures, UserEvents
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.inference import RequestRanker, RequestUserTower
from funnelrec.serving.recommender import (
    DEEP,
    FRESH,
    SOURCES,
    Recommender,
    RecommendRequest,
)
from funnelrec.serving.state import UserContext, UserStateStore


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    return Recommender.load(build_tiny_artifact(tmp_path_factory.mktemp("fast"), steps=50))


def _random_request(
    rng: np.random.Generator, n_items: int, words: list[str]
) -> tuple[UserEvents, np.ndarray, int]:
    """Events of a made-up user around time `ts`, some of them at or after it (ignored, as
    in training), with repeated items, equal times, churn counts with and without a last
    time, and candidates that the user watched or was shown."""
    ts = 1_000_000
    n = int(rng.integers(0, 40))
    history = rng.integers(1, n_items + 1, n)
    history_ts = ts - rng.integers(-5, 3_000, n)  # a few at or after ts
    history_ts[: n // 4] = ts - 100  # equal times: the given order decides
    q = int(rng.integers(0, 12))
    queries = [" ".join(rng.choice(words, int(rng.integers(1, 4)))) for _ in range(q)]
    queries_ts = (ts - rng.integers(-3, 2_000, q)).tolist()
    cand = rng.choice(np.arange(1, n_items + 1), int(rng.integers(1, 60)), replace=False)
    cand[: min(len(cand), n) // 2] = np.unique(history)[: min(len(cand), n) // 2]
    cand = np.unique(cand)
    rng.shuffle(cand)
    shown_items = rng.choice(cand, min(len(cand), int(rng.integers(0, 15))), replace=False)
    shown = {int(i): int(rng.integers(0, 5)) for i in shown_items}
    shown_ts = {int(i): int(ts - rng.integers(-2, 500)) for i in shown_items[::2]}
    events = UserEvents(
        history=history.tolist(),
        history_ts=history_ts.tolist(),
        queries=queries,
        queries_ts=queries_ts,
        shown=shown,
        shown_ts=shown_ts,
    )
    return events, cand, ts


class _Recording:
    """A normaliser that keeps the raw features it is given (the quantile normaliser maps
    nearby values to one level, so equal dense inputs alone would hide small errors)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.raw: list[dict[str, np.ndarray]] = []

    def transform(self, data: dict[str, np.ndarray]) -> np.ndarray:
        self.raw.append({k: np.array(v, dtype=np.float64) for k, v in data.items()})
        return np.asarray(self.inner.transform(data))


def _compare(featurizer: RankingFeaturizer, *args: Any, **kwargs: Any) -> None:
    """`batch` and `reference_batch` of the same request: equal raw features and batch."""
    recording = featurizer.normalizer
    assert isinstance(recording, _Recording)
    fast = featurizer.batch(*args, **kwargs)
    ref = featurizer.reference_batch(*args, **kwargs)
    got, want = recording.raw[-2:]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    _assert_same(fast, ref)


def _assert_same(fast: RankingBatch, ref: RankingBatch) -> None:
    assert fast.categorical.keys() == ref.categorical.keys()
    for name, ids in ref.categorical.items():
        assert torch.equal(fast.categorical[name], ids), name
    assert fast.bags.keys() == ref.bags.keys()
    for name, (ids, offsets) in ref.bags.items():
        assert torch.equal(fast.bags[name][0], ids), name
        assert torch.equal(fast.bags[name][1], offsets), name
    # the same float32 bits: NaN-free (the normaliser maps missing to 0 plus a flag)
    assert torch.equal(fast.dense, ref.dense)
    for name in ("label", "watch_time", "user_id", "request_id"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


def _words(featurizer: RankingFeaturizer) -> list[str]:
    """Query words: some in the token vocabulary, some not."""
    known = [str(v) for v in featurizer.token.values[:30].tolist() if " " not in str(v)]
    return [*known, "zzunknownzz", "qqq"]


def test_direct_features_equal_the_training_codes(
    rec: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    featurizer = rec.featurizer
    assert featurizer.vectorised
    monkeypatch.setattr(featurizer, "normalizer", _Recording(featurizer.normalizer))
    rng = np.random.default_rng(0)
    words = _words(featurizer)
    for _ in range(60):
        events, cand, ts = _random_request(rng, featurizer.items.num_items, words)
        region, device = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        _compare(featurizer, events, cand, ts, region=region, device=device)


def test_direct_features_with_unknown_channels_topics_and_times(rec: Recommender) -> None:
    """Items without a channel, topic, upload time or duration: missing features, as the
    training code makes them."""
    items = rec.featurizer.items
    assert items.channel is not None and items.topic_code is not None
    assert items.upload_ts is not None and items.duration is not None
    rng = np.random.default_rng(1)
    n = items.num_items + 1
    hole = rng.random(n) < 0.3
    topic = items.topic.to_pylist()  # type: ignore[union-attr]
    holed = replace(
        items,
        channel=np.where(hole, 0, items.channel),
        topic=pa.array([None if h else t for h, t in zip(hole, topic, strict=True)], pa.string()),
        topic_code=np.where(hole, 0, items.topic_code),
        upload_ts=np.where(rng.random(n) < 0.3, np.nan, items.upload_ts),
        duration=np.where(rng.random(n) < 0.3, np.nan, items.duration),
    )
    featurizer = RankingFeaturizer(rec.featurizer.features, holed)
    assert featurizer.vectorised
    featurizer.normalizer = _Recording(featurizer.normalizer)  # type: ignore[assignment]
    words = _words(featurizer)
    for _ in range(40):
        events, cand, ts = _random_request(rng, items.num_items, words)
        _compare(featurizer, events, cand, ts)


def test_direct_features_refuse_what_the_training_code_refuses(rec: Recommender) -> None:
    featurizer = rec.featurizer
    n = featurizer.items.num_items
    good = UserEvents(history=[1, 2], history_ts=[10, 20])
    bad = [
        (UserEvents(history=[1, 2], history_ts=[10]), np.array([3]), "differ in length"),
        (UserEvents(queries=["a"], queries_ts=[]), np.array([3]), "differ in length"),
        (good, np.array([n + 1]), f"item id {n + 1} is not in the corpus"),
        (UserEvents(history=[0], history_ts=[5]), np.array([3]), "item id 0 is not"),
    ]
    for events, cand, message in bad:
        for build in (featurizer.batch, featurizer.reference_batch):
            with pytest.raises(Exception, match=message):
                build(events, cand, 100)


def test_request_ranker_equals_the_model_forward(
    rec: Recommender, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = UserStateStore(tmp_path / "state.db")
    rec.seed_state(store)
    requests: list[RequestFeatures] = []
    request_of = rec.featurizer.request

    def keep(*args: object, **kwargs: object) -> RequestFeatures:
        requests.append(request_of(*args, **kwargs))  # type: ignore[arg-type]
        return requests[-1]

    monkeypatch.setattr(rec.featurizer, "request", keep)
    for user in range(1, 40):
        rec.recommend(RecommendRequest(user_id=user, k=5), store.context(user))
    rec.recommend(RecommendRequest(history=[1, 2, 3], queries=["news"], k=5))
    ranker = RequestRanker(rec.ranker)
    batches = [request.batch() for request in requests]
    for request, batch in zip(requests, batches, strict=True):
        with torch.no_grad():
            want = rec.ranker(batch).double().numpy()
        got = ranker.logits(batch)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # the request as the featurizer gives it (the serving path): the very same numbers
        np.testing.assert_array_equal(ranker.request_logits(request), got)
        np.testing.assert_array_equal(ranker.request_logits(RequestFeatures.of_batch(batch)), got)

    # Two requests in one batch: their bags differ, and the model's forward runs as it is.
    def history(batch: RankingBatch) -> torch.Tensor:
        ids, offsets = batch.bags["history"]
        return ids[: int(offsets[1])] if len(batch) > 1 else ids

    a = batches[0]
    b = next(x for x in batches[1:] if not torch.equal(history(x), history(a)))
    both = RankingBatch(
        categorical={k: torch.cat([a.categorical[k], b.categorical[k]]) for k in a.categorical},
        bags={
            k: (torch.cat([ids, b.bags[k][0]]), torch.cat([offs, b.bags[k][1] + ids.numel()]))
            for k, (ids, offs) in a.bags.items()
        },
        dense=torch.cat([a.dense, b.dense]),
        label=torch.cat([a.label, b.label]),
        watch_time=torch.cat([a.watch_time, b.watch_time]),
        user_id=torch.cat([a.user_id, b.user_id]),
        request_id=torch.cat([a.request_id, b.request_id + 1]),
    )
    with torch.no_grad():
        want = rec.ranker(both).double().numpy()
    np.testing.assert_array_equal(ranker.logits(both), want)
    # a batch without an input the model reads: the model's own error
    first = batches[0]
    lacking = replace(
        first, categorical={k: v for k, v in first.categorical.items() if k != "item"}
    )
    with pytest.raises(FunnelrecError, match="lacks categorical feature 'item'"):
        ranker.logits(lacking)


def test_the_user_tower_equals_the_model_forward(rec: Recommender, tmp_path: Path) -> None:
    store = UserStateStore(tmp_path / "state.db")
    rec.seed_state(store)
    tower = RequestUserTower(rec.candidate_model)
    contexts = [rec._context(RecommendRequest(user_id=u), store.context(u)) for u in range(1, 40)]
    batches = [
        rec.features.candidate_batch(
            [list(c.events.history)], [list(c.events.queries)], [c.demographics]
        )
        for c in contexts
    ]
    batches.append(rec.features.candidate_batch([[]], [[]], [None]))  # nothing known
    batches.append(rec.features.candidate_batch([[1, 2, 2]], [["zzunknownzz"]], [None]))
    for batch in batches:
        with torch.inference_mode():
            want = rec.candidate_model(batch).float().numpy()[0]
        np.testing.assert_array_equal(tower.user_vector(batch), want)
    # several users at once: the model's own forward
    two = rec.features.candidate_batch([[1], [2, 3]], [[], ["news"]], [None, None])
    with torch.inference_mode():
        want_two = rec.candidate_model(two).float().numpy()
    np.testing.assert_array_equal(tower.user_vector(two), want_two[0])


def test_the_cowatch_row_of_one_item_equals_the_sparse_product(rec: Recommender) -> None:
    cowatch = rec.cowatch
    rng = np.random.default_rng(3)
    n = cowatch.num_items
    for _ in range(200):
        history = rng.integers(1, n + 1, int(rng.integers(1, 12)))
        h = Jagged.from_rows([history])
        weights = cowatch._weights(h)
        got = cowatch._score_row(h, weights)
        row = (_history_matrix(h, weights, n) @ cowatch.sim).tocsr()
        order = np.argsort(got[0])
        want_order = np.argsort(row.indices)
        np.testing.assert_array_equal(got[0][order], row.indices[want_order])
        np.testing.assert_array_equal(got[1][order], row.data[want_order])
    # several weighted items (last_n > 1): the sparse product itself
    got_ids, _ = cowatch.top_k(np.array([1, 2, 3]), 10, last_n=3)
    assert len(got_ids) > 0


Item = tuple[int, float, float, dict[str, float]]


def _unoptimised(
    rec: Recommender, req: RecommendRequest, ctx: UserContext | None
) -> tuple[list[Item], int]:
    """`Recommender.recommend` as it was before its serving fast paths: the models' own
    forward passes on laid-out batches, the index's general search, the co-watch source's
    sparse product, the merge by `np.isin` and the sources by dictionaries. Returns the
    items (id, expected watch time, logit, sources) and how many were ranked."""
    user = rec._context(req, ctx)
    history = np.asarray(user.events.history, dtype=np.int64)
    watched = np.unique(history) if req.exclude_watched else None
    cand_batch = rec.features.candidate_batch(
        [list(user.events.history)], [list(user.events.queries)], [user.demographics]
    )
    nominated: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if user.has_signal and rec.config.deep_k > 0:
        with torch.inference_mode():
            u = rec.candidate_model(cand_batch).float().numpy()
        k_deep = min(max(rec.config.deep_k, req.k), rec.index.count)
        excl = None if watched is None else [watched]
        ids, scores = rec.index.search(u, k_deep, exclude=excl)
        keep = ids[0] >= 0
        nominated[DEEP] = (ids[0][keep], scores[0][keep])
    k_fresh = rec.config.fresh_k if DEEP in nominated else max(rec.config.fresh_k, req.k)
    nominated[FRESH] = rec.fresh.top_k(history, k_fresh, exclude=watched)
    if history.size and rec.config.cowatch_k > 0:
        h = Jagged.from_rows([history])
        m = _history_matrix(h, rec.cowatch._weights(h), rec.cowatch.num_items)
        row = (m @ rec.cowatch.sim).tocsr()
        dense = np.full(rec.cowatch.num_items + 1, -np.inf, dtype=np.float32)
        dense[row.indices] = row.data
        if watched is not None:
            dense[watched] = -np.inf
        good = row.indices[dense[row.indices] > rec.cowatch.min_candidate_score]
        top = good[np.lexsort((good, -dense[good]))[: rec.config.cowatch_k]].astype(np.int64)
        nominated["cowatch"] = (top, dense[top])
    present = [s for s in SOURCES if s in nominated]
    all_ids = np.concatenate([nominated[s][0] for s in present])
    all_scores = np.concatenate([np.asarray(nominated[s][1], np.float64) for s in present])
    all_src = np.repeat(np.arange(len(present)), [len(nominated[s][0]) for s in present])
    if watched is not None:
        keep = ~np.isin(all_ids, watched)
        all_ids, all_scores, all_src = all_ids[keep], all_scores[keep], all_src[keep]
    _, first = np.unique(all_ids, return_index=True)
    first = np.sort(first)
    cand = all_ids[first].astype(np.int64)
    batch = rec.featurizer.batch(
        user.events,
        cand,
        user.ts,
        region=int(cand_batch.region[0]),
        device=int(cand_batch.device[0]),
        sources=[present[i] for i in all_src[first]],
        scores=all_scores[first],
    )
    logit = RequestRanker(rec.ranker).logits(batch)
    ewt = rec.ranker.seconds_from_logits(logit)
    order = np.lexsort((cand, -ewt))[: req.k]
    by_source = {
        s: dict(zip(nominated[s][0].tolist(), nominated[s][1].tolist(), strict=True))
        for s in present
    }
    items: list[Item] = []
    for i in order:
        item = int(cand[i])
        sources = {s: float(by_source[s][item]) for s in present if item in by_source[s]}
        items.append((item, float(ewt[i]), float(logit[i]), sources))
    return items, len(cand)


def test_the_funnel_recommends_what_the_unoptimised_path_did(
    rec: Recommender, tmp_path: Path
) -> None:
    """Every fast path together: the same items, scores and sources, to the last bit."""
    store = UserStateStore(tmp_path / "state.db")
    rec.seed_state(store)
    requests: list[tuple[RecommendRequest, UserContext | None]] = [
        (RecommendRequest(user_id=u, k=10), store.context(u)) for u in range(1, 80)
    ]
    requests += [
        (RecommendRequest(history=[1, 2, 3], queries=["news"], k=7), None),
        (RecommendRequest(user_id=5, k=10, exclude_watched=False), store.context(5)),
        (RecommendRequest(k=5), None),  # nothing known: the fresh source alone
    ]
    for req, ctx in requests:
        got = rec.recommend(req, ctx)
        want, ranked = _unoptimised(rec, req, ctx)
        assert got.info["ranked"] == ranked
        assert [
            (it.item_id, it.expected_watch_time, it.score, it.sources) for it in got.items
        ] == want


def test_model_threads_bound_numpys_blas_too() -> None:
    """A worker's numpy BLAS (the added items' exact search) runs on the worker's model
    threads, not one thread per core."""
    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    from funnelrec.serving.http import set_model_threads

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy has no BLAS that threadpoolctl can see")
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    with threadpool_limits(2, user_api="blas"):
        try:
            assert set_model_threads(1) == 1
            assert blas_threads() == {1}
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(torch_before)
            faiss.omp_set_num_threads(faiss_before)
