"""The HTTP service: FastAPI over a `Recommender` and the live `UserStateStore`.

    funnelrec serve ART --host 127.0.0.1 --port 8000

Endpoints: POST /v1/recommend, POST /v1/events, POST /v1/items (add an item to the live
catalogue: docs/serving.md, "A live catalogue"), GET /v1/items/{item_id}, GET /healthz,
GET /readyz, GET /metrics (Prometheus text), POST /admin/reload, and /openapi.json.

A recommendation's `timings_ms` are the `Recommender`'s stages plus "state" (reading the
user's live state), which "total" includes. A process computes `compute_threads` (1)
recommendations at a time, the others waiting their turn in arrival order, as computing
more at once under the GIL only adds thread switches; model calls run on `torch_threads`
threads (`run_app`, 1). The cores are used by worker processes: `funnelrec serve
--workers N` runs N processes of this app on one port (`serving.workers`: a reload reaches
every worker, /metrics sums over all of them).

Requests are strictly typed and bounded (the `*Body` models; README, "Serving"): no "1"
or true for an integer, no "yes" for a boolean, no NaN or infinity; ids are 1..2^63-1,
times Unix seconds up to the year 2200 (MAX_TS), watch times 0..one day. Bad requests get
a 4xx whose message names the field and its allowed range; they never reach the model.
Every error, 4xx or 5xx, has one JSON shape, ErrorBody: {"error": message, "code": kind,
"field": path or null}, declared per route in /openapi.json. Bodies are limited to
MAX_BODY_BYTES whether they give a Content-Length or come chunked (413), and an unexpected
exception is logged and answered with a 500 that closes the connection. A
reload (POST /admin/reload or SIGHUP) loads the new artifact beside the old one and swaps
a single reference: requests in flight finish on the model they started with, and an
artifact that fails to load is refused while the old model keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError, to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from funnelrec.errors import FunnelrecError
from funnelrec.serving.memory import release_unused_memory
from funnelrec.serving.recommender import Demographics, Recommender, RecommendRequest, ServingConfig
from funnelrec.serving.state import (
    AddedItem,
    ImpressionEvent,
    SearchEvent,
    UserStateStore,
    WatchEvent,
)

if TYPE_CHECKING:
    import uvicorn

MAX_BODY_BYTES = 1 << 20
ADMIN_TOKEN_ENV = "FUNNELREC_ADMIN_TOKEN"
TORCH_THREADS_ENV = "FUNNELREC_TORCH_THREADS"
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
COMPUTE_THREADS = 1  # recommendations computed at once per process (`create_app`)

# Bounds of every number a request may carry (docs: README, "Serving"). Ids are SQLite's
# and NumPy's int64; times are Unix seconds up to 2200-01-01T00:00:00Z, far enough for any
# real log and far from int64's end (the request time is the latest event's plus one).
MAX_ID = (1 << 63) - 1  # declared as `lt=1 << 63`: a float in the OpenAPI document, exact
MAX_TS = 7_258_118_400
MAX_WATCH_TIME_S = 86_400.0  # one day: no single watch of one video lasts longer
MAX_TEXT = 200  # characters of a query or a demographic value

_log = logging.getLogger(__name__)


class _Strict(BaseModel):
    """Strictly typed: no "1" or true for an int, no "yes" for a bool, no NaN or infinity
    for a float (an int is a valid float); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


UserId = Annotated[int, Field(ge=1, lt=MAX_ID + 1, description=f"1..{MAX_ID}")]
ItemId = Annotated[int, Field(ge=1, lt=MAX_ID + 1, description=f"1..{MAX_ID}")]
Ts = Annotated[
    int, Field(ge=0, le=MAX_TS, description=f"Unix seconds, 0..{MAX_TS} (up to the year 2200)")
]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def _decimal_digits(value: Any) -> Any:
    """A path's integer as decimal digits only: pydantic also reads "+7", "07", "7_0",
    "7.0" and "7 " as 7, none of which is how the document's integer is written."""
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise PydanticCustomError("int_parsing", "Input should be an integer in decimal digits")
    return value


