"""ANN retrieval benchmark: recall@k vs exact and single-query latency, per search setting.

    .venv/bin/python benchmarks/ann.py                    # 1M items x 128 (minutes)
    .venv/bin/python benchmarks/ann.py --items 100000     # a quick run

Builds `funnelrec.ann.ItemIndex` indexes (exact, hnsw, ivf; ivfpq with --kinds) over
synthetic item embeddings shaped like learned ones, then, for each efSearch (hnsw) or
nprobe (ivf*), measures recall@k against exact search on held-out queries (batched) and
the latency of one query at a time through `ItemIndex.search` (p50/p99, one thread), with
exact search measured the same way in the same run. Writes benchmarks/results/ann.json and
benchmarks/results/ann_recall_latency.png and prints a table.

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
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from funnelrec.ann import IndexParams, ItemIndex, Kind

RESULTS = Path(__file__).parent / "results"
EF_SEARCH = (100, 128, 160, 200, 256, 320, 400, 512)  # hnsw searches at least k deep
NPROBE = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
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


def latencies_ms(index: ItemIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Wall time of `index.search(one query, k)` for each query, one thread, in ms."""
    threads, index.threads = index.threads, 1
    for q in queries[:20]:  # warm caches and the OpenMP pool
        index.search(q, k)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        index.search(q, k)
        out[i] = (time.perf_counter() - t) * 1000
    index.threads = threads
    return out


