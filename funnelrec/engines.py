"""Where funnelrec's parallel work runs: this machine, or a Dask cluster.

    build_features(DATA, FEAT, engine=LocalEngine(workers=2))            # the default: 1
    build_features(DATA, FEAT, engine=DaskEngine("tcp://HOST:8786"))     # a running cluster
    import_events(MAPPING, OUT, engine=DaskEngine("local:2"))            # a LocalCluster here

Two kinds of work use an engine, each a function over small jobs (paths and settings, no
data) that reads its own files:

- the feature build over blocks of users (`features/blocked.py`): count a block's training
  events, write a block's examples. `map_blocks` runs such a function over the jobs and
  calls `done(block, result)` in this process as each ends, in any order.
- the import of your own logs (`data/loaders/events.py`): read, parse and convert one
  file. `imap` runs such a function over the jobs and gives the results back in the jobs'
  order, a few ahead, because what follows (numbering ids) must see the files in order.

What must see everything (partitioning, fitting on summed counts, numbering ids, the
progress record and so resume, the manifest, the rename into place) stays in the calling
process, whatever the engine.

- `LocalEngine`: this process, or `workers` processes of this machine (spawned).
- `DaskEngine`: tasks on a Dask cluster (`distributed.Client`). Every worker must see the
  inputs and the output's parent folder at the same path (a shared filesystem), and have
  funnelrec installed. Dask is imported only when this engine starts, so the local path
  never imports it.

Paths: the feature build reads and writes any filesystem (`funnelrec.filesystems`); its
per-block work reads and writes a local folder every worker sees (for an object-store
output, a staging folder the calling process uploads at the end), so a Dask cluster's
workers must share it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from funnelrec.errors import FunnelrecError
from funnelrec.filesystems import resolve

# Dask's own variable for the scheduler a client connects to (read by `distributed.Client()`).
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
# How long to wait for a cluster without workers to get one before giving up: a scheduler
# with no workers would otherwise hold every task, and the build, forever.
WORKER_WAIT_S = 60.0


class _Job(Protocol):
    @property
    def block(self) -> int: ...


J = TypeVar("J", bound=_Job)
T = TypeVar("T")
R = TypeVar("R")


class Engine(Protocol):
    """Runs a per-block function over jobs; `done(block, result)` here as each one ends.

    Used as a context manager around the build: entering starts what the engine needs (a
    client of the cluster), leaving closes it."""

    name: str

    @property
    def in_process(self) -> bool:
        """True where the jobs run in this process (a block's own progress can be drawn)."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def everywhere(self, fn: Callable[..., R], *args: Any) -> dict[str, R]:
        """`fn(*args)` in every process that runs jobs and lives on between them; by place."""
        ...

    def map_blocks(
        self, fn: Callable[[J], R], jobs: Sequence[J], done: Callable[[int, R], None]
    ) -> None: ...

    def imap(self, fn: Callable[[T], R], jobs: Sequence[T]) -> Generator[R, None, None]:
        """`fn` over `jobs`, the results in the jobs' order. A few jobs run ahead of the
        one being taken, their results held where they ran; closing the iterator drops
        the jobs not started."""
        ...


class LocalEngine:
    """This machine: the jobs in this process (`workers` 1) or in `workers` processes."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise FunnelrecError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    @property
    def in_process(self) -> bool:
        return self.workers == 1

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def everywhere(self, fn: Callable[..., R], *args: Any) -> dict[str, R]:
        # worker processes end with each pass: only this one lives on
        return {"local": fn(*args)}

    def map_blocks(
        self, fn: Callable[[J], R], jobs: Sequence[J], done: Callable[[int, R], None]
    ) -> None:
        if self.workers == 1 or len(jobs) < 2:
            for job in jobs:
                done(job.block, fn(job))
            return
        _run_processes(fn, jobs, self.workers, done)

    def imap(self, fn: Callable[[T], R], jobs: Sequence[T]) -> Generator[R, None, None]:
        if self.workers == 1 or len(jobs) < 2:
            for job in jobs:
                yield fn(job)
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
            yield from _in_order(pool.submit, fn, jobs, 2 * self.workers, _cancel_local)


def _cancel_local(futures: list[Any]) -> None:
    for fut in futures:
        fut.cancel()


def _in_order(
    submit: Callable[..., Any],
    fn: Callable[[T], R],
    jobs: Sequence[T],
    ahead: int,
    cancel: Callable[[list[Any]], None],
) -> Generator[R, None, None]:
    """Submit `fn(job)` at most `ahead` jobs past the one whose result is taken next, and
    give the results in order: the jobs after it keep running while it is used."""
    pending: list[Any] = []
    upcoming = iter(jobs)
    try:
        for job in upcoming:
            pending.append(submit(fn, job))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.pop(0)
            result = fut.result()
            del fut  # its result is no longer held where it ran
            for job in upcoming:
                pending.append(submit(fn, job))
                break
            yield result
    finally:
        # an error, or the caller stopped taking results: the rest are not needed
        if pending:
            cancel(pending)


def _run_processes(
    fn: Callable[[J], R], jobs: Sequence[J], workers: int, done: Callable[[int, R], None]
) -> None:
    """Run `fn` over `jobs` in `workers` processes; `done(block, result)` as each ends.

    Spawned, not forked: a worker starts without the parent's memory."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, job): job.block for job in jobs}
        try:
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def scheduler_address(cluster: str | None) -> str:
    """The scheduler to use: `cluster`, else $DASK_SCHEDULER_ADDRESS, else an error."""
    address = cluster or os.environ.get(SCHEDULER_ENV, "").strip()
    if not address:
        raise FunnelrecError(
            "--engine dask needs a Dask scheduler: --cluster tcp://HOST:8786, or the "
            f"environment variable {SCHEDULER_ENV}, or --cluster local:N to start N "
            "workers on this machine"
        )
    return address


def _local_workers(address: str) -> int | None:
    """N of a `local:N` address; None for a scheduler's address."""
    if not address.startswith("local:"):
        return None
    n = address.removeprefix("local:")
    if not n.isdigit() or int(n) < 1:
        raise FunnelrecError(f"--cluster {address}: local:N needs a number of workers N >= 1")
    return int(n)


class DaskEngine:
    """Each job a Dask task on the cluster at `cluster` (or $DASK_SCHEDULER_ADDRESS).

    `local:N` starts a `LocalCluster` of N single-threaded worker processes for the
    build and closes it after. A worker runs its tasks on its threads: start workers with
    `--nthreads 1` so that a worker process holds one block at a time."""

    name = "dask"

    def __init__(self, cluster: str | None = None) -> None:
        self.address = scheduler_address(cluster)
        self.n_local = _local_workers(self.address)
        self._client: Any = None
        self._cluster: Any = None

    @property
    def in_process(self) -> bool:
        return False

    def __enter__(self) -> DaskEngine:
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise FunnelrecError(
                f"--engine dask needs dask[distributed] ({e}): pip install 'funnelrec[dask]'"
            ) from e
        if self.n_local is not None:
            self._cluster = LocalCluster(
                n_workers=self.n_local, threads_per_worker=1, processes=True, dashboard_address=None
            )
            self._client = Client(self._cluster)
        else:
            try:
                self._client = Client(self.address, timeout="30s")
            except OSError as e:
                raise FunnelrecError(
                    f"cannot reach the Dask scheduler at {self.address}: {e}"
                ) from e
        try:
            self._client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as e:
            self.__exit__()
            raise FunnelrecError(
                f"the Dask scheduler at {self.address} has no worker after "
                f"{WORKER_WAIT_S:.0f} s: start some with `dask worker {self.address} "
                "--nthreads 1`"
            ) from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise FunnelrecError("the dask engine is used outside its `with` block")
        return self._client

    def everywhere(self, fn: Callable[..., R], *args: Any) -> dict[str, R]:
        return dict(self.client.run(fn, *args))

    def map_blocks(
        self, fn: Callable[[J], R], jobs: Sequence[J], done: Callable[[int, R], None]
    ) -> None:
        from distributed import as_completed as dask_completed

        # pure=False: a job's key must not match an earlier run's finished task (its
        # result may be the same, but its files have to be written again)
        futures = {self.client.submit(fn, job, pure=False): job.block for job in jobs}
        try:
            for fut in dask_completed(list(futures)):
                done(futures[fut], fut.result())
        except BaseException:
            # a running task cannot be stopped; the ones not started are dropped
            self.client.cancel(list(futures))
            raise

    def imap(self, fn: Callable[[T], R], jobs: Sequence[T]) -> Generator[R, None, None]:
        # Two jobs per worker thread: one running, one waiting, so no thread idles while
        # this process takes a result.
        ahead = max(2, 2 * sum(self.client.nthreads().values()))
        client = self.client

        def submit(f: Callable[[T], R], job: T) -> Any:
            # pure=False: as in map_blocks, a rerun must not take an earlier run's result
            return client.submit(f, job, pure=False)

        yield from _in_order(submit, fn, jobs, ahead, client.cancel)


def check_visible(engine: Engine, paths: Sequence[Path]) -> None:
    """Raise if a process of `engine` cannot see one of `paths` (a folder not shared)."""
    missing = engine.everywhere(_missing_paths, [str(p) for p in paths])
    bad = {place: m for place, m in missing.items() if m}
    if bad:
        place, m = next(iter(bad.items()))
        raise FunnelrecError(
            f"{len(bad)} {engine.name} worker(s) cannot see {', '.join(m)} (e.g. {place}): "
            "the dataset and the output's folder must be on a filesystem every worker "
            "mounts at the same path"
        )


def _missing_paths(paths: list[str]) -> list[str]:
    """Of `paths`, those this process cannot see."""
    return [p for p in paths if not Path(p).exists()]


def local_path(path: str | Path) -> Path:
    """A local path from a path or a `file://` URI; other filesystems are refused (for the
    steps that read or write local files only: `funnelrec.filesystems.resolve` gives any
    filesystem)."""
    if isinstance(path, Path) or "://" not in path:
        return Path(path)
    scheme = path.split("://", 1)[0]
    # refused before resolving: opening s3:// asks the network for the bucket's region
    loc = resolve(path) if scheme == "file" else None
    if loc is None or not loc.is_local:
        raise FunnelrecError(
            f"{path}: this step reads and writes local paths and file:// URIs; {scheme}:// "
            "is not supported yet here (copy it to a local folder, or mount the bucket, "
            "e.g. with s3fs or gcsfuse)"
        )
    return loc.local
