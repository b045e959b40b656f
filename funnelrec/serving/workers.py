"""Several worker processes on one port: `funnelrec serve ART --workers N`.

One process answers requests on one core at a time (the GIL): uvicorn's thread pool lets
requests overlap while they wait, not while they compute. N processes compute on N cores.

    run_workers(ART, workers=2, port=8000)      # until SIGINT / SIGTERM

How it is put together:
- uvicorn's own supervisor (`uvicorn.supervisors.Multiprocess`) binds the address once and
  starts N worker processes; it restarts a worker that dies and stops the server when one
  fails to start. On Linux each worker listens on a socket of its own bound to that
  address with SO_REUSEPORT, and the kernel spreads connections over them (`WorkerLoop`);
  elsewhere they share the supervisor's socket.
- Workers are forked from a multiprocessing "forkserver", a fresh interpreter that has
  imported the serving code and its libraries (torch, FAISS, Arrow, NumPy, FastAPI)
  once (`serving.preload`): their memory, most of an idle worker's, is then shared by
  every worker until one writes to it (`_Forkserver`; where there is no forkserver,
  each worker is a fresh interpreter, "spawn", as uvicorn starts them).
- Each worker builds the app of `create_app` (`worker_app`, a factory uvicorn imports by
  name) and loads the artifact itself. Its large read-only parts are mapped from the
  artifact's files, not read into memory of the worker's own: the ANN index
  (`ann.index.SearchOptions.mmap`) and the models' embedding tables
  (`serving.memory`); every worker reads the one copy in the OS page cache.
- The live user state is the one SQLite database, which WAL mode lets every worker read
  and write. It is seeded once, by the supervisor, before any worker starts.
- Reload: the supervisor's control directory holds a record of the artifact to serve and
  its generation, a number every reload increments (`ModelRecord`). POST /admin/reload,
  in whichever worker it lands, loads the artifact there, answers, and publishes it as the
  next generation; SIGHUP to the supervisor publishes the current artifact again. Every
  worker polls the record (`poll_s`, a file read) and loads a newer generation in the
  background, serving the old model until the new one is in; one that fails to load is
  logged and the old model stays. A worker started later (a replacement) loads the
  record's artifact, so the workers converge on the latest reload.
- Metrics: prometheus_client's multiprocess mode (its files in the control directory):
  /metrics, from any worker, sums the counters and histograms of all of them.
- Torch and FAISS use `torch_threads` threads per worker (1 by default: the cores are
  taken by the workers).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
import uvicorn._subprocess
import uvloop
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from funnelrec.errors import FunnelrecError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from funnelrec.serving.http import ServiceState

__all__ = ["ModelRecord", "WorkerSettings", "run_workers", "worker_app"]

SETTINGS_ENV = "FUNNELREC_SERVE_WORKER"
WORKER_HEALTHCHECK_S = 30
# What the forkserver imports before it forks any worker (`serving.preload`: the serving
# code and its libraries, then frozen out of the garbage collector's sight), after the
# HTTP parser and event loop the workers run (`run_workers`), which it does not import.
PRELOAD = ("uvloop", "uvicorn.protocols.http.httptools_impl", "funnelrec.serving.preload")

_log = logging.getLogger("uvicorn.error")  # the server's log: uvicorn configures it


class ModelRecord:
    """The artifact the workers of one server serve and its generation, in `directory`.

    `model.json` holds {"generation": n, "artifact": path}; it is replaced whole (written
    beside, then renamed), so a reader sees the old record or the new one. Publishing
    takes an exclusive lock on `model.lock`, so reloads in two workers at once get two
    generations, not one.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.file = self.directory / "model.json"
        self._lock_file = self.directory / "model.lock"

    def publish(self, artifact: Path) -> int:
        """Record `artifact` as the next generation; returns that generation."""
        with self._locked():
            generation = self.read()[0] + 1 if self.file.exists() else 1
            body = {"generation": generation, "artifact": str(Path(artifact).resolve())}
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(body))
            tmp.replace(self.file)
        return generation

    def read(self) -> tuple[int, Path]:
        """The latest generation and its artifact."""
        body = json.loads(self.file.read_text())
        return int(body["generation"]), Path(body["artifact"])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock_file.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker is started with (JSON in the environment, SETTINGS_ENV).

    control: the supervisor's control directory (the `ModelRecord`)
    state: the live user-state database
    artifacts_root: the only directory /admin/reload may load from
    torch_threads: threads of torch and FAISS in each worker
    poll_s: seconds between two looks at the record
    """

    control: str
    state: str
    artifacts_root: str
    torch_threads: int = 1
    poll_s: float = 0.5


def worker_app() -> FastAPI:
    """The app of one worker process: uvicorn calls this factory in each worker.

    Loads the record's artifact, starts following the record, and exits with uvicorn's
    startup-failure status when the artifact cannot be served (so the supervisor stops
    instead of restarting it over and over).
    """
    from funnelrec.serving.http import create_app, freeze_loaded_objects, set_model_threads

    settings = WorkerSettings(**json.loads(os.environ[SETTINGS_ENV]))
    # SIGHUP is the supervisor's (it publishes the reload every worker follows): one sent
    # to the whole process group must not reload twice, nor end a worker by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    set_model_threads(settings.torch_threads)
    record = ModelRecord(settings.control)
    generation, artifact = record.read()
    try:
        app = create_app(
            artifact,
            state_path=settings.state,
            artifacts_root=settings.artifacts_root,
            shared=record,
            generation=generation,
        )
    except FunnelrecError as e:
        _log.error("worker %d cannot serve %s: %s", os.getpid(), artifact, e)
        sys.exit(STARTUP_FAILURE)
    service = app.state.service
    threading.Thread(
        target=_follow, args=(service, settings.poll_s), name="funnelrec-follow", daemon=True
    ).start()
    freeze_loaded_objects()
    return app


def _follow(service: ServiceState, poll_s: float) -> None:
    """Keep `service` at the record's latest generation, for as long as the process lives."""
    pid = os.getpid()
    while True:
        time.sleep(poll_s)
        try:
            fingerprint = service.follow()
        except FunnelrecError as e:
            _log.error("worker %d: reload refused, still serving the old model: %s", pid, e)
        except Exception:  # this thread must outlive any one bad look at the record
            _log.exception("worker %d: following the model record", pid)
        else:
            if fingerprint is not None:
                _log.info(
                    "worker %d: reloaded %s (generation %d), model %s",
                    pid,
                    service.artifact,
                    service.generation,
                    fingerprint,
                )


