"""Benchmark: `data import events` from CSV (rows per second, peak memory) and the cost of
`data append` of one day to a large and to a small dataset.

    .venv/bin/python benchmarks/import_events.py                      # 10M rows, 100k a day
    .venv/bin/python benchmarks/import_events.py --rows 2000000 --work /tmp/ie

Writes synthetic watch logs as CSV under --work (never committed): `--rows` watches of
string user ids (one user per ten rows on average) and item ids (skewed popularity) over 30
days, with epoch-second times and watch times; a second log of a tenth of the rows; and a
day of `--day-rows` watches after both, a tenth of them by new users (and a twentieth of
new items), the rest by users and of items both datasets know. Imports both logs
(each in its own process, so that its peak RSS is its own) and appends the day to a copy
of each dataset, three times, keeping the median. The goal: importing 10M rows at 1M
rows/s or more with memory bounded by the batch, not the file; an append whose time
follows the day, not the dataset (the ratio of the two appends against the ratio of the
dataset sizes). The machine is shared: the load average before and after is recorded
beside the wall and CPU times. Writes benchmarks/results/import_events.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "import_events.json"
START = 1_700_000_000  # the logs' first second
SPAN = 30 * 86400
GOAL_ROWS_PER_S = 1_000_000

MAPPING = """\
[watches]
path = "{path}"
user = "user_id"
item = "video_id"
time = "time"
watch_time = "watch_s"
"""

# Runs in a child process: one import or append, its own wall, CPU and peak RSS (the
# process's, interpreter and libraries included).
CHILD = """
import json, resource, sys, time
from funnelrec.data.append import append_events
from funnelrec.data.loaders import import_events
def peak_rss_mib():
    # VmHWM is this process's own peak: ru_maxrss can carry the parent's over the exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kind, a, b = sys.argv[1:4]
started, cpu = time.perf_counter(), time.process_time()
if kind == "import":
    result = import_events(a, b)
    rows = result.row_counts
else:
    rows = append_events(a, [b]).row_counts
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({
    "seconds": seconds,
    "cpu_s": cpu,
    "peak_rss_mib": peak_rss_mib(),
    "row_counts": rows,
}))
"""


def write_log(path: Path, rows: int, *, first_ts: int, span: int, users: int, items: int,
              new_share: float = 0.0, seed: int = 0) -> None:  # fmt: skip
    """`rows` watches in time order, a million rows at a time: user ids `u<n>` (uniform),
    item ids `v<n>` (Zipf); a `new_share` of rows by users and of items never seen
    before (`new-u<n>`, `new-v<n>`)."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [("user_id", pa.string()), ("video_id", pa.string()), ("time", pa.int64()),
         ("watch_s", pa.float64())]
    )  # fmt: skip
    options = pacsv.WriteOptions(quoting_style="none")
    with pacsv.CSVWriter(path, schema, write_options=options) as w:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            user = np.char.add("u", rng.integers(0, users, n).astype(str))
            item = np.char.add("v", ((rng.zipf(1.2, n) - 1) % items).astype(str))
            if new_share:
                fresh = rng.random(n) < new_share
                new_users = rng.integers(0, max(int(n * new_share / 2), 1), fresh.sum())
                user[fresh] = np.char.add("new-u", new_users.astype(str))
                fresh = rng.random(n) < new_share / 2
                new_items = rng.integers(0, max(int(n * new_share / 10), 1), fresh.sum())
                item[fresh] = np.char.add("new-v", new_items.astype(str))
            ts = first_ts + (np.arange(start, start + n, dtype=np.int64) * span) // rows
            table = pa.table(
                {
                    "user_id": user,
                    "video_id": item,
                    "time": ts,
                    "watch_s": np.round(rng.exponential(120.0, n), 1),
                },
                schema=schema,
            )
            w.write_table(table)


