"""The funnel end to end on the tiny simulated world: one real pipeline run, many requests."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.recommender import (
    COWATCH,
    DEEP,
    FRESH,
    Demographics,
    Recommender,
    RecommendRequest,
    ServingConfig,
)
from funnelrec.serving.state import ImpressionEvent, UserStateStore, WatchEvent

STAGES = {
    "context",
    "candidates_deep",
    "candidates_fresh",
    "candidates_cowatch",
    "merge",
    "features",
    "ranking",
    "total",
}


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("rec"), steps=100)


@pytest.fixture(scope="module")
def rec(art: Path) -> Recommender:
    return Recommender.load(art)


@pytest.fixture(scope="module")
def store(rec: Recommender, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserStateStore]:
    s = UserStateStore(tmp_path_factory.mktemp("state") / "state.db")
    rec.seed_state(s)
    yield s
    s.close()


def _user_with_history(store: UserStateStore, at_least: int, start: int = 1) -> int:
    for u in range(start, 500):
        if len(store.context(u).history) >= at_least:
            return u
    raise AssertionError("no such user")


def test_known_user_gets_k_ranked_items_from_every_source(
    rec: Recommender, store: UserStateStore
) -> None:
    u = _user_with_history(store, 10)
    ctx = store.context(u)
    resp = rec.recommend(RecommendRequest(user_id=u, k=10), ctx)
    assert len(resp.items) == 10
    assert set(resp.timings_ms) == STAGES and all(v >= 0 for v in resp.timings_ms.values())
    assert resp.info["known_user"] and resp.info["demographics"] == "stored"
    assert resp.info["history"] == len(ctx.history) and resp.info["queries"] == len(ctx.queries)
    assert resp.info["request_ts"] == rec.now + 1  # the end of the data's window
    assert resp.info["candidates"] == {DEEP: 300, COWATCH: 50, FRESH: 50}
    # the whole merged pool, ranked: every source shows up, each with its own score
    pool = rec.recommend(RecommendRequest(user_id=u, k=1000), ctx)
    seen = {s for it in pool.items for s in it.sources}
    assert seen == {DEEP, FRESH, COWATCH}
    assert len({it.item_id for it in pool.items}) == len(pool.items)  # de-duplicated
    assert any(len(it.sources) > 1 for it in pool.items)  # remembered every nominator
    # the same pool (deep_k >= k) ranked deeper: the top 10 are the same items
    deeper = rec.recommend(RecommendRequest(user_id=u, k=300), ctx)
    assert [it.item_id for it in deeper.items[:10]] == [it.item_id for it in resp.items]


def test_each_candidates_source_and_score_reach_the_featurizer_which_ignores_them(
    rec: Recommender, store: UserStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served, every candidate's primary source and score go to the featurizer. The tiny
    world's features are built with `candidate_columns=false` (the simulator logs its
    logging policy's sources, not the served ones: docs/simulator.md), so the ranker has
    neither as an input and the batch is the one without them."""
    features = rec.featurizer.features
    assert features.config.candidate_columns is False
    assert "source" not in features.manifest["vocabularies"]
    featurizer = rec.featurizer
    assert featurizer.source is None and not featurizer.uses_score
    assert "source" not in dict(rec.ranker.spec.categorical)
    assert not [c for c in rec.ranker.spec.dense_columns if "cand_score" in c]
    calls = []
    request_of, batch_of = featurizer.request, featurizer.batch

    def spy(*args, **kwargs):
        request = request_of(*args, **kwargs)
        calls.append((args, kwargs, request.batch()))
        return request

    monkeypatch.setattr(featurizer, "request", spy)
    u = _user_with_history(store, 10)
    resp = rec.recommend(RecommendRequest(user_id=u, k=10), store.context(u))
    ((args, kwargs, batch),) = calls
    sources, scores = kwargs["sources"], np.asarray(kwargs["scores"])
    src = np.asarray(sources)
    assert set(src.tolist()) == {DEEP, COWATCH, FRESH} and len(src) == len(batch)
    assert np.isfinite(scores).all()
    # the score handed over is the primary (first in SOURCES order) nomination's own
    primary = {(s, float(x)) for s, x in zip(sources, scores, strict=True)}
    for it in resp.items:
        first = next(s for s in (DEEP, COWATCH, FRESH) if s in it.sources)
        assert (first, it.sources[first]) in primary
    # ... and the batch is the same without them
    bare = batch_of(*args, **{**kwargs, "sources": None, "scores": None})
    assert "source" not in batch.categorical
    assert set(bare.categorical) == set(batch.categorical)
    for name, ids in batch.categorical.items():
        assert torch.equal(bare.categorical[name], ids), name
    assert torch.equal(bare.dense, batch.dense)