def run_workers(
    artifact: Path,
    *,
    workers: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_path: Path | None = None,
    torch_threads: int | None = None,
    artifacts_root: Path | None = None,
    poll_s: float = 0.5,
) -> None:
    """Serve `artifact` with `workers` processes on one port until SIGINT or SIGTERM; SIGHUP
    reloads the current artifact in every worker (see the module doc).

    Raises FunnelrecError when the artifact is broken (checked once, before any worker
    starts) or when a worker could not start.
    """
    from funnelrec.serving.http import PROMETHEUS_MULTIPROC_ENV, TORCH_THREADS_ENV
    from funnelrec.serving.recommender import read_manifest, seed_store
    from funnelrec.serving.state import UserStateStore

    if workers < 1:
        raise FunnelrecError(f"--workers must be at least 1, got {workers}")
    art = Path(artifact).resolve()
    manifest = read_manifest(art)  # a broken artifact: one message, before any worker
    state = Path(state_path) if state_path is not None else art / "state.db"
    # Seeded here, once: workers seeding one database at the same time would wait on each
    # other's write lock, and each read the whole packaged state.
    store = UserStateStore(state)
    try:
        seed_store(art, str(manifest["data"]["fingerprint"]), store)
    finally:
        store.close()
    threads = torch_threads or int(os.environ.get(TORCH_THREADS_ENV, "0") or 0) or 1
    with tempfile.TemporaryDirectory(prefix="funnelrec-serve-") as control:
        record = ModelRecord(control)
        record.publish(art)
        metrics = Path(control) / "metrics"
        metrics.mkdir()
        settings = WorkerSettings(
            control=control,
            state=str(state.resolve()),
            artifacts_root=str(Path(artifacts_root or art.parent).resolve()),
            torch_threads=threads,
            poll_s=poll_s,
        )
        env = {SETTINGS_ENV: json.dumps(asdict(settings)), PROMETHEUS_MULTIPROC_ENV: str(metrics)}
        with _environ(env):  # the workers inherit it
            config = uvicorn.Config(
                "funnelrec.serving.workers:worker_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                # As `serving.http.server_config`: httptools and uvloop (`WorkerLoop`).
                http="httptools",
                loop="funnelrec.serving.workers:WorkerLoop",
                log_level="info",
                # The supervisor kills a worker that does not answer its ping in time. A
                # worker answers from a thread of its own, but one starting on a busy
                # machine (a fresh interpreter importing torch) can hold the GIL for more
                # than uvicorn's default 5 s, and be killed before it ever serves.
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            )
            sock = _bind(host, port)
            supervisor = _Supervisor(config, [sock], record)
            try:
                with _forked_workers():
                    supervisor.run()
            finally:
                sock.close()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise FunnelrecError("a worker could not start serving (its error is logged above)")