# The allowed range of each bounded field, named in the message of a 422 about it.
_RANGES = {
    "user_id": f"an integer in 1..{MAX_ID}",
    "item_id": f"an integer in 1..{MAX_ID}",
    "history": f"item ids, integers in 1..{MAX_ID}",
    "ts": f"an integer in 0..{MAX_TS}, Unix seconds up to the year 2200",
    "k": "an integer in 1..1000",
    "watch_time_s": f"a finite number in 0..{MAX_WATCH_TIME_S:g}, seconds",
    "age": "a finite number in 0..150",
    "duration_s": f"a finite number in 0..{MAX_WATCH_TIME_S:g}, seconds",
    "upload_ts": f"an integer in 0..{MAX_TS}, Unix seconds, not in the future",
    "channel_id": f"an integer in 1..{MAX_ID}, a channel of the catalogue",
}


class DemographicsBody(_Strict):
    age: Annotated[float, Field(ge=0, le=150)] | None = None
    gender: Text | None = None
    region: Text | None = None
    device: Text | None = None
    logged_in: bool | None = None


class RecommendBody(_Strict):
    user_id: UserId | None = None
    history: Annotated[list[ItemId], Field(max_length=1000)] | None = None
    queries: Annotated[list[Text], Field(max_length=100)] | None = None
    demographics: DemographicsBody | None = None
    k: Annotated[int, Field(ge=1, le=1000)] = 10
    exclude_watched: bool = True


class WatchBody(_Strict):
    type: Literal["watch"]
    user_id: UserId
    item_id: ItemId
    ts: Ts
    watch_time_s: (
        Annotated[float, Field(ge=0, le=MAX_WATCH_TIME_S, description="seconds, 0..86400")] | None
    ) = None


class SearchBody(_Strict):
    type: Literal["search"]
    user_id: UserId
    ts: Ts
    query: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class ImpressionBody(_Strict):
    type: Literal["impression"]
    user_id: UserId
    item_id: ItemId
    ts: Ts


EventBody = Annotated[WatchBody | SearchBody | ImpressionBody, Field(discriminator="type")]


class EventsBody(_Strict):
    events: Annotated[list[EventBody], Field(min_length=1, max_length=1000)]


def _external_id(value: Any) -> str | int:
    """An external item id: a string of 1..MAX_TEXT characters or an int in 1..MAX_ID
    (one error naming the field, not one per member of a union)."""
    if isinstance(value, str) and 1 <= len(value) <= MAX_TEXT:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID:
        return value
    raise PydanticCustomError(
        "external_id",
        f"Input should be a valid integer in 1..{MAX_ID} or a string of 1..{MAX_TEXT} characters",
    )


CLOCK_SKEW_S = 300  # how far in the future an upload time may be (the sender's clock)
# How often a worker looks for the items added to the store (by it or another worker): a
# catalogue extension costs about the same for one item as for several, so extending at
# every addition (under load, one new item each time) costs each worker a full extension
# per item; a look every ITEMS_SYNC_S takes what arrived meanwhile at once. A request
# that names an item this worker does not know yet looks at once (`sync_items`, `force`).
ITEMS_SYNC_S = 0.1


class ItemBody(_Strict):
    """An item to add to the catalogue (POST /v1/items)."""

    item_id: Annotated[
        str | int,
        PlainValidator(_external_id),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                    {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                ],
                "description": "the external id, as the catalogue's `raw_id` (string or int)",
            }
        ),
    ]
    channel_id: Annotated[int, Field(ge=1, lt=MAX_ID + 1, description="a channel of the catalogue")]
    topic: Text | None = None
    title: Annotated[str, Field(min_length=1, max_length=1000)]
    upload_ts: Annotated[
        int,
        Field(ge=0, le=MAX_TS, description=f"Unix seconds, at most {CLOCK_SKEW_S} s from now"),
    ]
    duration_s: Annotated[float, Field(ge=0, le=MAX_WATCH_TIME_S, description="seconds")]


class ItemAddedBody(BaseModel):
    """The answer of POST /v1/items: the item as served."""

    item_id: int = Field(description="its dataset item id (the id of every other endpoint)")
    raw_id: str
    created: bool = Field(description="false: the same item was already in the catalogue")
    retrievable: bool = Field(
        description="whether the deep source can retrieve it (a content model); the fresh "
        f"source nominates it either way. A request {ITEMS_SYNC_S:g} s or more after this "
        "answer, to any worker, is served with the item"
    )