def measure(
    index: ItemIndex, name: str, q_recall: np.ndarray, q_lat: np.ndarray, truth: np.ndarray, k: int
) -> dict[str, Any]:
    got, _ = index.search(q_recall, k)
    lat = latencies_ms(index, q_lat, k)
    row = {
        "kind": index.kind,
        "setting": name,
        "recall": recall_at_k(got, truth),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
        "latency_queries": len(q_lat),
    }
    print(
        f"  {index.kind:6s} {name:14s} recall@{k} {row['recall']:.4f}  "
        f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    ap.add_argument("--latency-queries", type=int, default=1000)
    ap.add_argument("--exact-latency-queries", type=int, default=200)
    ap.add_argument("--kinds", default="hnsw,ivf", help="comma list of hnsw, ivf, ivfpq")
    ap.add_argument("--hnsw-m", type=int, default=IndexParams.hnsw_m)
    ap.add_argument("--ef-construction", type=int, default=IndexParams.ef_construction)
    ap.add_argument("--ef-search", default=",".join(map(str, EF_SEARCH)))
    ap.add_argument("--nlist", type=int, default=0, help="0 = 4 sqrt(N) (power of two)")
    ap.add_argument("--nprobe", default=",".join(map(str, NPROBE)))
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
    args = ap.parse_args(argv)
    k = args.k
    kinds: list[Kind] = [s for s in args.kinds.split(",") if s]  # type: ignore[misc]
    params = IndexParams(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist)

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
    }

    rss0 = rss_mib()
    exact = ItemIndex.build(x, ids, "exact", threads=args.threads)
    truth, _ = exact.search(q_recall, k)
    results["build"]["exact"] = {"seconds": exact.build_seconds, "rss_mib": rss_mib() - rss0}
    q_exact = q_lat[: args.exact_latency_queries]
    results["rows"].append(measure(exact, "-", q_recall[:1], q_exact, truth[:1], k))
    del exact
    gc.collect()

    for kind in kinds:
        rss0 = rss_mib()
        index, loaded = build_or_load(x, ids, kind, params, args)
        build = {
            "seconds": index.build_seconds,
            "rss_mib": rss_mib() - rss0,
            "params": index.params.for_kind(kind),
            "rss_is_of": "loading the saved index" if loaded else "the build",
            "seconds_from": "the earlier run that built the cached index" if loaded else "this run",
        }
        if args.cache is not None:  # the saved index.faiss: vectors + graph / lists + ids
            saved = next(args.cache.glob(f"{kind}-{args.items}x{args.dim}-seed{args.seed}-*"))
            build["file_mib"] = (saved / "index.faiss").stat().st_size / 2**20
        results["build"][kind] = build
        print(f"{kind}: built in {build['seconds']:.1f}s, +{build['rss_mib']:.0f} MiB", flush=True)
        index.threads = args.threads
        if kind == "hnsw":
            for ef in map(int, args.ef_search.split(",")):
                index.set_search_params(ef_search=ef)
                results["rows"].append(measure(index, f"efSearch={ef}", q_recall, q_lat, truth, k))
        else:
            for nprobe in map(int, args.nprobe.split(",")):
                if nprobe > index.params.nlist:
                    continue
                index.set_search_params(nprobe=nprobe)
                row = measure(index, f"nprobe={nprobe}", q_recall, q_lat, truth, k)
                results["rows"].append(row)
        del index
        gc.collect()

    results["load_average_end"] = os.getloadavg()
    results["best"] = best_setting(results["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ann.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "ann_recall_latency.png")
    print_table(results)
    return 0


def build_or_load(
    x: np.ndarray, ids: np.ndarray, kind: Kind, params: IndexParams, args: argparse.Namespace
) -> tuple[ItemIndex, bool]:
    """Build the index, or load it from --cache when an identical build is kept there."""
    key = f"{kind}-{args.items}x{args.dim}-seed{args.seed}-" + "-".join(
        f"{n}{v}" for n, v in params.resolved(kind, args.items, args.dim).for_kind(kind).items()
    )
    cached = args.cache / key if args.cache else None
    if cached is not None and cached.exists():
        print(f"{kind}: loading the index built earlier from {cached}", flush=True)
        return ItemIndex.load(cached, expected_dim=args.dim, expected_item_ids=ids), True
    index = ItemIndex.build(x, ids, kind, params, threads=args.threads, progress=True)
    if cached is not None:
        index.save(cached)
    return index, False


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


def print_table(results: dict[str, Any]) -> None:
    console = Console()
    table = Table(
        title=f"ANN: {results['items']:,} items x {results['dim']}, "
        f"recall@{results['k']} vs exact, single-query latency (1 thread)"
    )
    for col in ("kind", "setting", "recall", "p50 ms", "p99 ms", "build s", "build MiB"):
        table.add_column(col, justify="right" if col not in ("kind", "setting") else "left")
    for r in results["rows"]:
        b = results["build"][r["kind"]]
        table.add_row(
            r["kind"],
            r["setting"],
            "1 (reference)" if r["kind"] == "exact" else f"{r['recall']:.4f}",
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
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

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (kind, marker) in enumerate((("hnsw", "o"), ("ivf", "s"), ("ivfpq", "^"))):
        rows = [r for r in results["rows"] if r["kind"] == kind]
        recall = [r["recall"] for r in rows]
        if rows:
            p99 = [r["p99_ms"] for r in rows]
            ax.plot(p99, recall, marker=marker, color=f"C{i}", label=f"{kind} p99")
            p50 = [r["p50_ms"] for r in rows]
            ax.plot(
                p50,
                recall,
                marker=marker,
                color=f"C{i}",
                linestyle=":",
                alpha=0.5,
                label=f"{kind} p50",
            )
    exact = [r for r in results["rows"] if r["kind"] == "exact"]
    if exact:
        ax.plot([exact[0]["p99_ms"]], [1.0], "k*", markersize=12, label="exact p99")
        ax.plot([exact[0]["p50_ms"]], [1.0], "k*", markersize=8, alpha=0.4, label="exact p50")
    ax.axhline(GOAL_RECALL, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(GOAL_P99_MS, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency (ms, log scale)")
    ax.set_ylabel(f"recall@{results['k']} vs exact")
    ax.set_title(f"{results['items']:,} items x {results['dim']} (goal: upper left of the dashes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
