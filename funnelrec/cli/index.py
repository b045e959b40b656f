"""`funnelrec index ...`: build and benchmark the ANN index of a candidate model artifact.

funnelrec index build ART                       # kind by corpus size, tuned to recall 0.95
funnelrec index build ART --kind ivf --nlist 1024 --target-recall 0.98 --force
funnelrec index build ART --kind hnsw --ef-search 256 --target-recall 0   # no tuning
funnelrec index build ART --kind hnsw_sq --rerank 2 --force   # 8-bit graph search + re-rank
funnelrec index bench ART                       # recall and latency per efSearch/nprobe

The index is built over ART/item_embeddings.safetensors and saved in ART/index/. Its
recall is measured against exact search on real queries: the user vectors of the
validation split of the features the model was trained on (`--features` to point
elsewhere), so the number in ART/index/index.json says how the index does for this model.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from funnelrec.ann.index import KINDS, RERANKED, SQ_TYPES, IndexParams, ItemIndex
from funnelrec.candidates import (
    INDEX_DIR,
    load_item_embeddings,
    read_candidate_config,
    split_user_vectors,
)
from funnelrec.errors import FunnelrecError

app = typer.Typer(
    help="Build and benchmark the nearest-neighbour index over item embeddings.",
    no_args_is_help=True,
)
console = Console()

ART = typer.Argument(..., help="Candidate model artifact directory (from `train candidates`).")
FEATURES = typer.Option(
    None, "--features", "-f", help="Features directory (default: the one trained on)."
)
SPLIT = typer.Option("valid", help="Split whose user vectors are the held-out queries.")
QUERIES = typer.Option(2000, help="Held-out queries used at most (a seeded sample).")
QUERY_POOL = 20  # the sample is drawn from the split's first QUERY_POOL x queries examples
K = typer.Option(100, "--k", help="Recall is measured at this k.")
THREADS = typer.Option(None, help="FAISS threads (default: all cores).")


@app.command("build")
def build(
    art: Path = ART,
    kind: str | None = typer.Option(
        None, help=f"One of {', '.join(KINDS)} (default: exact up to 50k items, else ivfpq_fs)."
    ),
    hnsw_m: int = typer.Option(IndexParams.hnsw_m, help="hnsw*: links per node."),
    ef_construction: int = typer.Option(IndexParams.ef_construction, help="hnsw*: build depth."),
    ef_search: int | None = typer.Option(None, help="hnsw*: search depth (fixes it: no tuning)."),
    sq_type: str = typer.Option(
        IndexParams.sq_type, help=f"hnsw_sq: codes searched, one of {', '.join(SQ_TYPES)}."
    ),
    rerank: float = typer.Option(
        0.0,
        help=f"{', '.join(RERANKED)}: candidates re-scored exactly, x k (0 = the kind's default).",
    ),
    nlist: int = typer.Option(0, help="ivf*: buckets (0 = 4 sqrt(N), ivfpq_fs 2 sqrt(N))."),
    nprobe: int | None = typer.Option(None, help="ivf*: buckets searched (no tuning)."),
    pq_m: int = typer.Option(0, help="ivfpq: sub-quantizers (0 = d/8; ivfpq_fs: d/2)."),
    pq_bits: int = typer.Option(IndexParams.pq_bits, help="ivfpq: bits per code."),
    target_recall: float = typer.Option(
        0.95, help="Tune efSearch/nprobe to the smallest value reaching this recall@k (0: off)."
    ),
    features: Path | None = FEATURES,
    split: str = SPLIT,
    queries: int = QUERIES,
    k: int = K,
    threads: int | None = THREADS,
    force: bool = typer.Option(False, "--force", help="Replace an existing ART/index."),
) -> None:
    """Build the index over ART's item embeddings, measure its recall, save it in ART/index."""
    if kind is not None and kind not in KINDS:
        raise FunnelrecError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    out = art / INDEX_DIR
    if out.exists() and not force:
        raise FunnelrecError(f"{out} already exists (use --force to rebuild it)")
    emb, ids = _embeddings(art)
    q = _queries(art, features, split, queries)
    params = IndexParams(
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search or IndexParams.ef_search,
        nlist=nlist,
        nprobe=nprobe or IndexParams.nprobe,
        pq_m=pq_m,
        pq_bits=pq_bits,
        sq_type=sq_type,
        rerank=rerank,
    )
    index = ItemIndex.build(emb, ids, kind, params, threads=threads, progress=True)
    console.print(
        f"built {index.kind} index over {index.count:,} items x {index.dim} "
        f"in {index.build_seconds:.1f}s (searched by {index.scan_implementation})"
    )
    source = f"{split} user vectors ({len(q)})"
    fixed = ef_search is not None if index.kind.startswith("hnsw") else nprobe is not None
    if target_recall > 0 and not fixed:
        recall = index.tune(q, k, target_recall, embeddings=emb, query_source=source)
    else:
        recall = index.recall_vs_exact(q, k, embeddings=emb, query_source=source)
    index.save(out, force=force)
    knob = ", ".join(f"{n}={v}" for n, v in (index.recall or {}).get("search_params", {}).items())
    console.print(
        f"recall@{min(k, index.count)} vs exact on {source}: {recall:.4f}"
        + (f" at {knob}" if knob else "")
    )
    if target_recall > 0 and recall < target_recall:
        console.print(f"[yellow]below the target {target_recall}: try larger build params")
    console.print(f"wrote {out}")


