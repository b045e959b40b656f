"""The funnel for sequence data: candidates of three sources, their features, the ranker."""

from __future__ import annotations

import numpy as np
import pytest

from funnelrec.baselines import CoWatch, Interactions, Jagged
from funnelrec.errors import FunnelrecError
from funnelrec.ranking.sequence import Requests, SequenceFunnel, SequenceFunnelConfig, Sources

N = 60


def _world(users: int, seed: int) -> list[list[int]]:
    """Sequences where the next item is the fixed successor of the item before the last
    half the time and one of five popular items otherwise: co-watch's blend of the last
    items and popularity each know a part; the co-occurrence with the second-last item,
    a feature of its own, knows the first exactly."""
    rng = np.random.default_rng(seed)
    succ = (np.arange(N + 1) * 7) % N + 1
    popular = np.array([3, 11, 19, 27, 35])
    out = []
    for _ in range(users):
        seq = [int(x) for x in rng.integers(1, N + 1, size=2)]
        for _ in range(int(rng.integers(6, 12))):
            if rng.random() < 0.5:
                seq.append(int(succ[seq[-2]]))
            else:
                seq.append(int(rng.choice(popular, p=[0.4, 0.25, 0.15, 0.12, 0.08])))
        out.append(seq)
    return out


def _requests(seqs: list[list[int]], first_user: int = 1) -> tuple[Requests, np.ndarray]:
    """One request per sequence: everything but its last item, which is the next one."""
    hist = Jagged.from_rows([np.asarray(s[:-1]) for s in seqs])
    users = np.arange(first_user, first_user + len(seqs), dtype=np.int64)
    return Requests(users, hist), np.array([s[-1] for s in seqs], dtype=np.int64)


def _interactions(seqs: list[list[int]]) -> Interactions:
    user = np.concatenate([np.full(len(s), u + 1) for u, s in enumerate(seqs)])
    item = np.concatenate([np.asarray(s) for s in seqs])
    ts = np.concatenate([np.arange(len(s)) for s in seqs])
    return Interactions(user.astype(np.int64), item.astype(np.int64), ts.astype(np.int64))


def _sources(seqs: list[list[int]], deep: bool = False) -> Sources:
    train = _interactions(seqs)
    co = CoWatch(next_n=2, neighbours=20, last_n=3).fit(train, N)
    pop = np.bincount(train.item, minlength=N + 1).astype(float)
    if not deep:
        return Sources(N, co, pop)
    rng = np.random.default_rng(1)
    items = rng.normal(size=(N + 1, 4)).astype(np.float32)
    items[0] = 0

    def users(u: np.ndarray, h: Jagged) -> np.ndarray:
        return np.stack([items[r].mean(axis=0) if r.size else np.zeros(4) for r in _row_list(h)])

    return Sources(N, co, pop, users, items)


def _row_list(j: Jagged) -> list[np.ndarray]:
    return [j.values[j.offsets[i] : j.offsets[i + 1]] for i in range(len(j))]


def _padded(ids: np.ndarray, k: int = 10) -> np.ndarray:
    out = np.zeros(k, dtype=np.int64)
    out[: min(k, ids.size)] = ids[:k]
    return out


def _hits(ids: np.ndarray, target: np.ndarray, k: int = 10) -> float:
    return float((ids[:, :k] == target[:, None]).any(axis=1).mean())


def test_pool_holds_every_source_list_without_the_history() -> None:
    seqs = _world(100, 0)
    cfg = SequenceFunnelConfig(deep_k=5, cowatch_k=5, popular_k=3, last_n=3)
    f = SequenceFunnel(_sources(seqs, deep=True), cfg)
    req, _ = _requests(seqs[:20])
    pool = f.pool(req)
    assert set(f.feature_names()) == set(pool.raw)
    for q in range(len(req)):
        items = pool.item[pool.query == q]
        hist = req.history.values[req.history.offsets[q] : req.history.offsets[q + 1]]
        assert not np.isin(items, hist).any()
        assert len(np.unique(items)) == len(items)
        # the three most popular unseen items are always there, ranked 0, 1, 2
        pop = f.sources.popularity.copy()
        pop[hist] = -1
        pop[0] = -1
        top3 = np.argsort(-pop, kind="stable")[:3]
        rank = pool.raw["popular_rank"][pool.query == q]
        for r, item in enumerate(top3):
            assert rank[items == item][0] == r
    # co-occurrence with the last item is co-watch's S[last, candidate]
    sim = f.sources.cowatch.sim.toarray()
    last = pool.last_item[pool.query]
    assert np.allclose(pool.raw["cooc_1"], sim[last, pool.item])
    # a rank is NaN exactly where that source did not nominate the item
    nominated = sum(np.isfinite(pool.raw[f"{s}_rank"]) for s in ("deep", "cowatch", "popular"))
    assert np.array_equal(nominated, pool.raw["sources"])
    assert (pool.raw["sources"] >= 1).all()


