"""The feature build's per-block work on each candidate engine: Dask, Ray and PySpark.

    .venv/bin/python benchmarks/engines.py                           # medium world, 1 and 2 workers
    .venv/bin/python benchmarks/engines.py --preset tiny --runs local:1,dask:2,ray:2,spark:2 \
        --work /tmp/engines-tiny --out /tmp/engines-tiny.json

funnelrec runs its parallel data work through a small interface (`funnelrec.engines`:
`map_blocks`, `imap`, `everywhere`): the feature build's blocks of users (count a block,
write a block's examples) and the import's files are jobs of a few paths and settings
that read and write their own files. The product ships a local engine and a Dask one.
This benchmark is how Dask was chosen: the same build, on the same world, with the same
jobs handed to each engine in turn, on a local cluster of 1 and of 2 worker processes of
this machine:

    local   `LocalEngine(workers)`: this process (1) or spawned processes (2)
    dask    `DaskEngine("local:N")`: a `distributed.LocalCluster` of N single-threaded
            worker processes, started for the build
    ray     `RayEngine(N)` below: `ray.init(num_cpus=N)` and each job a Ray task
            (`ray.remote(num_cpus=1)`), taken as each ends (`ray.wait`)
    spark   `SparkEngine(N)` below: a `local[N]` SparkSession and each job a one-task Spark
            job (`parallelize([job], 1).map(fn).collect()`), N submitted at once from
            threads of this process, so each result is taken as it ends

Ray and PySpark are not dependencies of funnelrec (`pip install ray pyspark` to run their
arms; PySpark needs a Java 17+ runtime). Each build is timed whole (wall), and the engine's
start on its own (`__enter__`: cluster processes, a JVM); every build's output is
compared with the local one-process build's, file by file (the same bytes, or for the
manifest the same counts, vocabularies, splits and config). The install weight of each
engine is the size of its installed packages (and for PySpark, the Java runtime it needs
besides). The machine's load average before and after each build is recorded (other jobs
may share the cores). Writes --out (benchmarks/results/engines.json).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
# A script's folder comes first on sys.path, and benchmarks/distributed.py would stand in
# for Dask's `distributed` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
RESULTS = HERE / "results"
DEFAULT_RUNS = "local:1,local:2,dask:1,dask:2,ray:1,ray:2,spark:1,spark:2"

J = TypeVar("J")
R = TypeVar("R")


# --------------------------------------------------------------------------- engines


class RayEngine:
    """Each job a Ray task on a Ray instance of `workers` CPUs started for the build."""

    name = "ray"

    def __init__(self, workers: int) -> None:
        self.workers = workers

    @property
    def in_process(self) -> bool:
        return False

    def __enter__(self) -> RayEngine:
        import ray

        ray.init(
            num_cpus=self.workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()

    def everywhere(self, fn: Callable[..., R], *args: Any) -> dict[str, R]:
        import ray

        # one machine: every worker sees what one task sees
        return {"ray": ray.get(ray.remote(num_cpus=1)(fn).remote(*args))}

    def map_blocks(self, fn: Callable[[Any], R], jobs: Sequence[Any], done: Any) -> None:
        import ray

        task = ray.remote(num_cpus=1)(fn)
        pending = {task.remote(job): job.block for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done(pending.pop(ref), ray.get(ref))

    def imap(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Generator[R, None, None]:
        import ray

        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(job) for job in jobs]
        for ref in refs:
            yield ray.get(ref)


class SparkEngine:
    """Each job a one-task Spark job on a `local[workers]` SparkSession."""

    name = "spark"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._spark: Any = None

    @property
    def in_process(self) -> bool:
        return False

    def __enter__(self) -> SparkEngine:
        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        self._spark = (
            SparkSession.builder.master(f"local[{self.workers}]")
            .appName("funnelrec-engines")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.memory", "4g")
            .config("spark.python.worker.reuse", "true")
            .getOrCreate()
        )
        self._spark.sparkContext.setLogLevel("ERROR")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spark is not None:
            self._spark.stop()
            self._spark = None

    def _run(self, fn: Callable[..., R], *args: Any) -> R:
        sc = self._spark.sparkContext
        out: list[R] = sc.parallelize([args], 1).map(lambda a: fn(*a)).collect()
        return out[0]

    def everywhere(self, fn: Callable[..., R], *args: Any) -> dict[str, R]:
        return {"spark": self._run(fn, *args)}

    def map_blocks(self, fn: Callable[[Any], R], jobs: Sequence[Any], done: Any) -> None:
        with ThreadPoolExecutor(self.workers) as pool:
            futures: dict[Future[R], int] = {
                pool.submit(self._run, fn, job): job.block for job in jobs
            }
            for fut in as_completed(futures):
                done(futures[fut], fut.result())

    def imap(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Generator[R, None, None]:
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self._run, fn, job) for job in jobs]
            for fut in futures:
                yield fut.result()


def make_engine(kind: str, workers: int) -> Any:
    from funnelrec.engines import DaskEngine, LocalEngine

    if kind == "local":
        return LocalEngine(workers)
    if kind == "dask":
        return DaskEngine(f"local:{workers}")
    if kind == "ray":
        return RayEngine(workers)
    if kind == "spark":
        return SparkEngine(workers)
    raise SystemExit(f"unknown engine {kind!r}: local, dask, ray or spark")


class _Entered:
    """An engine whose `__enter__` ran already (timed on its own); exits with the build."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = engine.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def __enter__(self) -> Any:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.__exit__(*exc)


