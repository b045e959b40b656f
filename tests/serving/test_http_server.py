"""The service on a real socket, as `funnelrec serve` runs it (uvicorn with httptools and
uvloop, `serving.http.server_config`): what the in-process TestClient cannot show, the
bytes on the wire and when the server closes the connection."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
import uvloop
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.http import MAX_BODY_BYTES, create_app, server_config


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    art = build_tiny_artifact(tmp_path_factory.mktemp("wire"), steps=50)
    return create_app(art, state_path=tmp_path_factory.mktemp("wire-state") / "state.db")


@pytest.fixture(scope="module")
def server(app: FastAPI) -> Iterator[uvicorn.Server]:
    """The app served on a free loopback port from a thread of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(server_config(app, port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield server
    server.should_exit = True
    thread.join(timeout=30)


def _connect(server: uvicorn.Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.config.port), timeout=30)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off `sock`: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (its end reads as EOF)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _post(path: str, body: bytes, *, chunked: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    if chunked:
        return (head + "transfer-encoding: chunked\r\n\r\n").encode() + body
    return (head + f"content-length: {len(body)}\r\n\r\n").encode() + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _error_body(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    assert set(parsed) == {"error", "code", "field"}, parsed
    return parsed


def test_the_server_runs_httptools_and_uvloop(server: uvicorn.Server) -> None:
    assert server.config.http_protocol_class is HttpToolsProtocol
    assert isinstance(server.servers[0].get_loop(), uvloop.Loop)


def test_recommendations_keep_the_connection_alive(server: uvicorn.Server) -> None:
    with _connect(server) as sock:
        for k in (3, 5):
            sock.sendall(_post("/v1/recommend", json.dumps({"user_id": 1, "k": k}).encode()))
            status, headers, body = _read_response(sock)
            assert status == 200 and headers["content-type"] == "application/json"
            answer = json.loads(body)
            assert len(answer["items"]) == k and answer["timings_ms"]["total"] > 0
            assert "connection" not in headers  # keep-alive, HTTP/1.1's default
        # A chunked body within the limit is read whole.
        parts = [b'{"user_id": 1,', b' "k": 2}']
        sock.sendall(
            _post("/v1/recommend", b"".join(map(_chunk, parts)) + b"0\r\n\r\n", chunked=True)
        )
        status, _, body = _read_response(sock)
        assert status == 200 and len(json.loads(body)["items"]) == 2


def test_bad_json_is_a_422_in_the_error_shape_on_a_live_connection(
    server: uvicorn.Server,
) -> None:
    with _connect(server) as sock:
        sock.sendall(_post("/v1/recommend", b'{"user_id": '))
        status, _, body = _read_response(sock)
        assert status == 422 and _error_body(body)["code"] == "invalid_request"
        sock.sendall(_post("/v1/recommend", b'{"user_id": 1, "k": 1}'))
        assert _read_response(sock)[0] == 200


def test_a_body_over_the_limit_is_a_413_that_closes_the_connection(
    server: uvicorn.Server,
) -> None:
    with _connect(server) as sock:  # said in its Content-Length: refused before reading
        sock.sendall(
            b"POST /v1/recommend HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json"
            + f"\r\ncontent-length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        status, headers, body = _read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert _error_body(body)["code"] == "body_too_large"
        assert _closed(sock)
    with _connect(server) as sock:  # chunked: counted as it arrives
        sock.sendall(_post("/v1/recommend", b"", chunked=True) + _chunk(b'{"queries": ["'))
        piece = _chunk(b"a" * 65536)
        for _ in range(MAX_BODY_BYTES // 65536 + 1):  # just past the limit, then no more
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server has answered and closed meanwhile
        status, headers, body = _read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert _error_body(body)["code"] == "body_too_large"
        assert _closed(sock)


def test_an_unexpected_exception_is_a_500_that_closes_the_connection(
    server: uvicorn.Server, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(events: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app.state.service.store, "append", boom)
    event = {"type": "watch", "user_id": 40_000_000, "item_id": 1, "ts": 2_000_000_000}
    with _connect(server) as sock:
        sock.sendall(_post("/v1/events", json.dumps({"events": [event]}).encode()))
        status, headers, body = _read_response(sock)
        assert status == 500 and headers["connection"] == "close"
        err = _error_body(body)
        assert err["code"] == "internal_error" and b"disk on fire" not in body
        assert _closed(sock)