def run_child(kind: str, a: Path, b: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(a), str(b)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"1m": one, "5m": five, "15m": fifteen, "uptime": uptime}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--day-rows", type=int, default=100_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-import-events"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    console = Console()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    sizes = {"large": args.rows, "small": args.rows // 10}
    logs = {}
    for name, rows in sizes.items():
        logs[name] = work / f"{name}.csv"
        console.print(f"writing {rows:,} rows to {logs[name]}")
        write_log(logs[name], rows, first_ts=START, span=SPAN, users=max(rows // 10, 1),
                  items=max(rows // 100, 1000), seed=1 if name == "large" else 2)  # fmt: skip
        (work / f"{name}.toml").write_text(MAPPING.format(path=logs[name].name))
    day = work / "day.csv"
    # The day's known users and items are known to both datasets (the small one's range).
    write_log(day, args.day_rows, first_ts=START + SPAN, span=86400, users=sizes["small"] // 10,
              items=max(sizes["small"] // 100, 1000), new_share=0.1, seed=3)  # fmt: skip

    load_before = load()
    imports = {}
    for name in sizes:
        console.print(f"importing {name}")
        imports[name] = run_child("import", work / f"{name}.toml", work / name)
        imports[name]["csv_mib"] = logs[name].stat().st_size / 2**20
        imports[name]["dataset_mib"] = du_mib(work / name)

    appends: dict[str, list[dict[str, Any]]] = {name: [] for name in sizes}
    for _ in range(args.repeats):
        for name in sizes:
            copy = work / f"{name}-append"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(work / name, copy)
            appends[name].append(run_child("append", copy, day))
    load_after = load()

    big = imports["large"]
    median = {name: statistics.median(a["seconds"] for a in runs) for name, runs in appends.items()}
    median_cpu = {
        name: statistics.median(a["cpu_s"] for a in runs) for name, runs in appends.items()
    }
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.machine(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
        },
        "rows": args.rows,
        "import_s": big["seconds"],
        "import_cpu_s": big["cpu_s"],
        "rows_per_s": args.rows / big["seconds"],
        "rows_per_cpu_s": args.rows / big["cpu_s"],
        "peak_rss_mib": big["peak_rss_mib"],
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "goal_met": args.rows / big["seconds"] >= GOAL_ROWS_PER_S,
        "day_rows": args.day_rows,
        "append_large_s": median["large"],
        "append_small_s": median["small"],
        "append_large_cpu_s": median_cpu["large"],
        "append_small_cpu_s": median_cpu["small"],
        "append_ratio": median["large"] / median["small"],
        "dataset_ratio": sizes["large"] / sizes["small"],
        "load_average_1m": load_after["1m"],
        "load_before": load_before,
        "load_after": load_after,
        "imports": imports,
        "appends": appends,
    }

    table = Table(title="data import events / data append")
    table.add_column("what")
    table.add_column("figure", justify="right")
    table.add_row(f"import {args.rows:,} rows: wall s", f"{big['seconds']:.2f}")
    table.add_row("  rows/s (wall)", f"{result['rows_per_s']:,.0f}")
    table.add_row("  CPU s; rows per CPU s", f"{big['cpu_s']:.2f}; {result['rows_per_cpu_s']:,.0f}")
    table.add_row("  peak RSS MiB", f"{big['peak_rss_mib']:,.0f}")
    table.add_row(f"import {sizes['small']:,} rows: wall s", f"{imports['small']['seconds']:.2f}")
    table.add_row("  peak RSS MiB", f"{imports['small']['peak_rss_mib']:,.0f}")
    for name in sizes:
        table.add_row(
            f"append {args.day_rows:,} rows to {sizes[name]:,}: wall s (CPU s)",
            f"{median[name]:.3f} ({median_cpu[name]:.3f})",
        )
    table.add_row("append ratio (large / small)", f"{result['append_ratio']:.2f}")
    table.add_row("dataset ratio", f"{result['dataset_ratio']:.0f}")
    table.add_row(
        "load average 1m before / after", f"{load_before['1m']:.1f} / {load_after['1m']:.1f}"
    )
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s in all")