# --------------------------------------------------------------------------- comparison


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST_KEYS = ("counts", "oov", "vocabularies", "candidates", "ranking", "split", "config")


def differences(a: Path, b: Path) -> list[str]:
    """How build `b` differs from build `a`: files only one has, files whose bytes differ,
    manifest keys that differ (its timing and engine aside). Empty: the same build."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    out = [f"only in {a.name}: {p}" for p in sorted(files_a - files_b)]
    out += [f"only in {b.name}: {p}" for p in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        if rel.name == "features.json":
            ma, mb = (json.loads((d / rel).read_text()) for d in (a, b))
            out += [f"{rel}: {k}" for k in MANIFEST_KEYS if ma.get(k) != mb.get(k)]
        elif _sha256(a / rel) != _sha256(b / rel):
            out.append(f"{rel}: other bytes")
    return out


# --------------------------------------------------------------------------- install weight


def _installed_mib(dist: str, seen: set[str] | None = None) -> float:
    """MiB of the installed files of distribution `dist` and of its requirements not
    already counted (`seen`); 0 where it is not installed."""
    seen = set() if seen is None else seen
    key = dist.lower().replace("_", "-")
    if key in seen:
        return 0.0
    seen.add(key)
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return 0.0
    size = sum((f.size or 0) for f in (d.files or []))
    for text in d.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):  # extras left out
            size += _installed_mib(req.name, seen) * (1 << 20)
    return size / (1 << 20)


def install_weight() -> dict[str, Any]:
    """Installed MiB of each engine with the requirements funnelrec does not pull in
    already (those of funnelrec itself counted as present)."""
    base: set[str] = set()
    _installed_mib("funnelrec", base)
    out: dict[str, Any] = {}
    for engine, dists in (
        ("dask", ["dask", "distributed"]),
        ("ray", ["ray"]),
        ("spark", ["pyspark"]),
    ):
        seen = set(base)
        out[engine] = {
            "packages": dists,
            "installed_mib": round(sum(_installed_mib(d, seen) for d in dists), 1),
            "versions": {d: _version(d) for d in dists},
        }
    java = shutil.which("java")
    out["spark"]["needs"] = "a Java 17+ runtime (here: " + (java or "none found") + ")"
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- the runs


def world(args: argparse.Namespace) -> Path:
    """The dataset: --data, or the preset simulated once under --work."""
    if args.data is not None:
        return Path(args.data)
    from funnelrec.simulate import generate, preset_config

    out = args.work / f"data-{args.preset}-s{args.seed}"
    if not (out / "manifest.json").exists():
        print(f"simulating the {args.preset} world into {out} ...", flush=True)
        generate(preset_config(args.preset, []), seed=args.seed, out=out, progress=False)
    return out


def build(kind: str, workers: int, data: Path, out: Path, block_events: int) -> dict[str, Any]:
    from funnelrec.data.dataset import Dataset
    from funnelrec.features import FeaturesConfig
    from funnelrec.features.build import build_features

    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    engine = make_engine(kind, workers)
    engine.__enter__()
    started = time.perf_counter() - t0
    t1, cpu1 = time.perf_counter(), time.process_time()
    build_features(
        Dataset.open(data),
        out,
        split="time",
        config=FeaturesConfig(block_events=block_events),
        force=True,
        progress=False,
        engine=_Entered(engine),
    )
    wall = time.perf_counter() - t1
    return {
        "engine": kind,
        "workers": workers,
        "start_s": round(started, 2),
        "build_wall_s": round(wall, 2),
        "driver_cpu_s": round(time.process_time() - cpu1, 2),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="an existing dataset")
    ap.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-engines"))
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"engine:workers, ... [{DEFAULT_RUNS}]")
    ap.add_argument(
        "--blocks", type=int, default=8, help="blocks of users the build is cut into [8]"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    ap.add_argument("--keep", action="store_true", help="keep every build under --work")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    from funnelrec import __version__
    from funnelrec.data.dataset import Dataset
    from funnelrec.experiments.report import git_commit

    data = world(args)
    ds = Dataset.open(data)
    events = sum(ds.num_rows(t) for t in ("watches", "searches", "impressions"))
    block_events = -(-events // args.blocks)
    results: dict[str, Any] = {
        "benchmark": "engines",
        "command": " ".join(["benchmarks/engines.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "code": {"commit": git_commit(), "funnelrec": __version__},
        "world": {
            "preset": args.preset if args.data is None else None,
            "path": str(data),
            "events": events,
        },
        "build": f"features build --split time, block_events={block_events} ({args.blocks} blocks)",
        "install": install_weight(),
        "runs": [],
    }
    reference: Path | None = None
    for spec in args.runs.split(","):
        kind, _, n = spec.partition(":")
        workers = int(n or 1)
        out = args.work / f"feat-{kind}-{workers}"
        print(f"{kind} with {workers} worker(s) ...", flush=True)
        run = build(kind, workers, data, out, block_events)
        if reference is None:
            reference = out
            run["same_as_reference"] = True
        else:
            diff = differences(reference, out)
            run["same_as_reference"] = not diff
            run["differences_first"] = diff[:10]
        results["runs"].append(run)
        print(
            f"  start {run['start_s']:.1f} s, build {run['build_wall_s']:.1f} s wall, "
            f"same as {reference.name}: {run['same_as_reference']}",
            flush=True,
        )
        if out != reference and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)
    results["reference"] = str(reference)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
