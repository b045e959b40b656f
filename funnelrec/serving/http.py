"""The HTTP service: FastAPI over a `Recommender` and the live `UserStateStore`.

    funnelrec serve ART --host 127.0.0.1 --port 8000

Endpoints: POST /v1/recommend, POST /v1/events, GET /v1/items/{item_id}, GET /healthz,
GET /readyz, GET /metrics (Prometheus text), POST /admin/reload, and /openapi.json.

A recommendation's `timings_ms` are the `Recommender`'s stages plus "state" (reading the
user's live state), which "total" includes. Model calls run on `torch_threads` threads
(`run_app`; 1 by default, as requests already run concurrently in uvicorn's thread pool).

Bad requests get a 4xx whose message names the field; they never reach the model. A
reload (POST /admin/reload or SIGHUP) loads the new artifact beside the old one and swaps
a single reference: requests in flight finish on the model they started with, and an
artifact that fails to load is refused while the old model keeps serving.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from funnelrec.errors import FunnelrecError
from funnelrec.serving.recommender import Demographics, Recommender, RecommendRequest, ServingConfig
from funnelrec.serving.state import ImpressionEvent, SearchEvent, UserStateStore, WatchEvent

MAX_BODY_BYTES = 1 << 20
ADMIN_TOKEN_ENV = "FUNNELREC_ADMIN_TOKEN"
TORCH_THREADS_ENV = "FUNNELREC_TORCH_THREADS"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class DemographicsBody(_Strict):
    age: Annotated[float, Field(ge=0, le=150)] | None = None
    gender: str | None = None
    region: str | None = None
    device: str | None = None
    logged_in: bool | None = None


class RecommendBody(_Strict):
    user_id: Annotated[int, Field(ge=1)] | None = None
    history: Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=1000)] | None = None
    queries: (
        Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=100)] | None
    ) = None
    demographics: DemographicsBody | None = None
    k: Annotated[int, Field(ge=1, le=1000)] = 10
    exclude_watched: bool = True


class WatchBody(_Strict):
    type: Literal["watch"]
    user_id: Annotated[int, Field(ge=1)]
    item_id: Annotated[int, Field(ge=1)]
    ts: int
    watch_time_s: Annotated[float, Field(ge=0)] | None = None


class SearchBody(_Strict):
    type: Literal["search"]
    user_id: Annotated[int, Field(ge=1)]
    ts: int
    query: Annotated[str, Field(min_length=1, max_length=200)]


class ImpressionBody(_Strict):
    type: Literal["impression"]
    user_id: Annotated[int, Field(ge=1)]
    item_id: Annotated[int, Field(ge=1)]
    ts: int


EventBody = Annotated[WatchBody | SearchBody | ImpressionBody, Field(discriminator="type")]


class EventsBody(_Strict):
    events: Annotated[list[EventBody], Field(min_length=1, max_length=1000)]


class ReloadBody(_Strict):
    path: str | None = None


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "funnelrec_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.errors = Counter(
            "funnelrec_errors",
            "HTTP responses with status >= 400",
            ["endpoint"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "funnelrec_stage_seconds",
            "Latency per recommendation stage and in total",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )


class ServiceState:
    """The model being served, swapped whole on reload; the store stays.

    serving: candidate counts replacing the artifact's packaged ones (also after reloads).
    """

    def __init__(
        self, artifact: Path, store: UserStateStore, serving: ServingConfig | None = None
    ) -> None:
        self.artifact = Path(artifact)
        self.store = store
        self.serving = serving
        self.recommender = Recommender.load(self.artifact, config=serving)
        self.recommender.seed_state(store)
        self._reload_lock = threading.Lock()

    def reload(self, path: Path | None = None) -> str:
        """Load `path` (default: the current artifact again) and swap it in if it loads."""
        target = Path(path) if path is not None else self.artifact
        with self._reload_lock:
            fresh = Recommender.load(target, config=self.serving)  # raises: old model stays
            fresh.check_compatible_state(self.store)
            self.recommender, self.artifact = fresh, target
        return fresh.fingerprint


class _LimitAndCount:
    """ASGI middleware: refuse bodies over MAX_BODY_BYTES (by content-length), count
    requests and errors per route. Plain ASGI, as Starlette's `BaseHTTPMiddleware`
    costs about a millisecond per request on this machine."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            status = 413
            response = JSONResponse(
                {"error": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413
            )
            await response(scope, receive, send)
        else:

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                self._count(scope, status)
            return
        self._count(scope, status)

    def _count(self, scope: Scope, status: int) -> None:
        # The route's template (/v1/items/{item_id}), not the path: one series per route.
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(endpoint).inc()


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    name = ""
    for p in parts:
        name += f"[{p}]" if p.isdigit() else (f".{p}" if name else p)
    return name or "body"


def create_app(
    artifact: Path | str,
    *,
    state_path: Path | str | None = None,
    admin_token: str | None = None,
    serving: ServingConfig | None = None,
    artifacts_root: Path | str | None = None,
) -> FastAPI:
    """The FastAPI application serving `artifact` (an artifact directory).

    serving: candidate counts per source (default: those packaged in the artifact).
    artifacts_root: the only directory whose artifacts /admin/reload may load (default: the
        directory holding `artifact`): a reload names a path, and without a bound any
        directory of the machine the process can read would be loaded.
    """
    artifact = Path(artifact)
    root = Path(artifacts_root if artifacts_root is not None else artifact.parent).resolve()
    store = UserStateStore(Path(state_path) if state_path else artifact / "state.db")
    service = ServiceState(artifact, store, serving)
    metrics = _Metrics()
    token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
    app = FastAPI(title="funnelrec", version=service.recommender.version)
    app.state.service = service
    app.add_middleware(_LimitAndCount, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = _field_name(tuple(first.get("loc", ())))
        message = (
            "malformed JSON body"
            if first.get("type") == "json_invalid"
            else f"{field}: {first.get('msg', 'invalid value')}"
        )
        return JSONResponse({"error": message, "field": field}, status_code=422)

    @app.exception_handler(FunnelrecError)
    async def funnelrec_error(request: Request, exc: FunnelrecError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.post("/v1/recommend", response_model=None)
    def recommend(body: RecommendBody) -> JSONResponse:
        rec = service.recommender  # one reference for the whole request
        if body.history is not None:
            unknown = [(i, x) for i, x in enumerate(body.history) if not rec.has_item(x)]
            if unknown:
                i, x = unknown[0]
                raise HTTPException(422, f"history[{i}]: unknown item id {x}")
        demo = (
            Demographics(**body.demographics.model_dump())
            if body.demographics is not None
            else None
        )
        req = RecommendRequest(
            user_id=body.user_id,
            history=body.history,
            queries=body.queries,
            demographics=demo,
            k=body.k,
            exclude_watched=body.exclude_watched,
        )
        t = time.perf_counter()
        ctx = service.store.context(body.user_id) if body.user_id is not None else None
        state_ms = (time.perf_counter() - t) * 1000.0
        resp = rec.recommend(req, ctx)
        # The live-state read is a stage of the service's request too: first, in "total".
        timings = {"state": state_ms, **resp.timings_ms}
        timings["total"] += state_ms
        for stage, ms in timings.items():
            metrics.latency.labels(stage).observe(ms / 1000)
        # A plain JSON answer: FastAPI's response-model pass over this dict costs more
        # than the rest of the HTTP layer and checks nothing (the type is dict[str, Any]).
        return JSONResponse(
            {**resp.to_dict(), "timings_ms": {k: round(v, 3) for k, v in timings.items()}}
        )

    @app.post("/v1/events")
    def events(body: EventsBody) -> dict[str, Any]:
        rec = service.recommender
        out: list[WatchEvent | SearchEvent | ImpressionEvent] = []
        for i, ev in enumerate(body.events):
            if isinstance(ev, WatchBody | ImpressionBody) and not rec.has_item(ev.item_id):
                raise HTTPException(422, f"events[{i}].item_id: unknown item id {ev.item_id}")
            if isinstance(ev, WatchBody):
                out.append(WatchEvent(ev.user_id, ev.item_id, ev.ts, ev.watch_time_s))
            elif isinstance(ev, SearchBody):
                out.append(SearchEvent(ev.user_id, ev.ts, ev.query))
            else:
                out.append(ImpressionEvent(ev.user_id, ev.item_id, ev.ts))
        accepted = service.store.append(out)  # returns after the commit
        return {"accepted": accepted}

    @app.get("/v1/items/{item_id}")
    def item(item_id: int) -> dict[str, Any]:
        meta = service.recommender.item_metadata(item_id)
        if meta is None:
            raise HTTPException(404, f"item_id: unknown item id {item_id}")
        return meta

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready", "model": service.recommender.fingerprint}

    @app.get("/metrics")
    def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload(request: Request, body: ReloadBody | None = None) -> dict[str, str]:
        client = request.client.host if request.client else ""
        if token:
            if request.headers.get("authorization") != f"Bearer {token}":
                raise HTTPException(403, "admin token missing or wrong")
        elif client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise HTTPException(403, "reload is allowed from loopback only (or set a token)")
        path = Path(body.path) if body is not None and body.path else None
        if path is not None and not path.resolve().is_relative_to(root):
            raise HTTPException(403, f"reload may only load artifacts inside {root}")
        try:
            fingerprint = service.reload(path)
        except FunnelrecError as e:
            raise HTTPException(409, f"reload refused, still serving the old model: {e}") from None
        return {"status": "reloaded", "model": fingerprint}

    return app


def install_sighup_reload(app: FastAPI) -> None:
    """Reload the current artifact on SIGHUP (the main thread's signal handler)."""
    service: ServiceState = app.state.service

    def _handler(signum: int, frame: object) -> None:
        try:
            service.reload()
        except FunnelrecError as e:
            print(f"reload refused, still serving the old model: {e}", flush=True)

    signal.signal(signal.SIGHUP, _handler)


def run_server(
    artifact: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_path: Path | None = None,
    torch_threads: int | None = None,
    artifacts_root: Path | None = None,
) -> None:
    """Serve `artifact` with uvicorn until interrupted (see `run_app` for torch_threads,
    `create_app` for artifacts_root)."""
    run_app(
        create_app(artifact, state_path=state_path, artifacts_root=artifacts_root),
        host=host,
        port=port,
        torch_threads=torch_threads,
    )


def run_app(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, torch_threads: int | None = None
) -> None:
    """Serve an app of `create_app` with uvicorn until interrupted; SIGHUP reloads.

    torch_threads: intra-op threads of each model call and of the ANN search [env
    FUNNELREC_TORCH_THREADS, else 1].
    Requests run in uvicorn's thread pool, so concurrent requests already use the cores;
    a model call spreading over them too only adds contention (measured on the ranker:
    docs/ranking.md, "At serving").
    """
    import faiss
    import torch
    import uvicorn

    threads = torch_threads or int(os.environ.get(TORCH_THREADS_ENV, "0") or 0) or 1
    torch.set_num_threads(threads)
    # One query per request: FAISS parallelises over queries, so more threads only add
    # OpenMP start-up and barriers (FAISS keeps its own OpenMP runtime, apart from torch's).
    faiss.omp_set_num_threads(threads)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    server = uvicorn.Server(config)
    install_sighup_reload(app)
    # The objects of the loaded libraries and model would be traversed by every full garbage
    # collection, a pause in some request (docs/ranking.md, "At serving"); they live as long
    # as the process, so move them out of the collector's sight.
    gc.collect()
    gc.freeze()
    server.run()
