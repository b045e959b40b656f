"""Serving latency benchmark: end-to-end HTTP against `funnelrec serve`, and load runs
of one worker process beside several.

    .venv/bin/python benchmarks/serving.py runs/demo/artifact                 # latency + load
    .venv/bin/python benchmarks/serving.py runs/medium/artifact --index-1m    # + 1M-item index
    .venv/bin/python benchmarks/serving.py /tmp/small/art --requests 100 --load-seconds 10
    .venv/bin/python benchmarks/serving.py ART --build-1m-only runs/medium/candidates \
        --index-cache runs/medium/bench_index_1m      # the 1M index alone, before packaging

What it measures, on loopback, with the client on the same machine as the server:
1. latency: a real uvicorn server started as `funnelrec serve ART --port P --state S` (a
   fresh state database, seeded at start), then one client (httpx, keep-alive) sending
   `--requests` POST /v1/recommend {user_id, k: 10} one after another for users drawn
   with a fixed seed. Per stage (the response's `timings_ms`: state, context, the three
   candidate sources, merge, features, ranking, server total) p50 and p99, the client's
   end-to-end time ("http total") and what HTTP adds to the server's total ("http").
   Candidates per request: the artifact's serving config (deep_k from the ANN index plus
   the fresh-and-popular and co-watch sources); "ranked" is how many the ranker scored.
   With --deep-k N, the same run again with deep_k = N in place of the packaged one
   (through `serve.create_app(serving=...)`, the app `funnelrec serve` runs): the goal is
   300 candidates ranked (the paper's "a few hundred", Covington et al. 2016, section 2),
   and the packaged 300 + 50 + 50 ranks more than that (the merge drops only repeats;
   "ranked" in the results).
2. load: two servers up at once, `funnelrec serve ART` (one worker process) and
   `funnelrec serve ART --workers N` (--workers, 2), both on the same state; after a
   warm-up, each is loaded by C closed-loop clients (--clients, 1, 8 and 32) for
   --load-seconds, the two servers in turns at each C, so that the ratio of their
   throughputs (the gain of N workers) is measured in one run under the same machine
   load. Per run: requests/s, p50/p99 end to end, the error count (non-200 answers and
   failed requests), CPU per request of the server's processes and of the client, and
   the cores the rest of the machine kept busy meanwhile (/proc/stat less ours). The
   clients are asyncio streams speaking plain HTTP/1.1, one keep-alive connection each,
   requests encoded up front: on a shared 2-core machine a heavier client (httpx) would
   take the cores it measures. The goal: >= 250 requests/s at 8 clients with p99 <= 50 ms
   and no errors ("workers.goal" in the results; "load" is that run).
3. with --index-1m: the same latency run against servers whose deep source searches a
   1M-vector index (`funnelrec.ann.index.ItemIndex`, --index-kind: the package's default above
   50k items, ivfpq_fs, unless told). The medium world has the model's
   real item vectors only (100k); the 1M index holds those plus synthetic ones: each
   real vector gets 9 noisy copies, vector + N(0, (0.3 x the per-dimension std of the
   real vectors)^2). A search fetches k + m rows as the real index does (m = excluded
   watched items); each row answers a real item id, so ranking sees real items, and
   repeats are collapsed to their first (best) occurrence as the candidate merge does.
   Two runs, by what a copy answers (`answers`): "parent", the item it was drawn from
   (copies of one item crowd a top-300, so far fewer distinct items reach the ranker:
   docs/ann.md), and "spread", distinct items per copy (as many candidates as a real
   corpus).
   The index is built once into --index-cache (ivfpq_fs: minutes; hnsw: tens of minutes
   on 2 cores) and reused while the item vectors and settings are the same; its search
   knob (nprobe, efSearch) is tuned to recall@100 >= 0.95 on the model's user vectors for
   random users, and saved with the index, which the servers load as it is.

The machine's load average is recorded with every figure (other jobs share the 2 cores),
and the busiest other processes at the start and the end;
when it was above --quiet-load during the latency run, the run is retaken at the end once
the load has dropped (waiting up to --retake-wait seconds), and both are kept.
Writes benchmarks/results/serving.json (--out) and prints tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
STAGES = (
    "state",
    "context",
    "candidates_deep",
    "candidates_fresh",
    "candidates_cowatch",
    "merge",
    "features",
    "ranking",
    "total",
)
GOAL_P99_MS = 50.0
# The several-workers goal: requests/s at this many concurrent clients, each within p99.
GOAL_CLIENTS, GOAL_RPS = 8, 250.0
console = Console()


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess on loopback; `with Server(cmd, port) as s:` waits for /readyz."""

    def __init__(
        self, cmd: list[str], port: int, log: Path, env: dict[str, str], workers: int = 1
    ) -> None:
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.workers = workers
        self.url = f"http://127.0.0.1:{port}"
        self.ready_s = float("nan")

    def __enter__(self) -> Server:
        start = time.perf_counter()
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = start + 1800
        seen: set[str] = set()
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self._tail()}")
            try:
                # A fresh connection each time: ready when every worker has answered.
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    seen.add(r.json().get("worker", ""))
                    if len(seen) >= self.workers:
                        self.ready_s = time.perf_counter() - start
                        return self
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"server not ready after 30 minutes:\n{self._tail()}")

    def _tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-20:])

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _server_env(torch_threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["FUNNELREC_TORCH_THREADS"] = str(torch_threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------- measuring


def _users(art: Path, n: int, seed: int) -> list[int]:
    """`n` user ids of the artifact's users (with replacement, fixed seed)."""
    ids = pq.read_table(art / "users.parquet", columns=["user_id"]).column("user_id").to_numpy()
    rng = np.random.default_rng(seed)
    return [int(u) for u in rng.choice(ids, n)]


def _pct(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(v, 50)),
        "p99_ms": float(np.percentile(v, 99)),
        "mean_ms": float(v.mean()),
        "max_ms": float(v.max()),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_run(server: Server, users: list[int], warmup: list[int], k: int) -> dict[str, Any]:
    """One client, one request at a time: one per user of `warmup` (not measured), then
    one per user of `users`; per-stage percentiles of the server's timings, and the CPU
    time the server and the client spent per request (what the latency would be on an
    otherwise idle machine, as the server works on one core per request)."""
    url = server.url
    load_before = os.getloadavg()
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    client_ms: list[float] = []
    ranked: list[int] = []
    server_cpu, client_cpu = _cpu_seconds(server.proc.pid), time.process_time()
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, user in enumerate(warmup + users):
            t = time.perf_counter()
            r = client.post("/v1/recommend", json={"user_id": user, "k": k})
            ms = (time.perf_counter() - t) * 1000.0
            if r.status_code != 200:
                raise RuntimeError(f"user {user}: HTTP {r.status_code}: {r.text[:300]}")
            if i < len(warmup):
                if i == len(warmup) - 1:
                    server_cpu, client_cpu = _cpu_seconds(server.proc.pid), time.process_time()
                continue
            body = r.json()
            client_ms.append(ms)
            ranked.append(int(body.get("ranked", 0)))
            for s in STAGES:
                per_stage[s].append(float(body["timings_ms"].get(s, 0.0)))
    server_cpu = _cpu_seconds(server.proc.pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    stages = {s: _pct(v) for s, v in per_stage.items()}
    stages["http"] = _pct([c - t for c, t in zip(client_ms, per_stage["total"], strict=True)])
    stages["http_total"] = _pct(client_ms)
    return {
        "requests": len(users),
        "warmup": len(warmup),
        "k": k,
        "ranked_p50": float(np.median(ranked)),
        "ranked_min": int(min(ranked)),
        "stages_ms": stages,
        "goal_p99_ms": GOAL_P99_MS,
        "goal_met": stages["http_total"]["p99_ms"] <= GOAL_P99_MS,
        "server_cpu_ms_per_request": server_cpu * 1000.0 / len(users),
        "client_cpu_ms_per_request": client_cpu * 1000.0 / len(users),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of process `pid` and its descendants (a server's workers, which
    the supervisor's forkserver starts)."""
    total = 0.0
    for p in _descendants(pid):
        try:
            total += _cpu_seconds(p)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return total


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children, their children, ...)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def _memory_mib(pid: int) -> list[dict[str, float]]:
    """RSS and PSS (MiB) of process `pid` and of its descendants: PSS splits each page
    shared between processes (libraries, page cache) among them, so the PSS add up."""
    pids = _descendants(pid)
    out = []
    for p in pids:
        try:
            kb = {
                k: float(v.split()[0])
                for k, _, v in (
                    line.partition(":")
                    for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]
                )
            }
        except (OSError, ValueError):
            continue
        out.append(
            {"pid": p, "rss_mib": kb.get("Rss", 0) / 1024, "pss_mib": kb.get("Pss", 0) / 1024}
        )
    return out


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: all but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _others(own: set[int], n: int = 6) -> list[str]:
    """The busiest processes other than this benchmark's (`ps`), as "pid %cpu command"."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()[1:]  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        pid, ppid, cpu, *cmd = line.split(maxsplit=3)
        if int(pid) in own or int(ppid) in own or float(cpu) < 1.0:
            continue
        rows.append(f"{pid} {cpu}% {' '.join(cmd)[:100]}")
    return rows[:n]


def _request_bytes(user: int, k: int) -> bytes:
    body = json.dumps({"user_id": user, "k": k}).encode()
    head = (
        "POST /v1/recommend HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _load(port: int, users: list[int], concurrency: int, seconds: float, k: int) -> Any:
    """`concurrency` closed-loop clients, one keep-alive connection each, for `seconds`.

    Plain HTTP/1.1 over asyncio streams with the requests encoded up front: a client that
    costs little CPU per request, as it shares the machine's cores with the server."""
    requests = [_request_bytes(u, k) for u in users]
    lat: list[float] = []
    errors: list[str] = []
    next_user = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal next_user
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                req = requests[next_user % len(requests)]
                next_user += 1
                t = time.perf_counter()
                try:
                    writer.write(req)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    await reader.readexactly(length)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors.append(type(e).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status != 200:
                    errors.append(f"HTTP {status}")
                    if b"connection: close" in head.lower():
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                lat.append((time.perf_counter() - t) * 1000.0)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return lat, errors, time.perf_counter() - start


class Usage:
    """Where the machine's CPU goes during a load run: the server's process tree, this
    client process, everything else; started at construction, read by `report`."""

    def __init__(self, server: Server) -> None:
        self.pid = server.proc.pid
        self.load_before = os.getloadavg()
        self.cpu, self.client_cpu = _tree_cpu_seconds(self.pid), time.process_time()
        self.busy = _machine_busy_seconds()

    def report(
        self, lat: list[float], errors: list[str], elapsed: float
    ) -> tuple[dict[str, Any], float, float]:
        """(the run's figures, server CPU seconds, client CPU seconds) since the start."""
        cpu = _tree_cpu_seconds(self.pid) - self.cpu
        client_cpu = time.process_time() - self.client_cpu
        busy = _machine_busy_seconds() - self.busy
        figures = {
            "seconds": elapsed,
            "completed": len(lat),
            "errors": len(errors),
            "error_kinds": sorted(set(errors)),
            "throughput_rps": len(lat) / elapsed,
            "latency_ms": _pct(lat) if lat else {},
            "server_cores_busy": cpu / elapsed,
            "other_cores_busy": max(0.0, busy - cpu - client_cpu) / elapsed,
            "load_average_before": self.load_before,
            "load_average_after": os.getloadavg(),
        }
        return figures, cpu, client_cpu


def load_run(server: Server, users: list[int], concurrency: int, seconds: float, k: int) -> dict:
    """`concurrency` clients for `seconds`: throughput, latency percentiles, errors, and
    where the machine's CPU went (this server, the client, everything else)."""
    usage = Usage(server)
    lat, errors, elapsed = asyncio.run(_load(server.port, users, concurrency, seconds, k))
    figures, cpu, client_cpu = usage.report(lat, errors, elapsed)
    done = max(1, len(lat))
    return {
        **figures,
        "server_cpu_ms_per_request": cpu * 1000.0 / done,
        "client_cpu_ms_per_request": client_cpu * 1000.0 / done,
        "concurrency": concurrency,
    }


def workers_runs(
    servers: dict[int, Server], users: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """Load runs of the servers (worker count -> server) at each client count, the
    servers taken in turns at each count so that a change in the machine's other load
    falls on both sides of a ratio alike."""
    clients = [int(c) for c in args.clients.split(",")]
    runs: list[dict[str, Any]] = []
    for w, server in servers.items():  # warm up: first requests load caches and pages
        load_run(server, users, max(clients), args.warmup_seconds, args.k)
        console.print(f"[dim]{w} worker(s): warmed up[/dim]")
    for c in clients:
        for w, server in servers.items():
            run = {"workers": w, **load_run(server, users, c, args.load_seconds, args.k)}
            runs.append(run)
            _print_load(run)
    by = {(r["workers"], r["concurrency"]): r for r in runs}
    many = max(servers)
    goal_run = by.get((many, GOAL_CLIENTS))
    out: dict[str, Any] = {
        "workers": sorted(servers),
        "clients": clients,
        "seconds_per_run": args.load_seconds,
        "runs": runs,
        "gain": {
            str(c): by[(many, c)]["throughput_rps"] / by[(1, c)]["throughput_rps"]
            for c in clients
            if (1, c) in by and (many, c) in by and by[(1, c)]["throughput_rps"] > 0
        },
        "goal": {"clients": GOAL_CLIENTS, "throughput_rps": GOAL_RPS, "p99_ms": GOAL_P99_MS},
    }
    if goal_run is not None:
        lm = goal_run["latency_ms"]
        out["goal"]["met"] = bool(
            goal_run["throughput_rps"] >= GOAL_RPS
            and lm.get("p99_ms", float("inf")) <= GOAL_P99_MS
            and goal_run["errors"] == 0
        )
    return out


# --------------------------------------------------------------------------- the 1M index


class CollapsedIndex:
    """The deep source over the 1M index: row ids 0..R-1, `answer[row]` the real item id
    each row stands for (see `answers`).

    Like `ItemIndex.search` with m excluded items, it searches k + m rows deep (the same
    search the real index makes); the rows' answers then lose the excluded items and
    repeats (the first, best-scoring occurrence is kept, as the candidate merge does).
    """

    def __init__(self, index: Any, answer: np.ndarray) -> None:
        self.index, self.answer = index, answer

    @property
    def count(self) -> int:
        return int(self.index.count)

    def search(self, queries: Any, k: int, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        excluded = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        rows, scores = self.index.search(queries, min(k + len(excluded), self.count))
        ids = np.where(rows >= 0, self.answer[np.maximum(rows, 0)], -1)
        keep = (ids >= 0) & ~np.isin(ids, excluded)
        ids, scores = ids[keep], scores[keep]
        _, first = np.unique(ids, return_index=True)
        first = np.sort(first)[:k]
        return ids[first], scores[first]


def answers(real_ids: np.ndarray, copies: int, mode: str) -> np.ndarray:
    """[n (copies + 1)] the real item id of each row of the 1M index (row j n + i is copy
    j of item i; j = 0: the real vector).

    parent: every copy answers its own item. The copies of an item the user is close to
        are all close too, so a top-300 holds few distinct items (docs/ann.md, "A 1M-item
        index at serving") and far fewer candidates reach the ranker than on a real 1M
        corpus.
    spread: copy j of item i answers item (i + j x shift) mod n, shift ~0.618 n: rows
        answer distinct items, so the ranker gets as many candidates as on a real corpus.
    """
    n = len(real_ids)
    if mode == "parent":
        return np.tile(real_ids, copies + 1)
    shift = max(1, int(n * 0.6180339887))
    j = np.repeat(np.arange(copies + 1, dtype=np.int64), n)
    i = np.tile(np.arange(n, dtype=np.int64), copies + 1)
    return real_ids[(i + j * shift) % n]


def build_1m_index(cand_dir: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build (or reuse) the 1M-vector index (--index-kind) over the item vectors of
    candidate model `cand_dir` (an artifact's candidates/ or the candidate stage's own
    directory) in `cache`; returns how it was formed. Its knob is tuned later (`tune_1m`)."""
    import hashlib

    from funnelrec.ann.index import IndexParams, ItemIndex
    from funnelrec.candidates import ITEM_EMBEDDINGS_FILE, load_item_embeddings

    emb_t, _ = load_item_embeddings(cand_dir)
    emb = emb_t.float().numpy()
    n_real, dim = emb.shape
    copies = max(0, -(-args.index_items // n_real) - 1)  # ceil(items / real) - 1
    digest = hashlib.sha256((cand_dir / ITEM_EMBEDDINGS_FILE).read_bytes()).hexdigest()
    formation: dict[str, Any] = {
        "formed_as": (
            f"{n_real} real item vectors of the candidate model plus {copies} synthetic copies "
            f"of each (vector + Gaussian noise of {args.noise} x the per-dimension std of the "
            f"real vectors), one {args.index_kind} index over all of them"
        ),
        "real_items": int(n_real),
        "copies_per_item": int(copies),
        "vectors": int(n_real * (copies + 1)),
        "noise": args.noise,
        "dim": int(dim),
        "seed": args.seed,
        "kind": args.index_kind,
        **(
            {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
            if args.index_kind == "hnsw"
            else {}
        ),
        "item_embeddings_sha256": digest,
    }
    meta_file = cache / "formation.json"
    if meta_file.is_file() and (cache / "index").is_dir():
        old = json.loads(meta_file.read_text())
        if {k: old.get(k) for k in formation} == formation:
            console.print(f"1M index: reusing {cache}")
            return dict(old)
    if cache.exists():
        shutil.rmtree(cache)
    rng = np.random.default_rng(args.seed)
    sd = emb.std(axis=0, keepdims=True) * args.noise
    parts = [emb]
    for _ in range(copies):
        parts.append(emb + rng.standard_normal(emb.shape).astype(np.float32) * sd)
    x = np.concatenate(parts)
    ids = np.arange(len(x), dtype=np.int64)  # row j n + i: copy j of item i (`answers`)
    del parts
    console.print(f"1M index: building {args.index_kind} over {len(x):,} vectors...")
    params = (
        IndexParams(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        if args.index_kind == "hnsw"
        else IndexParams()
    )
    load_before = os.getloadavg()
    index = ItemIndex.build(
        x, ids, kind=args.index_kind, params=params, progress=True, seed=args.seed,
        threads=args.build_threads,
    )  # fmt: skip
    formation["build_seconds"] = index.build_seconds
    formation["build_threads"] = args.build_threads
    formation["build_load_average"] = [load_before, os.getloadavg()]
    index.save(cache / "index", force=True)
    cache.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(formation, indent=2) + "\n")
    return formation


def tune_1m(art: Path, cache: Path, state: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The 1M index's knob (nprobe / efSearch) for recall@100 >= 0.95 on user vectors of
    real requests, saved with the index (the servers load it as it is)."""
    from funnelrec.ann.index import ItemIndex

    index = ItemIndex.load(cache / "index")
    queries = _user_vectors(art, state, args.tune_queries, args.seed + 1)
    recall = index.tune(
        queries, k=100, target_recall=0.95, query_source="random users' serving vectors"
    )
    index.save(cache / "index", force=True)
    return {"search_params": index.params.for_kind(index.kind), "recall_at_100": recall,
            "tune_queries": len(queries)}  # fmt: skip


def _user_vectors(art: Path, state: Path, n: int, seed: int) -> np.ndarray:
    """[n, d] the candidate model's vectors for random users as a request would build them."""
    import torch

    from funnelrec.serving.recommender import Recommender, RecommendRequest
    from funnelrec.serving.state import UserStateStore

    rec = Recommender.load(art)
    store = UserStateStore(state)
    rec.seed_state(store)
    out = []
    for user in _users(art, n, seed):
        ctx = rec._context(RecommendRequest(user_id=user), store.context(user))
        batch = rec.features.candidate_batch(
            [list(ctx.events.history)], [list(ctx.events.queries)], [ctx.demographics]
        )
        with torch.no_grad():
            out.append(rec.candidate_model(batch).float().numpy()[0])
    store.close()
    return np.stack(out)


def serve_launcher(art: Path, port: int, state: Path, args: argparse.Namespace) -> None:
    """A server like `funnelrec serve ART` (the same app and `run_app`), with --deep-k in
    place of the artifact's packaged deep_k and, for the 1M runs, the deep source's index
    replaced (run in a subprocess by `main`)."""
    from dataclasses import replace

    from funnelrec.ann.index import ItemIndex
    from funnelrec.candidates import load_item_embeddings
    from funnelrec.serving.http import create_app, run_app
    from funnelrec.serving.recommender import ServingConfig

    serving = None
    if args.deep_k is not None:
        packaged = json.loads((art / "manifest.json").read_text()).get("serving", {})
        serving = replace(ServingConfig(**packaged), deep_k=args.deep_k)
    app = create_app(art, state_path=state, serving=serving)
    if args.serve_index:
        index_dir, mode = args.serve_index
        index = ItemIndex.load(index_dir)  # with the knob `tune_1m` saved
        _, real_ids = load_item_embeddings(art / "candidates")
        copies = index.count // len(real_ids) - 1
        answer = answers(real_ids.numpy().astype(np.int64), copies, mode)
        app.state.service.recommender.index = CollapsedIndex(index, answer)
    run_app(app, host="127.0.0.1", port=port)


def _launcher_cmd(art: Path, port: int, state: Path, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        str(art),
        "--serve",
        str(port),
        str(state),
    ]
    if args.deep_k is not None:
        cmd += ["--deep-k", str(args.deep_k)]
    return cmd


# --------------------------------------------------------------------------- report


def _latency_table(title: str, res: dict[str, Any]) -> Table:
    t = Table(title=title)
    t.add_column("stage")
    t.add_column("p50 ms", justify="right")
    t.add_column("p99 ms", justify="right")
    for stage, v in res["stages_ms"].items():
        t.add_row(stage, f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}")
    return t


def _caption(res: dict[str, Any]) -> str:
    la = res["load_average_before"]
    met = "met" if res["goal_met"] else "NOT met"
    return (
        f"{res['requests']} requests, k={res['k']}, ranked p50 {res['ranked_p50']:.0f}; "
        f"server CPU {res['server_cpu_ms_per_request']:.1f} ms/request; load average "
        f"{la[0]:.2f} before; goal p99 <= {GOAL_P99_MS:.0f} ms end to end: {met}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact", type=Path, help="artifact directory (funnelrec package / run)")
    ap.add_argument("--requests", type=int, default=300, help="latency run requests [300]")
    ap.add_argument("--warmup", type=int, default=30, help="requests before measuring [30]")
    ap.add_argument("--k", type=int, default=10, help="items per response [10]")
    ap.add_argument("--workers", type=int, default=2,
                    help="load runs: this many worker processes beside one [2]")  # fmt: skip
    ap.add_argument("--clients", default="1,8,32", help="load runs: concurrent clients [1,8,32]")
    ap.add_argument("--load-seconds", type=float, default=20, help="each load run's length [20]")
    ap.add_argument("--warmup-seconds", type=float, default=3, help="load before the runs [3]")
    ap.add_argument("--torch-threads", type=int, default=1, help="server model threads [1]")
    ap.add_argument("--state", type=Path, default=None, help="state database (default: fresh)")
    ap.add_argument("--index-1m", action="store_true", help="also measure a 1M-item index")
    ap.add_argument("--index-items", type=int, default=1_000_000, help="its size [1M]")
    ap.add_argument("--index-cache", type=Path, default=None, help="[ART/../bench_index_1m]")
    ap.add_argument("--noise", type=float, default=0.3, help="copies' noise / std [0.3]")
    ap.add_argument("--index-kind", default="ivfpq_fs", choices=("ivfpq_fs", "hnsw"),
                    help="1M index kind [ivfpq_fs: the default above 50k items]")  # fmt: skip
    ap.add_argument("--hnsw-m", type=int, default=32, help="1M index: HNSW links [32]")
    ap.add_argument("--ef-construction", type=int, default=100, help="1M index build [100]")
    ap.add_argument("--build-threads", type=int, default=1,
                    help="1M index: build threads (the cores are shared) [1]")  # fmt: skip
    ap.add_argument("--tune-queries", type=int, default=300, help="1M index tuning users")
    ap.add_argument("--quiet-load", type=float, default=1.5, help="retake above this [1.5]")
    ap.add_argument("--retake-wait", type=float, default=900, help="wait for quiet, s [900]")
    ap.add_argument("--note", default="", help="what the artifact is (kept in the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    ap.add_argument(
        "--build-1m-only",
        type=Path,
        default=None,
        metavar="CAND_DIR",
        help="only build the 1M index from a candidate model directory (needs "
        "--index-cache), e.g. before its artifact is packaged",
    )
    ap.add_argument(
        "--answers",
        default="spread,parent",
        help="1M index: how copies answer, runs in this order (see `answers`)",
    )
    ap.add_argument(
        "--deep-k",
        type=int,
        default=None,
        help="also measure with this deep_k instead of the packaged one (e.g. 200: "
        "~300 candidates ranked with the fresh and co-watch sources); the 1M runs "
        "use it too",
    )
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS, metavar=("PORT", "STATE"))
    ap.add_argument("--serve-index", nargs=2, help=argparse.SUPPRESS,
                    metavar=("INDEX", "ANSWERS"))  # fmt: skip
    args = ap.parse_args(argv)
    art = args.artifact.resolve()
    if args.serve:
        serve_launcher(art, int(args.serve[0]), Path(args.serve[1]), args)
        return 0
    if args.build_1m_only is not None:
        if args.index_cache is None:
            ap.error("--build-1m-only needs --index-cache")
        formation = build_1m_index(args.build_1m_only.resolve(), args.index_cache, args)
        console.print(json.dumps(formation, indent=2))
        return 0

    manifest = json.loads((art / "manifest.json").read_text())
    results: dict[str, Any] = {
        "artifact": str(art),
        "note": args.note,
        "fingerprint": manifest["fingerprint"],
        "world": manifest.get("counts", {}),
        "index": {k: manifest["candidates"]["index"].get(k) for k in ("kind", "count", "params")},
        "serving": manifest.get("serving", {}),
        "ranker_tower": None,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "client": "httpx on the same machine (loopback), keep-alive connections; load runs: "
        "asyncio HTTP/1.1 clients, one keep-alive connection each (`_load`)",
        "torch_threads": args.torch_threads,
        "busiest_other_processes_at_start": _others({os.getpid()}),
        "load_average_at_start": os.getloadavg(),
    }
    rank_cfg = json.loads((art / "ranker" / "config.json").read_text())
    results["ranker_tower"] = rank_cfg.get("config", {}).get("tower")
    users = _users(art, args.requests, args.seed)
    warm = _users(art, args.warmup, args.seed + 3)
    load_users = _users(art, 5000, args.seed + 7)
    env = _server_env(args.torch_threads)
    funnelrec = str(Path(sys.executable).parent / "funnelrec")

    with tempfile.TemporaryDirectory(prefix="funnelrec-bench-") as tmp_dir, ExitStack() as up:
        tmp = Path(tmp_dir)
        state = args.state or tmp / "state.db"
        servers: dict[int, Server] = {}
        for w in sorted({1, args.workers}):  # one after the other: the first seeds the state
            port = _free_port()
            cmd = [funnelrec, "serve", str(art), "--port", str(port), "--state", str(state)]
            cmd += ["--workers", str(w)] if w > 1 else []
            servers[w] = up.enter_context(Server(cmd, port, tmp / f"server_{w}.log", env, w))
            key = "server" if w == 1 else "server_workers"
            results[key] = {"command": " ".join(cmd), "ready_s": servers[w].ready_s}
            console.print(f"{w} worker(s) ready in {servers[w].ready_s:.1f} s")
        lat = latency_run(servers[1], users, warm, args.k)
        results["latency"] = lat
        console.print(_latency_table("end-to-end HTTP latency, one client", lat))
        console.print(_caption(lat))
        _write(args.out, results)
        if args.load_seconds > 0:
            scaling = workers_runs(servers, load_users, args)
            results["workers"] = scaling
            # "load": the goal's run (the most workers, its clients), as before one run
            results["load"] = next(
                r for r in scaling["runs"]
                if r["workers"] == args.workers and r["concurrency"] == GOAL_CLIENTS
            )  # fmt: skip
            _print_workers(scaling)
        for w, server in servers.items():  # after the runs: what serving paged in counts
            key = "server" if w == 1 else "server_workers"
            results[key]["memory_mib"] = _memory_mib(server.proc.pid)  # supervisor first
        _write(args.out, results)
        up.close()

        if args.deep_k is not None:
            port = _free_port()
            cmd = _launcher_cmd(art, port, state, args)
            with Server(cmd, port, tmp / "server_deep_k.log", env) as server:
                lat = latency_run(server, users, warm, args.k)
            results["latency_deep_k"] = {"deep_k": args.deep_k, **lat}
            console.print(_latency_table(f"end-to-end HTTP latency, deep_k={args.deep_k}", lat))
            console.print(_caption(lat))
            _write(args.out, results)

        if args.index_1m:
            cache = args.index_cache or art.parent / "bench_index_1m"
            formation = build_1m_index(art / "candidates", cache, args)
            formation.update(tune_1m(art, cache, state, args))
            results["index_1m"] = formation
            for mode in args.answers.split(","):
                port = _free_port()
                cmd = _launcher_cmd(art, port, state, args)
                cmd += ["--serve-index", str(cache / "index"), mode]
                with Server(cmd, port, tmp / f"server_1m_{mode}.log", env) as server:
                    lat = latency_run(server, users, warm, args.k)
                results[f"latency_1m_{mode}"] = {"deep_k": args.deep_k, **lat}
                title = f"end-to-end HTTP latency, 1M-item index, copies answer: {mode}"
                console.print(_latency_table(title, lat))
                console.print(_caption(lat))
                _write(args.out, results)
            console.print(f"[dim]1M index: {formation['formed_as']}[/dim]")

        first_load = results["latency"]["load_average_before"][0]
        if first_load > args.quiet_load:
            retake = _retake(cmd_base=[funnelrec, "serve", str(art)], state=state, tmp=tmp,
                             env=env, users=users, warm=warm, args=args)  # fmt: skip
            if retake is not None:
                results["latency_retake"] = retake
                console.print(_latency_table("retaken when the load was lower", retake))
                console.print(_caption(retake))
            else:
                results["latency_retake"] = {
                    "skipped": f"load average stayed above {args.quiet_load} and above "
                    f"0.6 x {first_load:.2f} for {args.retake_wait:.0f} s",
                    "load_average": os.getloadavg(),
                }
            _write(args.out, results)
    results["busiest_other_processes_at_end"] = _others({os.getpid()})
    results["load_average_at_end"] = os.getloadavg()
    _write(args.out, results)
    console.print(f"wrote {args.out}")
    return 0


def _retake(
    *,
    cmd_base: list[str],
    state: Path,
    tmp: Path,
    env: dict[str, str],
    users: list[int],
    warm: list[int],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """The 100k latency run again once the 1-minute load average has dropped."""
    first = os.getloadavg()[0]
    deadline = time.time() + args.retake_wait
    while True:
        now = os.getloadavg()[0]
        if now <= args.quiet_load or now <= 0.6 * first:
            break
        if time.time() > deadline:
            return None
        console.print(f"[dim]load average {now:.2f}: waiting for a quieter machine...[/dim]")
        time.sleep(30)
    port = _free_port()
    cmd = [*cmd_base, "--port", str(port), "--state", str(state)]
    with Server(cmd, port, tmp / "server_retake.log", env) as server:
        return latency_run(server, users, warm, args.k)


def _print_load(load: dict[str, Any]) -> None:
    workers = load.get("workers", 1)
    t = Table(
        title=f"load run: {workers} worker(s), {load['concurrency']} clients, "
        f"{load['seconds']:.0f} s"
    )
    cols = ("completed", "errors", "req/s", "p50 ms", "p99 ms", "server cores", "others' cores",
            "load avg")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    lm = load["latency_ms"]
    t.add_row(
        str(load["completed"]),
        str(load["errors"]),
        f"{load['throughput_rps']:.1f}",
        f"{lm.get('p50_ms', float('nan')):.1f}",
        f"{lm.get('p99_ms', float('nan')):.1f}",
        f"{load['server_cores_busy']:.2f}",
        f"{load['other_cores_busy']:.2f}",
        f"{load['load_average_before'][0]:.2f}",
    )
    console.print(t)


def _print_workers(scaling: dict[str, Any]) -> None:
    t = Table(title="requests/s, p50 / p99 ms, errors by workers and clients")
    t.add_column("clients", justify="right")
    for w in scaling["workers"]:
        t.add_column(f"{w} worker(s)", justify="right")
    t.add_column("gain", justify="right")
    by = {(r["workers"], r["concurrency"]): r for r in scaling["runs"]}
    for c in scaling["clients"]:
        cells = []
        for w in scaling["workers"]:
            r = by[(w, c)]
            lm = r["latency_ms"]
            cells.append(
                f"{r['throughput_rps']:.0f} req/s, {lm.get('p50_ms', float('nan')):.1f} / "
                f"{lm.get('p99_ms', float('nan')):.1f} ms, {r['errors']} errors"
            )
        gain = scaling["gain"].get(str(c))
        t.add_row(str(c), *cells, f"{gain:.2f}x" if gain else "-")
    console.print(t)
    goal = scaling["goal"]
    met = {True: "met", False: "NOT met"}.get(goal.get("met"), "-")
    console.print(
        f"goal: >= {goal['throughput_rps']:.0f} req/s with p99 <= {goal['p99_ms']:.0f} ms and "
        f"0 errors at {goal['clients']} clients, {max(scaling['workers'])} workers: {met}"
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