class WorkerLoop(uvloop.Loop):
    """The workers' event loop (uvicorn's `loop` setting names it): uvloop's, as a single
    process runs (`serving.http.server_config`), listening on a socket of the worker's own
    where the kernel can balance connections over them.

    With one listening socket shared by every worker, the worker awake first takes each
    new connection (the loop accepts all that are waiting): a pool of clients connecting at
    once would all be served by one worker, for as long as their keep-alive connections
    last, while the others idle. On Linux each worker listens instead on a socket of its
    own bound to the same address with SO_REUSEPORT (the supervisor's socket, bound
    likewise, holds the address), and the kernel spreads connections over the workers by
    a hash of their addresses. A worker that stops drops the connections still waiting in
    its queue, not yet accepted.
    """

    async def create_server(  # type: ignore[override]
        self, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
    ) -> asyncio.AbstractServer:
        shared = kwargs.get("sock")
        reuse_port = getattr(socket, "SO_REUSEPORT", None)
        if (
            isinstance(shared, socket.socket)
            and reuse_port is not None
            and shared.getsockopt(socket.SOL_SOCKET, reuse_port)
        ):
            kwargs["sock"] = _reuse_port_socket(shared.family, shared.getsockname())
        return await super().create_server(protocol_factory, host, port, **kwargs)


def _reuse_port_socket(family: int, address: Any) -> socket.socket:
    """A TCP socket bound to `address` with SO_REUSEPORT (and SO_REUSEADDR).

    Made with its protocol named: asyncio's loop sets TCP_NODELAY on the connections of
    sockets of protocol IPPROTO_TCP only (uvloop on every TCP connection), and without it a
    response written in two parts waits for the client's delayed ACK (tens of milliseconds).
    """
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _bind(host: str, port: int) -> socket.socket:
    """The supervisor's socket on (host, port): with SO_REUSEPORT where the kernel balances
    connections over such sockets (Linux), so that each worker can listen on its own
    (`WorkerLoop`); elsewhere the one socket every worker listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
            sock = _reuse_port_socket(family, (host, port))
        else:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise FunnelrecError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    _log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, sock.getsockname()[1])
    return sock


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, with SIGHUP publishing a reload that every worker follows in
    place of uvicorn's restart of the worker processes (a restarted worker would load the
    record's artifact too, but a broken one would then fail to start, and each restart
    costs a whole load beside the old worker's memory)."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], record: ModelRecord
    ) -> None:
        super().__init__(config, sockets)
        self.record = record

    def handle_hup(self) -> None:
        try:
            _, current = self.record.read()
            generation = self.record.publish(current)
        except (OSError, ValueError) as e:  # the supervisor must carry on whatever happens
            _log.error("Received SIGHUP, but could not publish the reload: %s", e)
            return
        _log.info(
            "Received SIGHUP, reloading %s in every worker (generation %d)", current, generation
        )


class _Forkserver:
    """Stands in for the "spawn" multiprocessing context through which uvicorn starts its
    worker processes (`uvicorn._subprocess.spawn`, the one place it does; it has no
    setting for it): starts them from the forkserver.

    The forkserver imports `PRELOAD` when it starts, then forks each worker, which shares
    those modules' pages with it and with the other workers (copy on write). A fork takes
    the forkserver's environment, that of the process that started it first, so each
    worker is handed the supervisor's (`env`, as a spawned worker would inherit it) and
    takes it before anything else.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))
        self.env = env

    # the name uvicorn calls (not snake case)
    def Process(
        self, target: Callable[..., None], kwargs: dict[str, Any]
    ) -> multiprocessing.process.BaseProcess:
        return self.context.Process(target=_worker_main, args=(self.env, target), kwargs=kwargs)


def _worker_main(env: dict[str, str], start: Callable[..., None], /, **kwargs: Any) -> None:
    """A worker process from the forkserver: the supervisor's environment, then uvicorn's
    start of the worker."""
    os.environ.clear()
    os.environ.update(env)
    start(**kwargs)


@contextmanager
def _forked_workers() -> Iterator[None]:
    """While the supervisor runs, its workers start from a forkserver (`_Forkserver`) with
    this process's environment; where there is none (not POSIX) or uvicorn starts
    processes otherwise, as uvicorn does."""
    if "forkserver" not in multiprocessing.get_all_start_methods() or not hasattr(
        uvicorn._subprocess, "spawn"
    ):
        yield
        return
    before = uvicorn._subprocess.spawn
    uvicorn._subprocess.spawn = _Forkserver(dict(os.environ))  # type: ignore[assignment]
    try:
        yield
    finally:
        uvicorn._subprocess.spawn = before


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the duration, the previous ones put back after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
