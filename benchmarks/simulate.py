"""Benchmark: time and peak memory of `funnelrec simulate` per preset.

    .venv/bin/python benchmarks/simulate.py                       # small and medium
    .venv/bin/python benchmarks/simulate.py --presets small
    .venv/bin/python benchmarks/simulate.py --presets large --days 2 4   # memory vs days

Each run is a fresh child process (so its peak RSS is its own) that simulates the preset
into a temporary directory, deleted afterwards. `--days` runs the preset once per value
with the window shortened to that many days: with memory bounded per block of users, the
peak must stay flat as the days (and events) grow. Reports wall and CPU seconds, watches
per second, peak RSS and the size on disk. Prints a table and writes
benchmarks/results/simulate.json (runs of other presets or days already there are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "simulate.json"


def child(preset: str, seed: int, overrides: list[str], out: Path) -> dict[str, Any]:
    """Runs inside the child process: simulate, then report counts, times and peak RSS."""
    from funnelrec.simulate import generate, preset_config

    t0, c0 = time.perf_counter(), time.process_time()
    result = generate(preset_config(preset, overrides), seed, out, preset=preset, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "preset": preset,
        "overrides": overrides,
        "seed": seed,
        "counts": result.counts,
        "wall_s": wall,
        "cpu_s": cpu,
        "watches_per_s": result.counts["watches"] / wall,
        "peak_rss_mib": peak_kib / 1024,
        "disk_mib": disk / 2**20,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def run(preset: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="funnelrec-bench-sim-"))
    try:
        cmd = [sys.executable, __file__, "--child", preset, "--seed", str(seed), "--out"]
        cmd += [str(work / "data"), *[f"--set={o}" for o in overrides]]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small", "medium"])
    ap.add_argument("--days", nargs="+", type=int, help="shorten the window to these days")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seed, args.set, args.out)))
        return

    runs = []
    for preset in args.presets:
        for days in args.days or [None]:
            overrides = [] if days is None else [f"days={days}"]
            print(f"simulating {preset} {' '.join(overrides)} ...", flush=True)
            runs.append(run(preset, args.seed, overrides))

    table = Table(title="funnelrec simulate")
    for col in ("preset", "days", "users", "items", "watches", "impressions", "searches",
                "wall s", "cpu s", "watches/s", "peak RSS MiB", "disk MiB"):  # fmt: skip
        table.add_column(col, justify="left" if col == "preset" else "right")
    for r in runs:
        c = r["counts"]
        days = next((o.split("=")[1] for o in r["overrides"] if o.startswith("days=")), "preset")
        table.add_row(
            r["preset"], days, f"{c['users']:,}", f"{c['items']:,}", f"{c['watches']:,}",
            f"{c['impressions']:,}", f"{c['searches']:,}", f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}", f"{r['watches_per_s']:,.0f}", f"{r['peak_rss_mib']:,.0f}",
            f"{r['disk_mib']:,.0f}",
        )  # fmt: skip
    Console(width=170).print(table)
    load = os.getloadavg()[0]
    # Keep earlier runs of other configurations (e.g. large with fewer days) beside these.
    new = {(r["preset"], tuple(r["overrides"])) for r in runs}
    if RESULTS.exists():
        old = json.loads(RESULTS.read_text()).get("runs", [])
        runs = [r for r in old if (r["preset"], tuple(r["overrides"])) not in new] + runs
    report = {
        "benchmark": "simulate",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}",
        "load_average_after_last_run": load,
        "note": "wall time includes waiting for the CPU on a shared machine; cpu_s does not",
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