def test_response_ranks_by_expected_watch_time(rec: Recommender, store: UserStateStore) -> None:
    u = _user_with_history(store, 5)
    resp = rec.recommend(RecommendRequest(user_id=u, k=50), store.context(u))
    ewt = [it.expected_watch_time for it in resp.items]
    assert ewt == sorted(ewt, reverse=True) and ewt[0] > ewt[-1]
    # calibrated seconds: the ranker's validation factor times exp(score) times the unit
    c = rec.ranker.calibration.factor
    unit = rec.ranker.config.watch_time_unit
    for it in resp.items:
        assert it.expected_watch_time == pytest.approx(c * math.exp(it.score) * unit, rel=1e-6)
    body = json.loads(json.dumps(resp.to_dict()))
    assert [x["item_id"] for x in body["items"]] == [it.item_id for it in resp.items]
    assert set(body["timings_ms"]) == STAGES and body["user_id"] == u


def test_exclude_watched_drops_history_and_keeps_k(rec: Recommender, store: UserStateStore) -> None:
    u = _user_with_history(store, 20)
    ctx = store.context(u)
    got = rec.recommend(RecommendRequest(user_id=u, k=40), ctx)
    assert len(got.items) == 40
    assert not {it.item_id for it in got.items} & set(ctx.history)
    # without exclusion the (deep, popular) sources nominate watched items again
    again = rec.recommend(RecommendRequest(user_id=u, k=1000, exclude_watched=False), ctx)
    assert {it.item_id for it in again.items} & set(ctx.history)


def test_unknown_user_with_demographics_goes_through_the_deep_model(art: Path) -> None:
    # Few deep candidates, so that the deep source's whole set is visible in the response.
    small = Recommender.load(art, config=ServingConfig(deep_k=30, fresh_k=0))

    def deep(demo: Demographics) -> set[int]:
        resp = small.recommend(RecommendRequest(user_id=10**6, demographics=demo, k=30))
        assert resp.info["demographics"] == "request" and not resp.info["known_user"]
        assert resp.info["candidates"] == {DEEP: 30}  # no history: no co-watch
        return {it.item_id for it in resp.items if DEEP in it.sources}

    teen = deep(Demographics(age=15, gender="female", region="BR", device="mobile"))
    senior = deep(Demographics(age=75, gender="male", region="JP", device="tv", logged_in=False))
    assert len(teen) == len(senior) == 30 and teen != senior


def test_unknown_user_with_nothing_gets_fresh_and_popular(
    rec: Recommender, store: UserStateStore
) -> None:
    for ctx in (None, store.context(10**6)):  # no state at all / an empty stored state
        resp = rec.recommend(RecommendRequest(user_id=10**6, k=25), ctx)
        assert len(resp.items) == 25
        assert all(set(it.sources) == {FRESH} for it in resp.items)
        assert resp.info["candidates"] == {FRESH: 50} and resp.info["demographics"] == "none"
    anonymous = rec.recommend(RecommendRequest(k=80))  # more than fresh_k: asked for k
    assert len(anonymous.items) == 80


def test_explicit_context_without_a_user(rec: Recommender, store: UserStateStore) -> None:
    u = _user_with_history(store, 10)
    history = store.context(u).history[-10:]
    resp = rec.recommend(RecommendRequest(history=history, queries=["cats funny"], k=15))
    assert len(resp.items) == 15 and resp.info["history"] == 10 and resp.info["queries"] == 1
    assert resp.info["demographics"] == "none" and resp.info["user_id"] is None
    assert not {it.item_id for it in resp.items} & set(history)
    pool = rec.recommend(RecommendRequest(history=history, k=1000))
    cowatched = {it.item_id for it in pool.items if COWATCH in it.sources}
    want, _ = rec.cowatch.top_k(history, 50, exclude=np.unique(history))
    assert cowatched == set(want.tolist())  # "co-watched with the last watch"
    # an explicit history replaces the stored one; the demographics stay the user's
    mixed = rec.recommend(RecommendRequest(user_id=u, history=history[:2]), store.context(u))
    assert mixed.info["history"] == 2 and mixed.info["demographics"] == "stored"
    with pytest.raises(FunnelrecError, match=r"history\[1\]: unknown item id 99999999"):
        rec.recommend(RecommendRequest(history=[history[0], 99999999]))
    with pytest.raises(FunnelrecError, match="k: must be at least 1"):
        rec.recommend(RecommendRequest(history=history, k=0))


