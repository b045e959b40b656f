"""The HTTP service on the tiny world: every endpoint, every bad request, reload, durability."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.http import MAX_BODY_BYTES, create_app
from funnelrec.serving.state import UserStateStore


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("serve"), steps=100)


@pytest.fixture(scope="module")
def client(art: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    state = tmp_path_factory.mktemp("state") / "state.db"
    with TestClient(create_app(art, state_path=state)) as c:
        yield c


def _known_user(client: TestClient) -> int:
    for u in range(1, 500):
        body = client.post("/v1/recommend", json={"user_id": u, "k": 5}).json()
        if body["known_user"] and body["history"] >= 5:
            return u
    raise AssertionError("no known user with history")


def test_recommend_known_user_unknown_user_and_explicit_context(client: TestClient) -> None:
    u = _known_user(client)
    r = client.post("/v1/recommend", json={"user_id": u, "k": 7})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 7
    assert {"item_id", "expected_watch_time", "score", "sources"} <= set(body["items"][0])
    assert "total" in body["timings_ms"]
    scores = [it["expected_watch_time"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)

    stranger = client.post("/v1/recommend", json={"user_id": 10_000_000, "k": 5})
    assert stranger.status_code == 200 and len(stranger.json()["items"]) == 5

    with_demo = client.post(
        "/v1/recommend", json={"demographics": {"age": 30, "gender": "F"}, "k": 3}
    )
    assert with_demo.status_code == 200 and len(with_demo.json()["items"]) == 3

    explicit = client.post(
        "/v1/recommend", json={"history": [1, 2, 3], "queries": ["hello world"], "k": 4}
    )
    assert explicit.status_code == 200
    assert {1, 2, 3}.isdisjoint(it["item_id"] for it in explicit.json()["items"])


def test_events_change_the_next_recommendation(client: TestClient) -> None:
    u = 10_000_001  # a new user: recommendations come from fresh and popular alone
    before = client.post("/v1/recommend", json={"user_id": u, "k": 10}).json()
    watched = [it["item_id"] for it in before["items"][:3]]
    events = [{"type": "watch", "user_id": u, "item_id": i, "ts": 2_000_000_000} for i in watched]
    events.append({"type": "search", "user_id": u, "ts": 2_000_000_001, "query": "news"})
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 200 and r.json() == {"accepted": 4}
    after = client.post("/v1/recommend", json={"user_id": u, "k": 10}).json()
    assert after["history"] == 3
    ids = [it["item_id"] for it in after["items"]]
    assert set(watched).isdisjoint(ids)  # watched items are excluded now
    assert ids != [it["item_id"] for it in before["items"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 1001}, "k"),
        ({"user_id": "one"}, "user_id"),
        ({"user_id": 1, "colour": "red"}, "colour"),
        ({"history": [1, "x"]}, "history[1]"),
        ({"history": [1, 99_999_999]}, "history[1]"),
        ({"demographics": {"age": -3}}, "demographics.age"),
    ],
)
def test_bad_recommend_requests_name_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 422, r.text
    message = json.dumps(r.json())
    assert field in message


def test_malformed_and_oversized_bodies(client: TestClient) -> None:
    r = client.post(
        "/v1/recommend", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "malformed JSON" in r.json()["error"]
    big = b'{"history": [' + b"1," * (MAX_BODY_BYTES // 2) + b"1]}"
    r = client.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("events", "field"),
    [
        ([{"type": "watch", "user_id": 1, "item_id": 99_999_999, "ts": 1}], "events[0].item_id"),
        (
            [{"type": "watch", "user_id": 1, "item_id": 1, "ts": 1, "watch_time_s": -5}],
            "watch_time_s",
        ),
        ([{"type": "like", "user_id": 1, "ts": 1}], "events[0]"),
        ([{"type": "search", "user_id": 1, "ts": 1, "query": ""}], "query"),
        ([], "events"),
    ],
)
def test_bad_events_are_refused_and_not_stored(
    client: TestClient, events: list[dict], field: str
) -> None:
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json())


def test_items_health_metrics_and_openapi(client: TestClient) -> None:
    assert client.get("/v1/items/1").json()["item_id"] == 1
    assert client.get("/v1/items/99999999").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/v1/recommend", json={"user_id": 1, "k": 3})
    text = client.get("/metrics").text
    assert "funnelrec_requests_total" in text and 'stage="ranking"' in text
    assert 'stage="state"' in text
    # one series per route, not per item id; a 404 of an unknown item counts as an error
    assert 'endpoint="/v1/items/{item_id}",status="404"' in text
    assert 'endpoint="/v1/items/1"' not in text
    assert 'funnelrec_errors_total{endpoint="/v1/items/{item_id}"}' in text
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]


def test_reload_good_and_broken_artifacts(client: TestClient, art: Path, tmp_path: Path) -> None:
    model = client.get("/readyz").json()["model"]
    r = client.post("/admin/reload", json={})
    assert r.status_code == 200 and r.json()["model"] == model
    broken = art.parent / "broken"  # inside the artifacts root: the artifact's directory
    shutil.copytree(art, broken)
    (broken / "manifest.json").write_text("{")
    r = client.post("/admin/reload", json={"path": str(broken)})
    assert r.status_code == 409 and "old model" in r.json()["error"]
    assert client.post("/v1/recommend", json={"user_id": 1, "k": 3}).status_code == 200
    assert client.get("/readyz").json()["model"] == model
    # a directory outside the artifacts root is never loaded, even a good artifact
    outside = tmp_path / "elsewhere"
    shutil.copytree(art, outside)
    for path in (outside, art.parent / ".." / "elsewhere", Path("/etc")):
        r = client.post("/admin/reload", json={"path": str(path)})
        assert r.status_code == 403 and "inside" in r.json()["error"], path
    assert client.get("/readyz").json()["model"] == model
    shutil.rmtree(broken)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(art: Path, state: Path, port: int) -> subprocess.Popen[bytes]:
    """`funnelrec serve ART` in a child process on `port` with state database `state`,
    returned once /readyz answers (AssertionError if it exits or takes over a minute)."""
    cmd = [
        sys.executable, "-m", "funnelrec.cli", "serve", str(art),
        "--port", str(port), "--state", str(state),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("server did not start") from None
            time.sleep(0.2)


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_acknowledged_events_survive_sigkill_of_the_server(art: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    port = _free_port()
    proc = start_server(art, state, port)
    try:
        user = 20_000_000
        for i in range(1, 6):
            ev = {"type": "watch", "user_id": user, "item_id": i, "ts": 3_000_000_000 + i}
            assert _post(port, "/v1/events", {"events": [ev]}) == {"accepted": 1}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert UserStateStore(state).context(user).history == [1, 2, 3, 4, 5]


def test_serving_config_overrides_the_packaged_counts_and_survives_reload(
    art: Path, tmp_path: Path
) -> None:
    from funnelrec.serving.recommender import ServingConfig

    serving = ServingConfig(deep_k=15, fresh_k=4, cowatch_k=3)
    app = create_app(art, state_path=tmp_path / "state.db", serving=serving)
    with TestClient(app) as c:
        for _ in range(2):
            u = _known_user(c)
            body = c.post("/v1/recommend", json={"user_id": u, "k": 5}).json()
            got = body["candidates"]
            assert got["deep"] == 15 and got["fresh"] == 4 and got.get("cowatch", 0) <= 3
            assert body["ranked"] <= 22 and len(body["items"]) == 5
            assert c.post("/admin/reload", json={}).status_code == 200
