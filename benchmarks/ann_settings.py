"""Single-query latency of chosen ANN index settings, timed in turns, query by query.

    .venv/bin/python benchmarks/ann_settings.py --cache /tmp/annx/cache
    .venv/bin/python benchmarks/ann_settings.py --items 100000 \
        --setting nlist=1024,nprobe=64,rerank=6 --setting nlist=512,nprobe=32,rerank=6

`benchmarks/ann.py` measures one setting after another, 1000 queries each; on a machine
whose cache and memory bandwidth are shared with other tenants, a setting timed in a slow
minute then looks worse than one timed in a fast minute. Here the settings take turns,
one query each, so the host's slow and fast minutes fall on all settings alike and their
ratios can be trusted even when the absolute figures move. Each setting answers every
query once, but never right after a search of the same query, whose buckets and rows
would then still be in cache and flatter the second setting of an index (docs/ann.md,
"Bucket count").

Each `--setting` is an ivfpq_fs index (nlist, built once; `--cache` as in ann.py, whose
cache it shares) searched with the given nprobe and rerank, through funnelrec's scan
kernel (`scan=kernel`, the default where it is built) or FAISS's own search
(`scan=faiss`). The data and queries are ann.py's (`clustered_embeddings`, same seed):
recall@k against exact search on the first `--queries` queries, latency (one thread,
`ItemIndex.search` of one query) on the rest. The default settings compare the kernel
with FAISS at 1M items (docs/ann.md, "The scan kernel"). Writes
benchmarks/results/ann_settings.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from ann import (
    GOAL_P99_MS,
    GOAL_RECALL,
    add_data_arguments,
    build_or_load,
    clustered_embeddings,
    recall_at_k,
)
from rich.console import Console
from rich.table import Table

from funnelrec.ann.index import IndexParams, ItemIndex, SearchOptions

RESULTS = Path(__file__).parent / "results"
DEFAULT_SETTINGS = (
    "nlist=2048,nprobe=112,rerank=6,scan=faiss",
    "nlist=2048,nprobe=112,rerank=6",
    "nlist=2048,nprobe=128,rerank=6",
    "nlist=2048,nprobe=96,rerank=8",
)
SCANS = ("kernel", "faiss")


def parse_setting(text: str) -> dict[str, Any]:
    """'nlist=2048,nprobe=112,rerank=6[,scan=faiss]' -> {"nlist": 2048, "nprobe": 112,
    "rerank": 6.0, "scan": "faiss"} (scan "kernel" when not given)."""
    out: dict[str, Any] = {"scan": "kernel"}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in ("nlist", "nprobe", "rerank", "scan"):
            raise SystemExit(f"--setting {text!r}: expected nlist=N,nprobe=N,rerank=R[,scan=S]")
        if name == "scan" and value not in SCANS:
            raise SystemExit(f"--setting {text!r}: scan is one of {', '.join(SCANS)}")
        out[name] = value if name == "scan" else float(value)
    if not {"nlist", "nprobe", "rerank"} <= set(out):
        raise SystemExit(f"--setting {text!r}: nlist, nprobe and rerank are all needed")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_arguments(ap)
    ap.add_argument(
        "--setting", action="append", help="nlist=N,nprobe=N,rerank=R[,scan=faiss] (repeat)"
    )
    ap.add_argument("--threads", type=int, default=2, help="build and batched-search threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="as in ann.py (shared with it)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]

    x, q = clustered_embeddings(
        args.items, args.dim, args.queries + args.latency_queries, args.seed
    )
    q_recall, q_lat = q[: args.queries], q[args.queries :]
    ids = np.arange(args.items, dtype=np.int64)
    faiss.omp_set_num_threads(args.threads)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    _, truth = flat.search(q_recall, args.k)
    del flat

    indexes: dict[tuple[int, str], ItemIndex] = {}
    for s in settings:
        nlist = int(s["nlist"])
        if (nlist, "kernel") not in indexes:
            params = IndexParams(nlist=nlist)
            indexes[nlist, "kernel"], _ = build_or_load(x, ids, "ivfpq_fs", params, args)
        if s["scan"] == "faiss" and (nlist, "faiss") not in indexes:
            # the same FAISS index, searched by FAISS alone
            built = indexes[nlist, "kernel"]
            faiss_only = SearchOptions(scan_kernel=False)
            indexes[nlist, "faiss"] = ItemIndex(
                built._idmap, "ivfpq_fs", built.params, options=faiss_only
            )
    scans = {key: index.scan_implementation for key, index in indexes.items()}
    names = [
        f"nlist={s['nlist']:.0f} nprobe={s['nprobe']:.0f} rerank={s['rerank']:g} "
        f"[{scans[int(s['nlist']), s['scan']]}]"
        for s in settings
    ]

    def use(s: dict[str, Any]) -> ItemIndex:
        index = indexes[int(s["nlist"]), s["scan"]]
        index.params = dataclasses.replace(
            index.params, nprobe=int(s["nprobe"]), rerank=float(s["rerank"])
        )
        return index

    recall = []
    for s in settings:
        index = use(s)
        index.threads = args.threads
        got, _ = index.search(q_recall, args.k)
        recall.append(recall_at_k(got, truth))
    for index in indexes.values():
        index.threads = 1
    load_start = os.getloadavg()
    # Round i gives setting j the query (i + j * stride) mod n: every setting answers every
    # query once, and no search follows one of the same query (whose buckets and rows it
    # would find in cache: two settings of one index read mostly the same memory).
    n = len(q_lat)
    stride = max(1, n // len(settings))
    wall = np.empty((len(settings), n))
    for i in range(n):
        for j, s in enumerate(settings):
            index = use(s)
            query = q_lat[(i + j * stride) % n]
            t = time.perf_counter_ns()
            index.search(query, args.k)
            wall[j, i] = (time.perf_counter_ns() - t) / 1e6
    wall = wall[:, 20:]  # the first rounds warm caches and FAISS's thread pool

    rows = [
        {
            "setting": name,
            "recall": r,
            "p50_ms": float(np.percentile(w, 50)),
            "p99_ms": float(np.percentile(w, 99)),
            "mean_ms": float(w.mean()),
        }
        for name, r, w in zip(names, recall, wall, strict=True)
    ]
    results: dict[str, Any] = {
        "benchmark": "ann_settings",
        "items": args.items,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "latency_queries": int(wall.shape[1]),
        "kind": "ivfpq_fs",
        "goal": f"p99 <= {GOAL_P99_MS} ms at recall@k >= {GOAL_RECALL}",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ann_settings.json").write_text(json.dumps(results, indent=2) + "\n")

    table = Table(
        title=f"ivfpq_fs settings timed in turns: {args.items:,} x {args.dim}, one thread"
    )
    for col in ("setting", f"recall@{args.k}", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(
            r["setting"],
            f"{r['recall']:.4f}",
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['mean_ms']:.3f}",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