def test_a_new_watch_changes_the_next_recommendation(
    rec: Recommender, store: UserStateStore
) -> None:
    u = _user_with_history(store, 5, start=200)
    ctx = store.context(u)
    # an item the user never watched, with co-watch neighbours
    new = next(
        i
        for i in range(1, rec.items.num_items + 1)
        if i not in ctx.history and len(rec.cowatch.neighbours(i)[0]) >= 10
    )
    before = rec.recommend(RecommendRequest(user_id=u, k=1000), ctx)
    ts = rec.now + 3600
    store.append([WatchEvent(u, new, ts), ImpressionEvent(u, new, ts)])
    ctx2 = store.context(u)
    after = rec.recommend(RecommendRequest(user_id=u, k=1000), ctx2)
    assert after.info["request_ts"] == ts + 1 and after.info["history"] == len(ctx2.history)
    assert new not in {it.item_id for it in after.items}  # now watched
    cowatched = {it.item_id for it in after.items if COWATCH in it.sources}
    want, _ = rec.cowatch.top_k([new], 50, exclude=np.unique(ctx2.history))
    assert cowatched == set(want.tolist())  # neighbours of the NEW last watch
    assert [it.item_id for it in after.items[:20]] != [it.item_id for it in before.items[:20]]


def test_watching_an_episode_lifts_the_next_one(rec: Recommender, store: UserStateStore) -> None:
    data = Path(rec.manifest["data"]["path"])
    truth = pq.read_table(
        data / "truth" / "items.parquet", columns=["item_id", "series_id", "episode"]
    )
    key = {
        (s, e): i
        for i, s, e in zip(*(truth.column(c).to_pylist() for c in truth.column_names), strict=True)
        if s > 0
    }
    pairs = [(i, key[(s, e + 1)]) for (s, e), i in key.items() if (s, e + 1) in key]
    rose, tried = 0, 0
    user = 300
    for episode, following in pairs:
        if tried == 10:
            break
        if following not in rec.cowatch.neighbours(episode)[0][:5]:
            continue
        user += 1
        ctx = store.context(user)
        if episode in ctx.history or following in ctx.history:
            continue
        resp = rec.recommend(RecommendRequest(user_id=user, k=1000), ctx)
        before = [it.item_id for it in resp.items]
        store.append([WatchEvent(user, episode, rec.now + 60)])
        items = rec.recommend(RecommendRequest(user_id=user, k=1000), store.context(user)).items
        after = [it.item_id for it in items]
        assert COWATCH in items[after.index(following)].sources
        rank_before = before.index(following) if following in before else len(before)
        rose += after.index(following) < rank_before
        tried += 1
    assert tried == 10 and rose >= 7


def test_seeded_state_is_the_datas_latest_and_is_seeded_once(
    rec: Recommender, store: UserStateStore, tmp_path: Path
) -> None:
    w = Dataset.open(rec.manifest["data"]["path"]).table("watches", ["user_id", "item_id", "ts"])
    u = 7
    mine = w.filter(np.asarray(w.column("user_id").to_numpy()) == u).sort_by("ts")
    ctx = store.context(u)
    assert ctx.history == mine.column("item_id").to_pylist()[-50:]
    assert ctx.history_ts == mine.column("ts").to_pylist()[-50:]
    imp = Dataset.open(rec.manifest["data"]["path"]).table(
        "impressions", ["user_id", "item_id", "ts"]
    )
    mine_imp = imp.filter(np.asarray(imp.column("user_id").to_numpy()) == u)
    agg = mine_imp.group_by("item_id").aggregate([("ts", "count"), ("ts", "max")])
    items = agg.column("item_id").to_pylist()
    assert ctx.shown and ctx.shown == dict(
        zip(items, agg.column("ts_count").to_pylist(), strict=True)
    )
    assert ctx.shown_ts == dict(zip(items, agg.column("ts_max").to_pylist(), strict=True))
    # the request sees when each item was last shown (churn features, as in training)
    events = rec._context(RecommendRequest(user_id=u), ctx).events
    assert events.shown == ctx.shown and events.shown_ts == ctx.shown_ts
    rec.seed_state(store)  # same data: nothing happens (a second seed would duplicate rows)
    assert store.context(u) == ctx
    rec.check_compatible_state(store)

    other = UserStateStore(tmp_path / "other.db")
    rec.check_compatible_state(other)  # an empty store is fine
    other.seed_from_dataset(
        Dataset.open(rec.manifest["data"]["path"]), fingerprint="0123456789abcdef"
    )
    with pytest.raises(ArtifactError, match="seeded from data 0123456789abcdef"):
        rec.check_compatible_state(other)
    with pytest.raises(ArtifactError, match="seeded from data"):
        rec.seed_state(other)
    other.close()