@app.command("bench")
def bench(
    art: Path = ART,
    features: Path | None = FEATURES,
    split: str = SPLIT,
    queries: int = QUERIES,
    latency_queries: int = typer.Option(500, help="Queries timed one at a time."),
    k: int = K,
    values: str | None = typer.Option(
        None, help="Comma list of efSearch (hnsw*) or nprobe (ivf*) values to sweep."
    ),
) -> None:
    """Recall@k vs exact and single-query p50/p99 latency of ART/index per search setting."""
    emb, ids = _embeddings(art)
    index = ItemIndex.load(
        art / INDEX_DIR, expected_dim=emb.shape[1], expected_item_ids=ids, threads=1
    )
    q = _queries(art, features, split, queries)
    exact = ItemIndex.build(emb, ids, "exact", threads=1)
    k = min(k, index.count)
    truth, _ = exact.search(q, k)
    q_lat = q[:latency_queries]
    table = Table(
        title=f"{art / INDEX_DIR}: {index.kind} ({index.scan_implementation}), "
        f"{index.count:,} items x {index.dim}, recall@{k} vs exact on {len(q)} {split} "
        "user vectors, 1 thread"
    )
    for col in ("setting", "recall", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    p50, p99 = _latency(exact, q_lat, k)
    table.add_row("exact", "1", f"{p50:.3f}", f"{p99:.3f}")
    saved = index.params
    for name, setting in _settings(index, values):
        index.params = setting
        got, _ = index.search(q, k)
        recall = float(
            np.mean([len(np.intersect1d(g, t)) for g, t in zip(got, truth, strict=True)]) / k
        )
        p50, p99 = _latency(index, q_lat, k)
        mark = " (saved)" if setting == saved else ""
        table.add_row(name + mark, f"{recall:.4f}", f"{p50:.3f}", f"{p99:.3f}")
    console.print(table)


def _embeddings(art: Path) -> tuple[np.ndarray, np.ndarray]:
    emb, ids = load_item_embeddings(art)
    return emb.numpy().astype(np.float32, copy=False), ids.numpy().astype(np.int64, copy=False)


def _queries(art: Path, features: Path | None, split: str, limit: int) -> np.ndarray:
    """Up to `limit` user vectors [Q, d] of the split (a seeded sample of its first
    QUERY_POOL x limit examples), the held-out queries."""
    meta = read_candidate_config(art)
    feat = features or meta.get("data", {}).get("features")
    if feat is None:
        raise FunnelrecError(f"{art}: no features directory recorded; pass --features")
    with console.status(f"user vectors of the {split} split"):
        # A seeded sample of the split's first examples (20 per query wanted): computing
        # every user vector of a large split takes minutes and gigabytes.
        vectors = split_user_vectors(art, feat, split, limit=QUERY_POOL * limit).vectors.numpy()
    if len(vectors) == 0:
        raise FunnelrecError(f"{feat}: the {split} split has no examples to use as queries")
    if len(vectors) > limit:
        rng = np.random.default_rng(0)
        vectors = vectors[np.sort(rng.choice(len(vectors), limit, replace=False))]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _settings(index: ItemIndex, values: str | None) -> list[tuple[str, IndexParams]]:
    """(label, params) per value of the kind's search knob; exact has none."""
    if index.kind == "exact":
        return [("exact index", index.params)]
    knob = "ef_search" if index.kind.startswith("hnsw") else "nprobe"
    current = getattr(index.params, knob)
    if values:
        chosen = sorted({int(v) for v in values.split(",")})
    else:
        chosen = sorted(
            {max(1, current // 4), max(1, current // 2), current, 2 * current, 4 * current}
        )
    if knob == "nprobe":
        chosen = sorted({min(v, index.params.nlist) for v in chosen})
    out: list[tuple[str, IndexParams]] = []
    for v in chosen:
        fields: dict[str, Any] = {knob: v}
        rerank = f" rerank={index.params.rerank:g}" if index.kind in RERANKED else ""
        out.append((f"{knob}={v}{rerank}", replace(index.params, **fields)))
    return out


def _latency(index: ItemIndex, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 (ms) of `index.search` on one query at a time."""
    for q in queries[:10]:
        index.search(q, k)
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        index.search(q, k)
        times[i] = (time.perf_counter() - t) * 1000
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))