class ReloadBody(_Strict):
    path: Annotated[str, Field(max_length=4096)] | None = None


# ---------------------------------------------------------------- responses (documented)

ErrorCode = Literal[
    "malformed_body",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "body_too_large",
    "invalid_request",
    "internal_error",
    "http_error",
]
_CODES: dict[int, ErrorCode] = {
    400: "malformed_body",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    422: "invalid_request",
    500: "internal_error",
}


class ErrorBody(BaseModel):
    """The body of every error response (4xx and 5xx)."""

    error: str = Field(description="what was wrong, starting with the field when there is one")
    code: ErrorCode = Field(description="the kind of error, one per status code")
    field: str | None = Field(
        description='the offending field as a path ("events[0].ts"), null when none'
    )


class RecommendedItemBody(BaseModel):
    item_id: int
    expected_watch_time: float | None
    score: float | None
    sources: dict[str, float | None]


class RecommendResponseBody(BaseModel):
    """The answer of POST /v1/recommend (documentation: the handler builds it directly)."""

    items: list[RecommendedItemBody]
    timings_ms: dict[str, float]
    user_id: int | None
    known_user: bool
    history: int
    queries: int
    demographics: Literal["request", "stored", "request+stored", "none"]
    request_ts: int
    candidates: dict[str, int]
    ranked: int


class EventsResponseBody(BaseModel):
    accepted: int