def test_item_metadata_and_known_items(rec: Recommender) -> None:
    meta = rec.item_metadata(1)
    assert meta is not None and meta["item_id"] == 1
    assert {"title", "topic", "channel_id", "upload_ts", "duration_s", "raw_id"} <= set(meta)
    assert rec.has_item(1) and rec.has_item(rec.items.num_items)
    assert not rec.has_item(0) and not rec.has_item(rec.items.num_items + 1)
    assert rec.item_metadata(rec.items.num_items + 1) is None
    assert rec.user_demographics(1) is not None and rec.user_demographics(10**6) is None
    assert len(rec.fingerprint) == 16 and rec.data_fingerprint == rec.features.fingerprint


def test_http_layer_serves_this_recommender(art: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from funnelrec.serving.http import create_app

    app = create_app(art, state_path=tmp_path / "state.db")
    with TestClient(app) as client:
        r = client.post("/v1/recommend", json={"user_id": 5, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 5 and set(body["timings_ms"]) == STAGES | {"state"}
        stages = sum(v for s, v in body["timings_ms"].items() if s != "total")
        assert body["timings_ms"]["total"] >= stages - 0.01  # the state read is in the total
        assert body["ranked"] >= len(body["items"])
        first = body["items"][0]["item_id"]
        assert client.get(f"/v1/items/{first}").json()["item_id"] == first
        r = client.post("/v1/recommend", json={"history": [1, 2, 3], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        ack = client.post(
            "/v1/events",
            json={"events": [{"type": "watch", "user_id": 5, "item_id": first, "ts": 2**32}]},
        )
        assert ack.json() == {"accepted": 1}
        again = client.post("/v1/recommend", json={"user_id": 5, "k": 5}).json()
        assert first not in [it["item_id"] for it in again["items"]]
        assert again["request_ts"] == 2**32 + 1


def test_an_exclude_list_replaces_the_historys_exclusion(
    rec: Recommender, store: UserStateStore
) -> None:
    u = _user_with_history(store, 10)
    history = store.context(u).history[-10:]
    served = rec.recommend(RecommendRequest(history=history, k=1000))
    assert not {it.item_id for it in served.items} & set(history)
    # Every watched item but one excluded: that one may come back (a re-watch stays
    # retrievable offline), the others never; unexcluded items are ranked as before.
    keep = history[-1]
    rest = [i for i in history if i != keep]
    again = rec.recommend(RecommendRequest(history=history, exclude=rest, k=1000))
    got = {it.item_id for it in again.items}
    assert not got & set(rest)
    assert keep in got  # the last watch's co-watched list and the deep model reach it
    dropped = {it.item_id for it in served.items[:5]}
    shifted = rec.recommend(RecommendRequest(history=history, exclude=[*history, *dropped]))
    assert not {it.item_id for it in shifted.items} & (dropped | set(history))


def test_a_twin_with_another_ranker_ranks_with_it(rec: Recommender, store: UserStateStore) -> None:
    """`with_ranker` (the A/B twin): the same candidates, scored by the other model."""
    other = copy.deepcopy(rec.ranker)
    head = [m for m in other.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == 1
    with torch.no_grad():
        head.bias += 1.0  # every logit one higher: the same order, other scores
    twin = rec.with_ranker(other)
    u = _user_with_history(store, 5)
    req = RecommendRequest(user_id=u, k=20)
    a, b = rec.recommend(req, store.context(u)), twin.recommend(req, store.context(u))
    assert [it.item_id for it in a.items] == [it.item_id for it in b.items]
    for x, y in zip(a.items, b.items, strict=True):
        assert y.score == pytest.approx(x.score + 1.0, abs=1e-4)
    assert rec.ranker is not other and twin.ranker is other
