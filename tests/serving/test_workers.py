"""`funnelrec serve --workers N`: several processes on one port that share the state
database, every reload and /metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from funnelrec.pipeline import build_tiny_artifact

pytestmark = pytest.mark.skipif(
    os.name != "posix", reason="worker processes and the reload record need a POSIX system"
)
WORKERS = 2


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "funnelrec.cli", "serve", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One request on a fresh connection (so that any worker may take it): status, body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    text = raw.decode()
    return status, json.loads(text) if text.startswith(("{", "[")) else text


def _generations(port: int, want: int, timeout_s: float = 60) -> dict[str, str]:
    """Ask /readyz until every worker has answered at generation `want`; worker -> model."""
    seen: dict[str, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, body = _call(port, "/readyz")
        seen[body["worker"]] = (int(body["generation"]), body["model"])
        if len(seen) == WORKERS and all(g == want for g, _ in seen.values()):
            return {w: m for w, (_, m) in seen.items()}
        time.sleep(0.05)
    raise AssertionError(f"workers at generation {want} expected, /readyz said {seen}")


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("workers"), steps=50)


@pytest.fixture(scope="module")
def server(art: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Any]]:
    """`funnelrec serve ART --workers 2` on a free port: (port, the supervisor process)."""
    port = _free_port()
    state = tmp_path_factory.mktemp("workers-state") / "state.db"
    log = (tmp_path_factory.mktemp("workers-log") / "server.log").open("w")
    cmd = _serve(str(art), "--port", str(port), "--state", str(state), "--workers", str(WORKERS))
    env = {k: v for k, v in os.environ.items() if k != "FUNNELREC_ADMIN_TOKEN"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _call(port, "/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = Path(log.name).read_text()
                    raise AssertionError(f"server did not start: {log_text}") from None
                time.sleep(0.2)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_workers_share_the_port_the_state_and_the_metrics(server: tuple[int, Any]) -> None:
    port, _ = server
    models = _generations(port, 1)
    assert len(set(models.values())) == 1  # both serve the one artifact
    # an event taken by one worker is in the state every worker reads
    user = 30_000_000
    ev = {"type": "watch", "user_id": user, "item_id": 3, "ts": 3_000_000_000}
    assert _call(port, "/v1/events", {"events": [ev]}) == (200, {"accepted": 1})
    n = 8
    for _ in range(n):
        status, body = _call(port, "/v1/recommend", {"user_id": user, "k": 3})
        assert status == 200 and body["history"] == 1 and len(body["items"]) == 3
    # /metrics, whichever worker answers, counts the requests of all of them
    for _ in range(3):
        _, text = _call(port, "/metrics")
        line = 'funnelrec_requests_total{endpoint="/v1/recommend",status="200"}'
        counts = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
        assert counts == [n], text


def test_a_reload_and_sighup_reach_every_worker(server: tuple[int, Any], art: Path) -> None:
    port, proc = server
    _generations(port, 1)
    status, body = _call(port, "/admin/reload", {})
    assert status == 200 and body["status"] == "reloaded" and body["generation"] == "2"
    _generations(port, 2)
    # another artifact (a copy inside the artifacts root), then a broken one: refused by
    # the worker that gets it, and nothing reaches the others
    copy = art.parent / "art-copy"
    shutil.copytree(art, copy, ignore=shutil.ignore_patterns("state.db*"))
    assert _call(port, "/admin/reload", {"path": str(copy)})[0] == 200
    models = _generations(port, 3)
    broken = art.parent / "art-broken"
    shutil.copytree(copy, broken)
    (broken / "manifest.json").write_text("{")
    status, body = _call(port, "/admin/reload", {"path": str(broken)})
    assert status == 409 and "old model" in body["error"]
    assert _generations(port, 3) == models
    # SIGHUP to the supervisor: every worker loads the current artifact (the copy) again
    proc.send_signal(signal.SIGHUP)
    assert _generations(port, 4) == models
    assert _call(port, "/v1/recommend", {"user_id": 1, "k": 2})[0] == 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_workers_share_the_mapped_artifact_and_recommend_what_one_process_does(
    server: tuple[int, Any], art: Path, tmp_path: Path
) -> None:
    """Every worker is forked from the one forkserver (the libraries it imported shared)
    and maps the index and both models' weights from the artifact's files (one copy in
    the page cache for all); the answers are those of the funnel in this process."""
    from funnelrec.serving.recommender import Recommender, RecommendRequest
    from funnelrec.serving.state import UserStateStore

    port, proc = server
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < WORKERS and time.monotonic() < deadline:
        pids.add(int(_call(port, "/readyz")[1]["worker"]))
    assert len(pids) == WORKERS
    parents = set()
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        parents.add(int(stat.rsplit(")", 1)[1].split()[1]))
        maps = Path(f"/proc/{pid}/maps").read_text()
        for part in ("candidates/index/index.faiss", "candidates/model.safetensors"):
            assert part in maps, part
        assert "ranker/model.safetensors" in maps
    (forkserver,) = parents
    assert forkserver != proc.pid
    assert "forkserver" in Path(f"/proc/{forkserver}/cmdline").read_text()

    rec = Recommender.load(art)
    store = UserStateStore(tmp_path / "state.db")
    rec.seed_state(store)
    for user in range(1, 9):
        status, body = _call(port, "/v1/recommend", {"user_id": user, "k": 5})
        assert status == 200
        want = rec.recommend(RecommendRequest(user_id=user, k=5), store.context(user))
        assert body["items"] == [it.to_dict() for it in want.items]


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    cmd = _serve(str(tmp_path), "--workers", "0")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "error: --workers must be at least 1, got 0" in r.stderr


def test_a_broken_artifact_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    cmd = _serve(str(tmp_path / "nothing"), "--workers", "2", "--port", str(_free_port()))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "error:" in r.stderr and "no such artifact directory" in r.stderr


def test_the_model_record_counts_every_publish_once(tmp_path: Path) -> None:
    """Publishes from several processes at once each get a generation of their own."""
    from funnelrec.serving.workers import ModelRecord

    record = ModelRecord(tmp_path)
    assert record.publish(tmp_path / "a") == 1
    assert record.read() == (1, (tmp_path / "a").resolve())
    script = (
        "import sys\nfrom funnelrec.serving.workers import ModelRecord\n"
        "r = ModelRecord(sys.argv[1])\n"
        "print(*(r.publish(sys.argv[2]) for _ in range(20)))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(tmp_path / f"p{i}")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    got = sorted(int(g) for p in procs for g in p.communicate(timeout=120)[0].split())
    assert got == list(range(2, 62))
    assert record.read()[0] == 61


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing: Linux")
def test_each_worker_listens_on_a_tcp_socket_of_its_own() -> None:
    """The sockets the workers listen on share the supervisor's address through
    SO_REUSEPORT, and are of protocol TCP (asyncio's loop sets TCP_NODELAY on such
    connections only: without it, a response in two writes waits for the client's delayed
    ACK)."""
    from funnelrec.serving.workers import _bind, _reuse_port_socket

    shared = _bind("127.0.0.1", 0)
    own = [_reuse_port_socket(shared.family, shared.getsockname()) for _ in range(2)]
    try:
        for sock in own:
            assert sock.getsockname() == shared.getsockname()
            assert sock.proto == socket.IPPROTO_TCP
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        for sock in [shared, *own]:
            sock.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing: Linux")
def test_the_worker_loop_is_uvloop_on_a_socket_of_its_own_without_nagle() -> None:
    """`WorkerLoop` (uvloop's loop) listens on a socket of its own at the supervisor's
    address, and the connections it accepts have TCP_NODELAY: without it, a response
    written in two parts waits for the client's delayed ACK."""
    import asyncio

    import uvloop

    from funnelrec.serving.workers import WorkerLoop, _bind

    shared = _bind("127.0.0.1", 0)
    shared_fileno, shared_address = shared.fileno(), shared.getsockname()
    nodelay: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def serve_one() -> tuple[int, tuple[str, int]]:
        server = await asyncio.get_running_loop().create_server(Probe, sock=shared)
        listening = server.sockets[0]
        fileno, address = listening.fileno(), listening.getsockname()
        _, writer = await asyncio.open_connection(*shared_address)
        for _ in range(200):
            if nodelay:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        return fileno, address

    loop = WorkerLoop()
    try:
        assert isinstance(loop, uvloop.Loop)
        fileno, address = loop.run_until_complete(serve_one())
    finally:
        loop.close()
        shared.close()
    assert fileno != shared_fileno and address == shared_address
    assert nodelay and nodelay[0] != 0