_DESCRIPTIONS = {
    400: "Malformed body: not JSON, not UTF-8, or nested too deeply",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict: the new artifact was refused (the old model keeps serving), or an item "
    "of this id exists with other data",
    413: f"Body larger than {MAX_BODY_BYTES} bytes",
    422: "Invalid request: the field is named in `field` and in the message",
    500: "Internal error (the connection is closed after it)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route: each status with the ErrorBody schema."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


class ApiError(HTTPException):
    """An HTTPException naming the offending field (None: none)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers=headers)
        self.field = field


def error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error response of the service (the ErrorBody shape)."""
    body = {"error": message, "code": _CODES.get(status, "http_error"), "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


class _Metrics:
    """The service's Prometheus metrics; `exposed` is what /metrics reports.

    Under several worker processes (`serving.workers`) prometheus_client runs in its
    multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before the workers start): each
    process writes its values to files there, and /metrics, whichever worker answers it,
    reports their sums over all the workers, including those already replaced.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exposed = self.registry
        if os.environ.get(PROMETHEUS_MULTIPROC_ENV):
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
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
        self._stages: dict[str, Any] = {}

    def stage_latency(self, stage: str) -> Any:
        """The latency histogram of one stage (its labelled child, looked up once)."""
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.latency.labels(stage)
        return child


class SharedModel(Protocol):
    """Which artifact the processes of one server serve: a generation number that every
    reload increments, and the artifact it loaded (`serving.workers.ModelRecord`)."""

    def publish(self, artifact: Path) -> int:
        """Record a reload to `artifact` for the other processes; its generation."""
        ...

    def read(self) -> tuple[int, Path]:
        """The latest generation and its artifact."""
        ...


class ServiceState:
    """The model being served, swapped whole on reload; the store stays.

    serving: candidate counts replacing the artifact's packaged ones (also after reloads).
    shared: the record this process shares with the other workers of its server (None:
        the only process), and `generation`, the record's generation of `artifact`.
    `generation` counts the model's loads: 1 the first, one more with every reload (with
    `shared`, every reload of any worker: the workers that followed it have the same).
    """

    def __init__(
        self,
        artifact: Path,
        store: UserStateStore,
        serving: ServingConfig | None = None,
        *,
        shared: SharedModel | None = None,
        generation: int = 1,
    ) -> None:
        self.artifact = Path(artifact)
        self.store = store
        self.serving = serving
        self.shared = shared
        self.generation = generation
        self._seen = generation  # the latest generation of `shared` taken up or refused
        self.recommender = Recommender.load(self.artifact, config=serving)
        self.recommender.seed_state(store)
        self._reload_lock = threading.Lock()
        self._items_lock = threading.Lock()
        self._take_added_items(self.recommender)
        self._items_looked = time.monotonic()  # `sync_items`
        release_unused_memory()  # what loading (and seeding) freed

    def _take_added_items(self, rec: Recommender) -> None:
        """Add the stored added items to `rec`'s catalogue (those it lacks)."""
        rec.add_items(self.store.added_items(rec.added_through))

    def sync_items(self, *, force: bool = False) -> Recommender:
        """The recommender, with the items added to the store by any process: looked for
        (one max(item_id) query) at most every ITEMS_SYNC_S, or now with `force` (a
        request naming an item not known here). An added item is served within
        ITEMS_SYNC_S of its commit."""
        rec = self.recommender
        now = time.monotonic()
        if not force and now - self._items_looked < ITEMS_SYNC_S:
            return rec
        self._items_looked = now
        if self.store.last_added_item() > rec.added_through:
            with self._items_lock:
                rec = self.recommender
                self._take_added_items(rec)
        return rec

    def reload(self, path: Path | None = None) -> str:
        """Load `path` (default: the current artifact again) and swap it in if it loads.

        With `shared`, the reload is published for the other workers, which `follow` it.
        """
        target = Path(path) if path is not None else self.artifact
        with self._reload_lock:
            fresh = Recommender.load(target, config=self.serving)  # raises: old model stays
            fresh.check_compatible_state(self.store)
            self._take_added_items(fresh)
            if self.shared is not None:
                self.generation = self._seen = self.shared.publish(target)
            else:
                self.generation += 1
            self.recommender, self.artifact = fresh, target
        release_unused_memory()
        return fresh.fingerprint

    def follow(self) -> str | None:
        """Catch up with a reload another process published: load the shared record's
        artifact if its generation is newer than this one's. Returns the new model's
        fingerprint, None when there was nothing new; raises FunnelrecError when the
        artifact is refused (the old model keeps serving; that generation is not retried).
        """
        if self.shared is None or self.shared.read()[0] <= self._seen:
            return None
        with self._reload_lock:
            generation, target = self.shared.read()
            if generation <= self._seen:
                return None
            self._seen = generation
            fresh = Recommender.load(target, config=self.serving)
            fresh.check_compatible_state(self.store)
            self._take_added_items(fresh)
            self.recommender, self.artifact, self.generation = fresh, target, generation
        release_unused_memory()
        return fresh.fingerprint


class _LimitAndCount:
    """ASGI middleware: refuse bodies over MAX_BODY_BYTES, answer unexpected exceptions,
    count requests and errors per route. Plain ASGI, as Starlette's `BaseHTTPMiddleware`
    costs about a millisecond per request on this machine.

    The body limit holds whether or not the request says its length: a Content-Length
    over it is refused before reading, and a body without one (chunked) is counted as it
    is read and refused at the first byte past the limit. Both 413s close the connection,
    as the rest of the body is left unread. An exception a route did not turn into a
    response is logged and answered with a 500 in the error shape that closes the
    connection too (`Connection: close`).
    """

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    # FastAPI's body reading passes an HTTPException through as it is.
                    raise _too_large()
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and not length.isdigit():
                response = error_response(400, "invalid Content-Length header", None, _CLOSE)
                await response(scope, receive, send_status)
            elif length is not None and int(length) > MAX_BODY_BYTES:
                await error_response(413, _TOO_LARGE, None, _CLOSE)(scope, receive, send_status)
            else:
                try:
                    await self.app(scope, limited_receive, send_status)
                except Exception:
                    if started:  # too late for an error response: the server closes
                        raise
                    _log_unexpected(scope)
                    await _internal_error()(scope, receive, send_status)
        finally:
            self._count(scope, status)

    def _count(self, scope: Scope, status: int) -> None:
        # The route's template (/v1/items/{item_id}), not the path: one series per route.
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(endpoint).inc()


_CLOSE = {"connection": "close"}
# A FunnelrecError message that starts with the field it is about: "k: must be ...".
_NAMED_MESSAGE = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
_TOO_LARGE = f"request body larger than {MAX_BODY_BYTES} bytes"


def _too_large() -> ApiError:
    return ApiError(413, _TOO_LARGE, None, headers=_CLOSE)


def _internal_error() -> JSONResponse:
    return error_response(500, "internal server error", None, _CLOSE)


def _log_unexpected(scope: Scope) -> None:
    """Log the exception being handled, with the request's method and path."""
    _log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))


