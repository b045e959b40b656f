"""ANN retrieval benchmark: recall@k vs exact and single-query latency, per search setting.

    .venv/bin/python benchmarks/ann.py                    # 1M items x 128 (an hour to build)
    .venv/bin/python benchmarks/ann.py --cache /tmp/annx/cache --wait-load 1.5
    .venv/bin/python benchmarks/ann.py --items 100000     # a quick run

Builds `funnelrec.ann.index.ItemIndex` indexes (exact, hnsw, hnsw_sq, ivf, ivfpq_fs; ivfpq with
--kinds) over synthetic item embeddings shaped like learned ones, then, for each efSearch
(hnsw*) or nprobe (ivf*), and each re-rank depth (hnsw_sq, ivfpq_fs), measures recall@k
against exact search on held-out queries (batched) and the latency of one query at a time
through `ItemIndex.search` (p50/p99 of wall time, and of the thread's CPU time, which
other jobs on the cores inflate less), one thread, with exact search measured the same
way in the same run. hnsw_sq takes the graph of this run's hnsw index
(`ItemIndex.to_hnsw_sq`, same M and efConstruction): its build time is the graph's plus
the encoding. Writes benchmarks/results/ann.json and benchmarks/results/ann_recall_latency.png
and prints a table.

The machine is shared: `--wait-load L` holds each latency measurement until the 1-minute
load average is at most L (this process counts for ~1), and every row records the load
it was measured at.

The data: a mixture of `items / 500` Gaussian clusters ("topics"; 2000 at 1M items) with
heavy-tailed (Pareto) sizes; each item is its cluster's unit direction plus isotropic noise
of norm 0.8-1.5 (per cluster; item-to-centre cosine ~0.55-0.8), normalised, then scaled by
a log-normal norm (sigma 0.2) because the model scores by dot product, so norms matter.
Queries (user vectors) come from the same process: a point of one topic, chosen by topic
size, plus 0.3 of a second topic's direction. Held out: no query is an indexed item.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from funnelrec.ann.index import RERANKED, IndexParams, ItemIndex, Kind

RESULTS = Path(__file__).parent / "results"
EF_SEARCH = (100, 128, 160, 200, 256, 320, 400, 512)  # hnsw searches at least k deep
NPROBE = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SQ_EF_SEARCH = (200, 256, 320, 400, 512)  # hnsw_sq fetches rerank * k, so efSearch >= that
FS_NPROBE = (64, 80, 96, 112, 128, 144, 160, 192)
GOAL_P99_MS, GOAL_RECALL = 1.0, 0.95


def clustered_embeddings(
    items: int, dim: int, queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(items [N, dim], queries [Q, dim]) float32, as described in the module docstring."""
    rng = np.random.default_rng(seed)
    n_clusters = max(16, items // 500)
    weight = rng.pareto(1.2, n_clusters) + 1.0  # heavy-tailed topic sizes
    weight /= weight.sum()
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.8, 1.5, n_clusters).astype(np.float32)

    def around(topic: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(topic), dim)).astype(np.float32)
        v = centres[topic] + noise * (spread[topic, None] / np.sqrt(dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x = np.empty((items, dim), dtype=np.float32)
    for lo in range(0, items, 200_000):  # in chunks: the noise matrix is as big as x
        hi = min(items, lo + 200_000)
        x[lo:hi] = around(rng.choice(n_clusters, size=hi - lo, p=weight))
        x[lo:hi] *= rng.lognormal(0.0, 0.2, (hi - lo, 1)).astype(np.float32)
    first = rng.choice(n_clusters, size=queries, p=weight)
    second = rng.choice(n_clusters, size=queries, p=weight)
    q = around(first) + 0.3 * centres[second]
    q *= rng.lognormal(1.0, 0.3, (queries, 1)).astype(np.float32)
    return x, q.astype(np.float32)


def rss_mib() -> float:
    """Resident memory of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(got, truth, strict=True)]))


def wait_for_load(limit: float | None, max_wait: float) -> float:
    """Sleep until the 1-minute load average is <= `limit` (or `max_wait` s); return it."""
    start = time.monotonic()
    while limit is not None and os.getloadavg()[0] > limit:
        if time.monotonic() - start > max_wait:
            print(f"  (load still {os.getloadavg()[0]:.1f} after {max_wait:.0f}s: measuring)")
            break
        time.sleep(10)
    return os.getloadavg()[0]


def latencies_ms(index: ItemIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(wall, thread CPU) time of `index.search(one query, k)` per query, ms, one thread."""
    threads, index.threads = index.threads, 1
    for q in queries[:20]:  # warm caches and the OpenMP pool
        index.search(q, k)
    wall = np.empty(len(queries))
    cpu = np.empty(len(queries))
    for i, q in enumerate(queries):
        c = time.thread_time_ns()
        t = time.perf_counter_ns()
        index.search(q, k)
        wall[i] = (time.perf_counter_ns() - t) / 1e6
        cpu[i] = (time.thread_time_ns() - c) / 1e6
    index.threads = threads
    return wall, cpu


def measure(
    index: ItemIndex,
    name: str,
    q_recall: np.ndarray,
    q_lat: np.ndarray,
    truth: np.ndarray,
    k: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    got, _ = index.search(q_recall, k)
    load = wait_for_load(args.wait_load, args.wait_max)
    wall, cpu = latencies_ms(index, q_lat, k)
    row = {
        "kind": index.kind,
        "setting": name,
        "recall": recall_at_k(got, truth),
        "p50_ms": float(np.percentile(wall, 50)),
        "p99_ms": float(np.percentile(wall, 99)),
        "mean_ms": float(wall.mean()),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
        "latency_queries": len(q_lat),
        "load_1min": [load, os.getloadavg()[0]],  # before and after the timed queries
        "scan": index.scan_implementation,
    }
    if index.kind in RERANKED:
        row["rerank"] = index.params.rerank
    print(
        f"  {index.kind:8s} {name:22s} recall@{k} {row['recall']:.4f}  "
        f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
        f"(cpu {row['cpu_p50_ms']:.3f} / {row['cpu_p99_ms']:.3f})  load {load:.1f}",
        flush=True,
    )
    return row


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """The data and query options (shared with ann_settings.py)."""
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    ap.add_argument("--latency-queries", type=int, default=1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--exact-latency-queries", type=int, default=200)
    ap.add_argument(
        "--kinds", default="hnsw,hnsw_sq,ivf,ivfpq_fs", help="comma list of approximate kinds"
    )
    ap.add_argument("--hnsw-m", type=int, default=IndexParams.hnsw_m)
    ap.add_argument("--ef-construction", type=int, default=IndexParams.ef_construction)
    ap.add_argument("--ef-search", default=",".join(map(str, EF_SEARCH)))
    ap.add_argument("--sq-ef-search", default=",".join(map(str, SQ_EF_SEARCH)))
    ap.add_argument("--sq-type", default="sq8", help="hnsw_sq codes: sq8 or fp16")
    ap.add_argument("--sq-rerank", default="1,2", help="hnsw_sq re-rank depths (x k)")
    ap.add_argument(
        "--nlist", type=int, default=0, help="0 = 4 sqrt(N), ivfpq_fs 2 sqrt(N) (power of two)"
    )
    ap.add_argument("--nprobe", default=",".join(map(str, NPROBE)))
    ap.add_argument("--fs-nprobe", default=",".join(map(str, FS_NPROBE)))
    ap.add_argument("--fs-rerank", default="4,6,8", help="ivfpq_fs re-rank depths (x k)")
    ap.add_argument("--threads", type=int, default=2, help="build and batched-search threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep built indexes here and reuse them (same data, seed and params): "
        "re-measures search without rebuilding; build time is the original build's",
    )
    ap.add_argument(
        "--wait-load",
        type=float,
        default=None,
        help="before each latency measurement, wait until the 1-min load average <= this",
    )
    ap.add_argument("--wait-max", type=float, default=900.0, help="longest wait (s)")
    args = ap.parse_args(argv)
    k = args.k
    kinds = [cast(Kind, s) for s in args.kinds.split(",") if s]
    params = IndexParams(
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        nlist=args.nlist,
        sq_type=args.sq_type,
    )

    t0 = time.perf_counter()
    x, q = clustered_embeddings(
        args.items, args.dim, args.queries + args.latency_queries, args.seed
    )
    q_recall, q_lat = q[: args.queries], q[args.queries :]
    ids = np.arange(args.items, dtype=np.int64)
    print(f"data: {args.items:,} x {args.dim} in {time.perf_counter() - t0:.1f}s", flush=True)

    results: dict[str, Any] = {
        "items": args.items,
        "dim": args.dim,
        "k": k,
        "queries": args.queries,
        "machine": {
            "cpus": faiss.omp_get_max_threads(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "faiss": faiss.__version__,
        },
        "build": {},
        "rows": [],
        # Other jobs on the shared cores inflate latency tails: keep the load beside them.
        "load_average_start": os.getloadavg(),
        "wait_load": args.wait_load,
    }

    rss0 = rss_mib()
    exact = ItemIndex.build(x, ids, "exact", threads=args.threads)
    truth, _ = exact.search(q_recall, k)
    results["build"]["exact"] = {"seconds": exact.build_seconds, "rss_mib": rss_mib() - rss0}
    q_exact = q_lat[: args.exact_latency_queries]
    results["rows"].append(measure(exact, "-", q_recall[:1], q_exact, truth[:1], k, args))
    del exact
    gc.collect()

    hnsw: ItemIndex | None = None  # kept for hnsw_sq, which reuses its graph
    for kind in kinds:
        rss0 = rss_mib()
        if kind == "hnsw_sq" and hnsw is not None:
            index, how = hnsw_sq_from(hnsw, params, args)
        else:
            index, how = build_or_load(x, ids, kind, params, args)
        build = {
            "seconds": index.build_seconds,
            "rss_mib": rss_mib() - rss0,
            "params": index.params.for_kind(kind),
            "how": how,
        }
        saved = cache_dir(kind, params, args)
        if saved is not None and (saved / "index.faiss").exists():  # vectors, graph/lists, ids
            build["file_mib"] = (saved / "index.faiss").stat().st_size / 2**20
        results["build"][kind] = build
        print(f"{kind}: built in {build['seconds']:.1f}s, +{build['rss_mib']:.0f} MiB", flush=True)
        index.threads = args.threads
        for name, setting in settings(index, args):
            index.params = setting
            results["rows"].append(measure(index, name, q_recall, q_lat, truth, k, args))
        if kind == "hnsw" and "hnsw_sq" in kinds:
            hnsw = index
        del index
        if kind == "hnsw_sq":
            hnsw = None
        gc.collect()

    results["load_average_end"] = os.getloadavg()
    results["best"] = best_setting(results["rows"])
    results["pareto"] = pareto(results["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ann.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "ann_recall_latency.png")
    print_table(results)
    return 0


def settings(index: ItemIndex, args: argparse.Namespace) -> list[tuple[str, IndexParams]]:
    """(label, params) for each search setting of the benchmark for this index's kind."""
    p = index.params
    if index.kind == "hnsw":
        return [(f"efSearch={ef}", replace(p, ef_search=ef)) for ef in ints(args.ef_search)]
    if index.kind == "hnsw_sq":
        return [
            (f"efSearch={ef} rerank={r:g}", replace(p, ef_search=ef, rerank=r))
            for r in floats(args.sq_rerank)
            for ef in ints(args.sq_ef_search)
        ]
    if index.kind == "ivfpq_fs":
        return [
            (f"nprobe={n} rerank={r:g}", replace(p, nprobe=n, rerank=r))
            for r in floats(args.fs_rerank)
            for n in ints(args.fs_nprobe)
            if n <= p.nlist
        ]
    return [(f"nprobe={n}", replace(p, nprobe=n)) for n in ints(args.nprobe) if n <= p.nlist]


def cache_dir(kind: Kind, params: IndexParams, args: argparse.Namespace) -> Path | None:
    """Where --cache keeps the index of `kind` built from these data and build params."""
    if args.cache is None:
        return None
    fields = params.resolved(kind, args.items, args.dim).for_kind(kind)
    if kind in RERANKED:  # search-time settings do not change what is built
        search = ("ef_search", "nprobe", "rerank")
        fields = {n: v for n, v in fields.items() if n not in search}
    key = f"{kind}-{args.items}x{args.dim}-seed{args.seed}-" + "-".join(
        f"{n}{v}" for n, v in fields.items()
    )
    return Path(args.cache) / key


def build_or_load(
    x: np.ndarray, ids: np.ndarray, kind: Kind, params: IndexParams, args: argparse.Namespace
) -> tuple[ItemIndex, str]:
    """The index, built or loaded from --cache when an identical build is kept there."""
    cached = cache_dir(kind, params, args)
    if cached is not None and cached.exists():
        print(f"{kind}: loading the index built earlier from {cached}", flush=True)
        index = ItemIndex.load(cached, expected_dim=args.dim, expected_item_ids=ids)
        return index, "loaded from --cache: build seconds are the earlier build's"
    index = ItemIndex.build(x, ids, kind, params, threads=args.threads, progress=True)
    if cached is not None:
        index.save(cached)
    return index, "built in this run"


def hnsw_sq_from(
    hnsw: ItemIndex, params: IndexParams, args: argparse.Namespace
) -> tuple[ItemIndex, str]:
    """hnsw_sq over the graph of this run's hnsw index (or its --cache copy)."""
    cached = cache_dir("hnsw_sq", params, args)
    how = "the hnsw graph of this run, re-encoded (ItemIndex.to_hnsw_sq): seconds = graph + codes"
    if cached is not None and cached.exists():
        print(f"hnsw_sq: loading the index made earlier from {cached}", flush=True)
        index = ItemIndex.load(cached, expected_dim=args.dim, expected_item_ids=hnsw.item_ids)
        return index, "loaded from --cache; " + how
    index = hnsw.to_hnsw_sq(params.sq_type)
    if cached is not None:
        index.save(cached)
    return index, how


def best_setting(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest (p99) approximate setting meeting the recall goal, else the best recall."""
    approx = [r for r in rows if r["kind"] != "exact"]
    if not approx:
        return {}
    meeting = [r for r in approx if r["recall"] >= GOAL_RECALL]
    pick = (
        min(meeting, key=lambda r: r["p99_ms"])
        if meeting
        else max(approx, key=lambda r: r["recall"])
    )
    goal_met = pick["recall"] >= GOAL_RECALL and pick["p99_ms"] <= GOAL_P99_MS
    return {
        **pick,
        "goal": f"p99 <= {GOAL_P99_MS} ms at recall@k >= {GOAL_RECALL}",
        "goal_met": goal_met,
    }


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Approximate settings no other setting beats on both recall and p99 latency."""
    approx = sorted((r for r in rows if r["kind"] != "exact"), key=lambda r: r["p99_ms"])
    front: list[dict[str, Any]] = []
    for r in approx:
        if not front or r["recall"] > front[-1]["recall"]:
            front.append({n: r[n] for n in ("kind", "setting", "recall", "p50_ms", "p99_ms")})
    return front


def print_table(results: dict[str, Any]) -> None:
    console = Console()
    table = Table(
        title=f"ANN: {results['items']:,} items x {results['dim']}, "
        f"recall@{results['k']} vs exact, single-query latency (1 thread)"
    )
    cols = ("kind", "setting", "recall", "p50 ms", "p99 ms", "cpu p50", "cpu p99", "load")
    for col in (*cols, "build s", "build MiB"):
        table.add_column(col, justify="right" if col not in ("kind", "setting") else "left")
    for r in results["rows"]:
        b = results["build"][r["kind"]]
        table.add_row(
            r["kind"],
            r["setting"],
            "1 (reference)" if r["kind"] == "exact" else f"{r['recall']:.4f}",
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['cpu_p50_ms']:.3f}",
            f"{r['cpu_p99_ms']:.3f}",
            f"{r['load_1min'][0]:.1f}",
            f"{b['seconds']:.1f}",
            f"{b['rss_mib']:.0f}",
        )
    console.print(table)
    console.print(
        "load average (1, 5, 15 min) at start "
        + ", ".join(f"{v:.1f}" for v in results["load_average_start"])
        + "; at end "
        + ", ".join(f"{v:.1f}" for v in results["load_average_end"])
    )
    best = results["best"]
    if best:
        verdict = "met" if best["goal_met"] else "NOT met"
        console.print(
            f"goal ({best['goal']}): {verdict}; best: {best['kind']} {best['setting']} "
            f"recall {best['recall']:.4f}, p50 {best['p50_ms']:.3f} ms, p99 {best['p99_ms']:.3f} ms"
        )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"hnsw": "o", "hnsw_sq": "D", "ivf": "s", "ivfpq": "^", "ivfpq_fs": "v"}
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results["rows"]:
        if r["kind"] != "exact":
            label = r["kind"] + (f" rerank={r['rerank']:g}" if "rerank" in r else "")
            label += " (FAISS scan)" if r["kind"] == "ivfpq_fs" and r.get("scan") == "FAISS" else ""
            series.setdefault(label, []).append(r)
    for i, (label, rows) in enumerate(series.items()):
        marker = markers.get(rows[0]["kind"], "x")
        recall = [r["recall"] for r in rows]
        ax.plot([r["p99_ms"] for r in rows], recall, marker=marker, color=f"C{i}", label=label)
        ax.plot(
            [r["p50_ms"] for r in rows],
            recall,
            marker=marker,
            color=f"C{i}",
            linestyle=":",
            alpha=0.4,
            markersize=4,
        )
    exact = [r for r in results["rows"] if r["kind"] == "exact"]
    if exact:
        ax.plot([exact[0]["p99_ms"]], [1.0], "k*", markersize=12, label="exact p99")
        ax.plot([exact[0]["p50_ms"]], [1.0], "k*", markersize=8, alpha=0.4)
    ax.axhline(GOAL_RECALL, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(GOAL_P99_MS, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency, ms (log): p99 solid, p50 dotted")
    ax.set_ylabel(f"recall@{results['k']} vs exact")
    ax.set_ylim(max(0.0, min([r["recall"] for r in results["rows"]] + [0.9]) - 0.02), 1.005)
    ax.set_title(f"{results['items']:,} items x {results['dim']} (goal: upper left of the dashes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
