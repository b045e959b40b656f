"""Benchmark: examples built per second and batches per second delivered by the loader.

    .venv/bin/python benchmarks/features.py --preset small
    .venv/bin/python benchmarks/features.py --preset medium --data /tmp/medium  # reuse a world

Simulates the preset's world (unless --data points at one), builds features with the
default config (leave-last-out, cap 30, history 50), and reads the training shards back
with shuffling at batch size 1,024. Goals: 10M examples in under 5 minutes on
2 cores (33k examples/s), and a loader that never bottlenecks training (it should deliver
batches far faster than a training step consumes them). Prints a table and writes
benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from funnelrec.data.dataset import Dataset
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import candidate_loader, ranking_loader

RESULTS = Path(__file__).parent / "results" / "features.json"


def _loader_rate(loader, max_batches: int) -> tuple[float, float, int, float]:  # type: ignore[no-untyped-def]
    """(batches/s, examples/s, batches, batches per CPU-second) over up to max_batches."""
    t0, c0 = time.perf_counter(), time.process_time()
    n_batches = n_examples = 0
    for batch in loader:
        n_batches += 1
        n_examples += len(batch)
        if n_batches >= max_batches:
            break
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return n_batches / dt, n_examples / dt, n_batches, n_batches / dc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--data", type=Path, help="an existing dataset (skips the simulation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="last", choices=["last", "time"])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--max-batches", type=int, default=2000)
    ap.add_argument("--keep", type=Path, help="keep the features directory here")
    args = ap.parse_args()
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="funnelrec-bench-features-"))
    try:
        data = args.data
        sim_s = None
        if data is None:
            from funnelrec.simulate import generate, preset_config

            data = work / "data"
            t0 = time.perf_counter()
            generate(preset_config(args.preset), seed=args.seed, out=data, preset=args.preset)
            sim_s = time.perf_counter() - t0
        feat_dir = args.keep or work / "feat"
        t0, c0 = time.perf_counter(), time.process_time()
        build_features(data, feat_dir, split=args.split, config=FeaturesConfig(), force=True)
        build_s = time.perf_counter() - t0
        build_cpu_s = time.process_time() - c0
        f = Features.open(feat_dir)
        counts = f.manifest["counts"]
        n_cand = sum(counts["candidates"].values())
        n_rank = sum(counts.get("ranking", {}).values())
        timing = f.manifest["timing"]

        loaders = {"candidates": candidate_loader(f, "train", args.batch_size, shuffle=True)}
        if f.has_ranking:
            loaders["ranking"] = ranking_loader(f, "train", args.batch_size, shuffle=True)
        rates = {name: _loader_rate(ld, args.max_batches) for name, ld in loaders.items()}

        sim_meta = Dataset.open(data).manifest.extra.get("simulator", {})
        result = {
            "preset": args.preset if args.data is None else sim_meta.get("preset"),
            "data": str(args.data) if args.data else None,
            "split": args.split,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "watches": f.manifest["data"],
            "simulate_s": sim_s,
            "build_s": build_s,
            "build_cpu_s": build_cpu_s,
            "load_average_1m": os.getloadavg()[0],
            "candidate_examples": n_cand,
            "ranking_examples": n_rank,
            "examples_per_s": (n_cand + n_rank) / build_s,
            "examples_per_cpu_s": (n_cand + n_rank) / build_cpu_s,
            "candidate_examples_per_s": timing["candidate_examples_per_s"],
            "ranking_examples_per_s": timing["ranking_examples_per_s"],
            "minutes_for_10M_examples": 1e7 / ((n_cand + n_rank) / build_s) / 60,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "batch_size": args.batch_size,
            "loader": {
                name: {
                    "batches_per_s": b,
                    "examples_per_s": e,
                    "batches": n,
                    "batches_per_cpu_s": c,
                }
                for name, (b, e, n, c) in rates.items()
            },
            "shard_mib": sum(p.stat().st_size for p in Path(feat_dir).rglob("*.parquet")) / 2**20,
        }
        result.pop("watches")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"features benchmark ({args.preset if args.data is None else args.data})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("examples built (candidates + ranking)", f"{n_cand:,} + {n_rank:,}")
    table.add_row("build time (read, fit, write)", f"{build_s:.1f} s wall, {build_cpu_s:.1f} s CPU")
    table.add_row("examples/s, whole build", f"{result['examples_per_s']:,.0f}")
    table.add_row("examples per CPU-second, whole build", f"{result['examples_per_cpu_s']:,.0f}")
    table.add_row(
        "candidate examples/s (example loop)", f"{timing['candidate_examples_per_s']:,.0f}"
    )
    if timing["ranking_examples_per_s"]:
        table.add_row(
            "ranking examples/s (example loop)", f"{timing['ranking_examples_per_s']:,.0f}"
        )
    table.add_row(
        "minutes for 10M examples (goal < 5), wall / CPU",
        f"{result['minutes_for_10M_examples']:.1f} / {1e7 / result['examples_per_cpu_s'] / 60:.1f}",
    )
    table.add_row("peak RSS", f"{result['peak_rss_gib']:.2f} GiB")
    table.add_row("shards on disk", f"{result['shard_mib']:.0f} MiB")
    for name, (b, e, _, c) in rates.items():
        table.add_row(
            f"loader {name}, batch {args.batch_size}",
            f"{b:,.0f} batches/s ({e:,.0f} ex/s; {c:,.0f} per CPU-s)",
        )
    table.add_row("load average (1 min) at the end", f"{result['load_average_1m']:.1f}")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