def _field_name(loc: tuple[Any, ...]) -> str:
    # "body" / "path" / "query": where the value came from, not part of the field's name.
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    name = ""
    for p in parts:
        name += f"[{p}]" if p.isdigit() else (f".{p}" if name else p)
    return name or "body"


def _validation_message(err: dict[str, Any], field: str) -> str:
    """The 422 message of a pydantic error: the field, what was wrong, the allowed range."""
    message = f"{field}: {err.get('msg', 'invalid value')}"
    names = [p for p in err.get("loc", ()) if isinstance(p, str)]
    allowed = _RANGES.get(names[-1]) if names else None
    if allowed is not None and err.get("type") not in ("missing", "extra_forbidden", "external_id"):
        message += f" (allowed: {allowed})"
    return message


def create_app(
    artifact: Path | str,
    *,
    state_path: Path | str | None = None,
    admin_token: str | None = None,
    serving: ServingConfig | None = None,
    artifacts_root: Path | str | None = None,
    shared: SharedModel | None = None,
    generation: int = 1,
    compute_threads: int = COMPUTE_THREADS,
) -> FastAPI:
    """The FastAPI application serving `artifact` (an artifact directory).

    serving: candidate counts per source (default: those packaged in the artifact).
    artifacts_root: the only directory whose artifacts /admin/reload may load (default: the
        directory holding `artifact`): a reload names a path, and without a bound any
        directory of the machine the process can read would be loaded.
    shared, generation: for a worker of several (`serving.workers`), the record its
        reloads are published to, and the generation of `artifact` in it.
    compute_threads: recommendations computed at once (the others wait their turn).
    """
    artifact = Path(artifact)
    root = Path(artifacts_root if artifacts_root is not None else artifact.parent).resolve()
    store = UserStateStore(Path(state_path) if state_path else artifact / "state.db")
    service = ServiceState(artifact, store, serving, shared=shared, generation=generation)
    metrics = _Metrics()
    token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
    # Recommendations compute under the GIL nearly all the time: more of them at once in
    # one process only take turns at it, and every turn costs a thread switch (measured:
    # docs/serving.md). They queue here, first come first served, on the event loop;
    # the other routes keep uvicorn's thread pool.
    compute = anyio.CapacityLimiter(compute_threads)
    app = FastAPI(title="funnelrec", version=service.recommender.version)
    app.state.service = service
    app.add_middleware(_LimitAndCount, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(422, "malformed JSON body", "body")
        field = _field_name(tuple(first.get("loc", ())))
        return error_response(422, _validation_message(first, field), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words for a body json.loads refused other than as bad JSON.
            message = "malformed body: not UTF-8 JSON, or nested too deeply"
        field = exc.field if isinstance(exc, ApiError) else None
        return error_response(exc.status_code, message, field, exc.headers)

    @app.exception_handler(FunnelrecError)
    async def funnelrec_error(request: Request, exc: FunnelrecError) -> JSONResponse:
        message = str(exc)
        named = _NAMED_MESSAGE.match(message)
        return error_response(422, message, named.group(1) if named else None)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # _LimitAndCount answers a route's exceptions; this is Starlette's last resort.
        _log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _internal_error()

    @app.post(
        "/v1/recommend",
        response_model=None,
        responses={
            200: {"model": RecommendResponseBody, "description": "Items, best first"},
            **_errors(400, 413, 422, 500),
        },
    )
    async def recommend(body: RecommendBody) -> Response:
        return await anyio.to_thread.run_sync(_recommend, body, limiter=compute)

    def _recommend(body: RecommendBody) -> Response:
        rec = service.sync_items()  # one reference for the whole request
        if body.history is not None:
            if not all(rec.has_item(x) for x in body.history):
                rec = service.sync_items(force=True)  # maybe just added by another worker
            unknown = [(i, x) for i, x in enumerate(body.history) if not rec.has_item(x)]
            if unknown:
                i, x = unknown[0]
                raise ApiError(422, f"history[{i}]: unknown item id {x}", f"history[{i}]")
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
            metrics.stage_latency(stage).observe(ms / 1000)
        # Plain JSON, encoded here: FastAPI's response-model pass over this dict costs more
        # than the rest of the HTTP layer (RecommendResponseBody documents it), and
        # pydantic's encoder (Rust) a fraction of `json.dumps`'s time. A non-finite float
        # is null, as the item's scores are already (`RecommendedItem.to_dict`).
        answer = {**resp.to_dict(), "timings_ms": {k: round(v, 3) for k, v in timings.items()}}
        return Response(to_json(answer, inf_nan_mode="null"), media_type="application/json")

    @app.post("/v1/events", responses=_errors(400, 413, 422, 500))
    def events(body: EventsBody) -> EventsResponseBody:
        rec = service.sync_items()
        named = [ev.item_id for ev in body.events if isinstance(ev, WatchBody | ImpressionBody)]
        if not all(rec.has_item(x) for x in named):
            rec = service.sync_items(force=True)  # maybe just added by another worker
        out: list[WatchEvent | SearchEvent | ImpressionEvent] = []
        for i, ev in enumerate(body.events):
            if isinstance(ev, WatchBody | ImpressionBody) and not rec.has_item(ev.item_id):
                field = f"events[{i}].item_id"
                raise ApiError(422, f"{field}: unknown item id {ev.item_id}", field)
            if isinstance(ev, WatchBody):
                out.append(WatchEvent(ev.user_id, ev.item_id, ev.ts, ev.watch_time_s))
            elif isinstance(ev, SearchBody):
                out.append(SearchEvent(ev.user_id, ev.ts, ev.query))
            else:
                out.append(ImpressionEvent(ev.user_id, ev.item_id, ev.ts))
        accepted = service.store.append(out)  # returns after the commit
        return EventsResponseBody(accepted=accepted)

    @app.get("/v1/items/{item_id}", responses=_errors(404, 422, 500))
    def item(
        # The validator after PathParam: before it, FastAPI writes the bounds into the
        # document as "ge"/"lt" instead of "minimum"/"exclusiveMaximum".
        item_id: Annotated[int, PathParam(ge=1, lt=MAX_ID + 1), BeforeValidator(_decimal_digits)],
    ) -> dict[str, Any]:
        meta = service.sync_items().item_metadata(item_id)
        if meta is None:  # maybe just added by another worker
            meta = service.sync_items(force=True).item_metadata(item_id)
        if meta is None:
            raise ApiError(404, f"item_id: unknown item id {item_id}", "item_id")
        return meta

    @app.post("/v1/items", responses=_errors(400, 409, 413, 422, 500))
    def add_item(body: ItemBody) -> ItemAddedBody:
        rec = service.sync_items()
        if body.upload_ts > time.time() + CLOCK_SKEW_S:
            raise ApiError(422, f"upload_ts: {body.upload_ts} is in the future", "upload_ts")
        if not body.title.strip():
            raise ApiError(422, "title: is blank", "title")
        if body.channel_id not in rec.channels:
            message = f"channel_id: unknown channel {body.channel_id} (not in the catalogue)"
            raise ApiError(422, message, "channel_id")
        item = AddedItem(
            0, str(body.item_id), body.channel_id, body.topic, body.title, body.upload_ts,
            body.duration_s,
        )  # fmt: skip
        found = rec.catalogue_item(item.raw_id)
        created = False
        if found is None:
            first = rec.items.num_items + 1
            # Returns after the commit; this worker serves it from its next look, as the
            # others do (ITEMS_SYNC_S), so that a look takes every item added meanwhile.
            found, created = service.store.add_item(item, first)
        if not found.same_content(replace(item, item_id=found.item_id)):
            message = f"item_id: item {item.raw_id} exists with other data"
            raise ApiError(409, message, "item_id")
        return ItemAddedBody(
            item_id=found.item_id,
            raw_id=found.raw_id,
            created=created,
            retrievable=rec.retrievable(found.item_id),
        )

    @app.get("/healthz", responses=_errors(500))
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=_errors(500))
    def readyz() -> dict[str, str]:
        # Which process answered (when several serve the port) and how many loads its
        # model is from the start: a reload shows as the next generation in every worker.
        return {
            "status": "ready",
            "model": service.recommender.fingerprint,
            "generation": str(service.generation),
            "worker": str(os.getpid()),
        }

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format",
            },
            **_errors(500),
        },
    )
    def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.exposed), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", responses=_errors(400, 403, 409, 413, 422, 500))
    def reload(request: Request, body: ReloadBody | None = None) -> dict[str, str]:
        client = request.client.host if request.client else ""
        if token:
            if request.headers.get("authorization") != f"Bearer {token}":
                raise ApiError(403, "admin token missing or wrong")
        elif client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise ApiError(403, "reload is allowed from loopback only (or set a token)")
        if body is not None and body.path and "\x00" in body.path:
            raise ApiError(422, "path: contains a NUL character", "path")
        path = Path(body.path) if body is not None and body.path else None
        if path is not None and not path.resolve().is_relative_to(root):
            raise ApiError(403, f"path: reload may only load artifacts inside {root}", "path")
        try:
            fingerprint = service.reload(path)
        except FunnelrecError as e:
            raise ApiError(409, f"reload refused, still serving the old model: {e}") from None
        # With several workers the others follow within a moment: /readyz shows each
        # worker's generation, this one's as of this reload.
        return {"status": "reloaded", "model": fingerprint, "generation": str(service.generation)}

    return app


