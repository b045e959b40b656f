"""A live catalogue: POST /v1/items on the tiny world (an id-only and a content model)."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from funnelrec.candidates import fit_candidates, load_training_config
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.http import create_app
from funnelrec.serving.package import package
from funnelrec.serving.recommender import ServingConfig
from funnelrec.serving.state import UserStateStore
from tests.serving.test_http import _free_port, _post, start_server

# Every candidate the fresh source has (the tiny world has 1000 items), none from the others.
FRESH_ONLY = ServingConfig(deep_k=0, fresh_k=1000, cowatch_k=0)


@pytest.fixture(autouse=True)
def look_at_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request looks for added items: these tests' requests come faster than the
    service's schedule of looks (a test of the schedule sets its own)."""
    import funnelrec.serving.http as http

    monkeypatch.setattr(http, "ITEMS_SYNC_S", 0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("items")
    build_tiny_artifact(root, steps=100)
    return root


@pytest.fixture(scope="module")
def client(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    state = tmp_path_factory.mktemp("state") / "state.db"
    with TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as c:
        yield c


def _new_item(client: TestClient, raw_id: str, **changes: Any) -> dict[str, Any]:
    """An item like catalogue item 1, uploaded now."""
    meta = client.get("/v1/items/1").json()
    body = {
        "item_id": raw_id,
        "channel_id": meta["channel_id"],
        "topic": meta["topic"],
        "title": f"{meta['title']} part two",
        "upload_ts": int(time.time()),
        "duration_s": 321.5,
    }
    return {**body, **changes}


def test_bad_items_get_a_clear_4xx_and_the_same_item_again_is_idempotent(
    client: TestClient,
) -> None:
    body = _new_item(client, "live-1")
    first = client.post("/v1/items", json=body)
    assert first.status_code == 200
    added = first.json()
    assert added["created"] and added["item_id"] > 1000 and added["raw_id"] == "live-1"
    assert added["retrievable"] is False  # the id-only model has no vector for it
    again = client.post("/v1/items", json=body)
    assert again.status_code == 200 and again.json() == {**added, "created": False}

    def refused(status: int, field: str, **changes: Any) -> None:
        got = client.post("/v1/items", json={**body, **changes})
        assert got.status_code == status, (changes, got.json())
        assert got.json()["field"] == field, got.json()

    refused(409, "item_id", title="another title")  # the same id with other data
    refused(409, "item_id", item_id="v1")  # a packaged item's id with other data
    refused(422, "channel_id", item_id="live-2", channel_id=987_654)  # not in the catalogue
    refused(422, "upload_ts", item_id="live-2", upload_ts=int(time.time()) + 3600)
    refused(422, "title", item_id="live-2", title="")
    refused(422, "title", item_id="live-2", title="   ")
    refused(422, "duration_s", item_id="live-2", duration_s=-1.0)
    refused(422, "item_id", item_id=True)
    refused(422, "item_id", item_id="")
    untitled = {k: v for k, v in body.items() if k != "title"}
    got = client.post("/v1/items", json={**untitled, "item_id": "live-2"})
    assert got.status_code == 422 and got.json()["field"] == "title"
    assert client.get("/v1/items/1").json()["raw_id"] == "v1"
    packaged = client.get("/v1/items/1").json()
    same = {k: packaged[k] for k in ("channel_id", "topic", "title", "upload_ts", "duration_s")}
    again = client.post("/v1/items", json={"item_id": "v1", **same})
    assert again.status_code == 200 and again.json()["item_id"] == 1
    assert not again.json()["created"]
    assert "/v1/items" in client.get("/openapi.json").json()["paths"]


def test_an_added_item_is_in_the_fresh_source_and_ranked_from_the_moment_it_is_added(
    client: TestClient,
) -> None:
    added = client.post("/v1/items", json=_new_item(client, "live-fresh")).json()
    item = added["item_id"]
    meta = client.get(f"/v1/items/{item}").json()
    assert meta["raw_id"] == "live-fresh" and meta["duration_s"] == 321.5
    body = client.post("/v1/recommend", json={"user_id": 30_000_000, "k": 1000}).json()
    got = {it["item_id"]: it for it in body["items"]}
    assert item in got and set(got[item]["sources"]) == {"fresh"}
    assert got[item]["expected_watch_time"] is not None
    # a watch of it is accepted, and the user's next request has it in the history
    ev = {"type": "watch", "user_id": 30_000_001, "item_id": item, "ts": 2_000_000_000}
    assert client.post("/v1/events", json={"events": [ev]}).json() == {"accepted": 1}
    again = client.post("/v1/recommend", json={"user_id": 30_000_001, "k": 5}).json()
    assert again["history"] == 1 and item not in [it["item_id"] for it in again["items"]]


def test_added_items_survive_reload_and_restart_and_reach_every_worker(
    world: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    # two processes' apps on one state database: one adds, the other sees it next request
    with (
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as a,
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as b,
    ):
        first = a.post("/v1/items", json=_new_item(a, "live-a")).json()["item_id"]
        assert b.get(f"/v1/items/{first}").json()["raw_id"] == "live-a"
        second = b.post("/v1/items", json=_new_item(b, "live-b")).json()["item_id"]
        assert second == first + 1  # ids given by the shared store, never twice
        assert a.get(f"/v1/items/{second}").json()["raw_id"] == "live-b"
        assert a.post("/admin/reload", json={}).status_code == 200
        assert a.get(f"/v1/items/{first}").status_code == 200
    with TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as c:
        assert c.get(f"/v1/items/{second}").json()["raw_id"] == "live-b"
        body = c.post("/v1/recommend", json={"k": 1000}).json()
        assert {first, second} <= {it["item_id"] for it in body["items"]}


def test_a_worker_looks_for_other_workers_items_on_a_schedule_or_when_named(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between looks, a worker serves the catalogue it has, even the worker that stored
    the item; a request naming an item it does not know yet (a history, an event, the
    item's page) looks at once."""
    import funnelrec.serving.http as http

    state = tmp_path / "state.db"
    monkeypatch.setattr(http, "ITEMS_SYNC_S", 3600.0)
    with (
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as a,
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as b,
    ):
        item = a.post("/v1/items", json=_new_item(a, "live-a")).json()["item_id"]

        def served(client: TestClient) -> set[int]:
            body = client.post("/v1/recommend", json={"k": 1000}).json()
            return {it["item_id"] for it in body["items"]}

        assert item not in served(a) and item not in served(b)  # neither has looked yet
        ask = {"history": [item], "k": 5}
        assert b.post("/v1/recommend", json=ask).status_code == 200
        assert item in served(b) and item not in served(a)
        monkeypatch.setattr(http, "ITEMS_SYNC_S", 0.0)  # the next request looks
        assert item in served(a)
        monkeypatch.setattr(http, "ITEMS_SYNC_S", 3600.0)
    with (
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as a,
        TestClient(create_app(world / "art", state_path=state, serving=FRESH_ONLY)) as b,
    ):
        second = a.post("/v1/items", json=_new_item(a, "live-b")).json()["item_id"]
        ev = {"type": "watch", "user_id": 7, "item_id": second, "ts": 2_000_000_000}
        assert b.post("/v1/events", json={"events": [ev]}).json() == {"accepted": 1}
        third = a.post("/v1/items", json=_new_item(a, "live-c")).json()["item_id"]
        assert b.get(f"/v1/items/{third}").json()["raw_id"] == "live-c"
        fourth = a.post("/v1/items", json=_new_item(a, "live-d")).json()["item_id"]
        assert fourth not in served(b)
        monkeypatch.setattr(http, "ITEMS_SYNC_S", 0.0)  # the next request looks
        assert fourth in served(b)


def test_an_acknowledged_item_survives_sigkill_of_the_server(world: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    port = _free_port()
    proc = start_server(world / "art", state, port)
    try:
        meta = _get(port, "/v1/items/1")
        body = {
            "item_id": 777,
            "channel_id": meta["channel_id"],
            "topic": None,
            "title": "a brand new upload",
            "upload_ts": int(time.time()),
            "duration_s": 60,
        }
        added = _post(port, "/v1/items", body)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    stored = UserStateStore(state).added_items()
    assert [(it.item_id, it.raw_id, it.title) for it in stored] == [
        (added["item_id"], "777", "a brand new upload")
    ]


def _get(port: int, path: str) -> dict[str, Any]:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
    return out


def test_a_content_model_retrieves_an_added_item_for_users_whose_taste_matches_it(
    world: Path, tmp_path: Path
) -> None:
    """The added item is a copy of the content of a catalogue item outside the item
    vocabulary, which the packaged index holds by its content vector alone: the deep
    source returns the copy with the same score, beside it."""
    cfg = load_training_config(None, ["dim=16", "num_negatives=256", "batch_size=256",
                                      "max_steps=100", "patience=0", "valid_examples=200",
                                      "seed=0", "threads=1", "item_content=true"])  # fmt: skip
    fit_candidates(world / "feat", tmp_path / "cand", cfg, progress=False)
    art = package(
        world / "feat", tmp_path / "cand", world / "ranker", tmp_path / "art", progress=False
    )
    deep_only = ServingConfig(deep_k=300, fresh_k=0, cowatch_k=0)
    app = create_app(art, state_path=tmp_path / "state.db", serving=deep_only)
    with TestClient(app) as c:
        vocab = app.state.service.recommender.features.vocab("item")

        def deep(user: int) -> list[tuple[int, float]]:
            items = c.post("/v1/recommend", json={"user_id": user, "k": 1000}).json()["items"]
            return sorted(((it["item_id"], it["sources"]["deep"]) for it in items),
                          key=lambda x: -x[1])  # fmt: skip

        before = deep(1)
        ids = np.array([i for i, _ in before])
        at = int(np.flatnonzero(vocab.lookup(ids) == 0)[0])  # the best item outside it
        original, score = before[at]
        meta = c.get(f"/v1/items/{original}").json()
        fields = ("channel_id", "topic", "title", "upload_ts", "duration_s")
        added = c.post("/v1/items", json={"item_id": "copy", **{k: meta[k] for k in fields}})
        assert added.status_code == 200 and added.json()["retrievable"] is True
        copy = added.json()["item_id"]
        after = dict(deep(1))
        assert after[copy] == pytest.approx(score, abs=1e-5)
        assert after[original] == pytest.approx(score, abs=1e-6)


def test_the_store_gives_each_external_id_one_item_id_above_the_catalogue(
    tmp_path: Path,
) -> None:
    from funnelrec.serving.state import AddedItem

    store = UserStateStore(tmp_path / "state.db")
    item = AddedItem(0, "x", 3, None, "a title", 100, 60.0)
    first, created = store.add_item(item, first_id=1001)
    assert created and first.item_id == 1001 and first.same_content(item)
    again, created = store.add_item(AddedItem(0, "x", 4, None, "other", 100, 60.0), 1001)
    assert not created and again == first  # the caller compares, and refuses the change
    other, _ = store.add_item(AddedItem(0, "y", 3, "t", "b", 100, 1.5), first_id=900)
    assert other.item_id == 1002 and store.last_added_item() == 1002
    assert [it.raw_id for it in store.added_items(after=1001)] == ["y"]
    store.close()
    assert UserStateStore(tmp_path / "state.db").added_items() == [first, other]


def test_ids_reserved_by_the_daily_merge_are_not_given_to_new_items(tmp_path: Path) -> None:
    from funnelrec.serving.state import AddedItem, reserve_live_item_ids

    store = UserStateStore(tmp_path / "state.db")
    store.add_item(AddedItem(0, "x", 3, None, "a title", 100, 60.0), first_id=1001)
    # the dataset merged x and grew to 1050 items: the next artifact's ids
    reserve_live_item_ids(tmp_path / "state.db", 1050)
    store.reserve_item_ids(1020)  # never lowered
    y, _ = store.add_item(AddedItem(0, "y", 3, None, "b", 100, 1.0), first_id=1002)
    assert y.item_id == 1051


def test_a_request_during_an_addition_waits_for_the_item(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another request that sees the item stored while it is being added to the catalogue
    waits for the addition, and never answers as if the item were not there."""
    import threading

    from funnelrec.features.serving import ServingItems
    from funnelrec.serving.state import AddedItem

    app = create_app(world / "art", state_path=tmp_path / "state.db", serving=FRESH_ONLY)
    with TestClient(app):
        service = app.state.service
        entered, release = threading.Event(), threading.Event()
        extended = ServingItems.extended

        def held(self: ServingItems, extra: Any) -> ServingItems:
            entered.set()
            assert release.wait(30)
            return extended(self, extra)

        monkeypatch.setattr(ServingItems, "extended", held)
        first = service.recommender.items.num_items + 1
        item, _ = service.store.add_item(AddedItem(0, "held", 1, None, "t", 1, 1.0), first)
        seen: dict[str, bool] = {}
        adding = threading.Thread(target=lambda: service.sync_items(force=True))
        adding.start()
        assert entered.wait(30)
        asking = threading.Thread(
            target=lambda: seen.update(known=service.sync_items(force=True).has_item(item.item_id))
        )
        asking.start()
        asking.join(0.3)
        assert asking.is_alive() and not seen  # waiting for the addition
        release.set()
        adding.join(30)
        asking.join(30)
        assert seen == {"known": True}