def test_topic_share_is_the_history_share_of_the_candidates_category() -> None:
    seqs = _world(60, 6)
    src = _sources(seqs)
    src.topic = np.arange(N + 1) % 3  # category 0 (no category) for every third item
    f = SequenceFunnel(src, SequenceFunnelConfig(cowatch_k=10, popular_k=10))
    req, _ = _requests(seqs[:10])
    pool = f.pool(req)
    assert "topic_share" in f.feature_names()
    for r in range(0, len(pool), 7):
        q, c = pool.query[r], pool.item[r]
        hist = _row_list(req.history)[q]
        want = np.nan if c % 3 == 0 else np.mean(hist % 3 == c % 3)
        assert np.isclose(pool.raw["topic_share"][r], want, equal_nan=True)


def test_ranker_orders_the_pool_better_than_each_source() -> None:
    seqs = _world(600, 0)
    train_seqs, valid_seqs, test_seqs = seqs[:400], seqs[400:500], seqs[500:]
    # the sources never see the pages' next items: fitted on the sequences without them
    sources = _sources([s[:-1] for s in train_seqs] + [s[:-1] for s in valid_seqs])
    cfg = SequenceFunnelConfig(
        cowatch_k=10, popular_k=10, last_n=3, item_dim=0, tower=(16,), batch_size=256, lr=0.01,
        patience=5,
    )  # fmt: skip
    f = SequenceFunnel(sources, cfg)
    tr, tr_next = _requests(train_seqs)
    va, va_next = _requests(valid_seqs, 401)
    f.fit(tr, tr_next, va, va_next)
    te, te_next = _requests(test_seqs, 501)
    ids, z = f.recommend(te, 10)
    assert ids.shape == (100, 10)
    assert (np.diff(z, axis=1) <= 0).all()  # best first
    funnel = _hits(ids, te_next, 1)
    co = np.stack(
        [_padded(sources.cowatch.top_k(h, 10, exclude=h)[0]) for h in _row_list(te.history)]
    )
    pop = np.stack(
        [
            _padded(
                np.setdiff1d(np.argsort(-sources.popularity, kind="stable"), h, assume_unique=True)[
                    :10
                ]
            )
            for h in _row_list(te.history)
        ]
    )
    # the best first item: the second-last item's successor, which only the ranker, with
    # the co-occurrence of each last item as a feature of its own, can put first
    assert funnel > _hits(co, te_next, 1) + 0.1
    assert funnel > _hits(pop, te_next, 1) + 0.1
    assert f.summary["pages"] > 0 and 1 <= f.summary["best_epoch"] <= f.summary["epochs"]


def test_fit_is_deterministic() -> None:
    seqs = _world(200, 3)
    sources = _sources([s[:-1] for s in seqs])
    cfg = SequenceFunnelConfig(cowatch_k=8, popular_k=5, item_dim=4, tower=(8,), max_epochs=3)
    tr, tr_next = _requests(seqs[:150])
    va, va_next = _requests(seqs[150:], 151)
    a = SequenceFunnel(sources, cfg).fit(tr, tr_next, va, va_next).recommend(va, 5)
    b = SequenceFunnel(sources, cfg).fit(tr, tr_next, va, va_next).recommend(va, 5)
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])


def test_requests_subset_and_a_sampled_validation() -> None:
    seqs = _world(40, 7)
    req, nxt = _requests(seqs)
    sub = req.subset(np.array([5, 2, 30]))
    rows = _row_list(req.history)
    assert [r.tolist() for r in _row_list(sub.history)] == [rows[i].tolist() for i in (5, 2, 30)]
    assert sub.users.tolist() == [6, 3, 31]
    cfg = SequenceFunnelConfig(cowatch_k=8, popular_k=5, tower=(8,), max_epochs=2, valid_max=10)
    f = SequenceFunnel(_sources([s[:-1] for s in seqs]), cfg).fit(req, nxt, req, nxt)
    assert f.summary["mean_candidates_valid"] > 0
    with pytest.raises(FunnelrecError, match="valid_max"):
        SequenceFunnelConfig(valid_max=0)


def test_pages_need_a_nominated_next_item() -> None:
    seqs = _world(50, 4)
    f = SequenceFunnel(_sources(seqs), SequenceFunnelConfig(cowatch_k=0, popular_k=1))
    tr, _ = _requests(seqs)
    never = np.full(len(tr), N)  # the least popular id is nobody's top 1
    with pytest.raises(FunnelrecError, match="no source nominated"):
        f.fit(tr, never, tr, never)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deep_k": -1}, "deep_k"),
        ({"deep_k": 0, "cowatch_k": 0, "popular_k": 0}, "every source is off"),
        ({"item_dim": -1}, "item_dim"),
        ({"patience": 0}, "patience"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_config_is_checked(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(FunnelrecError, match=message):
        SequenceFunnelConfig(**overrides)  # type: ignore[arg-type]


def test_sources_are_checked() -> None:
    seqs = _world(20, 5)
    co = CoWatch().fit(_interactions(seqs), N)
    with pytest.raises(FunnelrecError, match="popularity has shape"):
        Sources(N, co, np.ones(N))
    with pytest.raises(FunnelrecError, match="co-watch knows"):
        Sources(N + 5, co, np.ones(N + 6))
    with pytest.raises(FunnelrecError, match="go together"):
        Sources(N, co, np.ones(N + 1), deep_items=np.zeros((N + 1, 2)))