def install_sighup_reload(app: FastAPI) -> None:
    """Reload the current artifact on SIGHUP (the main thread's signal handler)."""
    service: ServiceState = app.state.service

    def _reload() -> None:
        try:
            service.reload()
        except FunnelrecError as e:
            print(f"reload refused, still serving the old model: {e}", flush=True)

    def _handler(signum: int, frame: object) -> None:
        # The handler runs on the event loop's thread: loading there would hold every
        # request for the seconds a load takes. The reload lock orders overlapping ones.
        threading.Thread(target=_reload, name="funnelrec-sighup-reload", daemon=True).start()

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
    FUNNELREC_TORCH_THREADS, else 1]. A model call of one request is small: spreading it
    over more cores only adds contention (measured on the ranker: docs/ranking.md, "At
    serving"); several worker processes use the cores (`serving.workers`).
    """
    import uvicorn

    set_model_threads(torch_threads)
    server = uvicorn.Server(server_config(app, host=host, port=port))
    install_sighup_reload(app)
    freeze_loaded_objects()
    server.run()


def server_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Config:
    """uvicorn's settings for one process serving `app` (`run_app`).

    The HTTP parser and the event loop are named, not left to uvicorn's "auto", which falls
    back silently to the pure-Python h11 and asyncio's loop when these are missing:
    httptools parses in C (llhttp) and uvloop runs the loop on libuv, for a fraction of
    the CPU time of each request (docs/serving.md, "The HTTP stack"). The workers of
    `serving.workers` run the same two.
    """
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="info", http="httptools", loop="uvloop"
    )


def set_model_threads(torch_threads: int | None = None) -> int:
    """Set the threads of torch's, FAISS's and numpy's BLAS thread pools in this process
    (see `run_app`); returns the number."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch_threads or int(os.environ.get(TORCH_THREADS_ENV, "0") or 0) or 1
    torch.set_num_threads(threads)
    # One query per request: FAISS parallelises over queries, so more threads only add
    # OpenMP start-up and barriers (FAISS keeps its own OpenMP runtime, apart from torch's).
    faiss.omp_set_num_threads(threads)
    # numpy's BLAS (the added items' exact search is a matrix-vector product) would start
    # a thread per core in every worker: beside the other workers' requests they spin for
    # cores already taken, and every request of the worker waits (docs/serving.md,
    # "Adding items under load").
    threadpool_limits(threads, user_api="blas")
    return threads


def freeze_loaded_objects() -> None:
    """Move the objects alive now out of the garbage collector's sight.

    The objects of the loaded libraries and model would be traversed by every full garbage
    collection, a pause in some request (docs/ranking.md, "At serving"); they live as long
    as the process.
    """
    gc.collect()
    gc.freeze()
