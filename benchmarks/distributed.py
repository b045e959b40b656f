"""Gradient communication of data-parallel training: dense vs sparse embedding tables.

    .venv/bin/python benchmarks/distributed.py                     # 100k and 1M items
    .venv/bin/python benchmarks/distributed.py --rows 100000 --steps 5

Two gloo processes on this machine train the candidate model through the real loop
(`train.train` with `distributed.sync_gradients`) on synthetic batches: a step's batch of
1,024 examples (512 per process), histories of 50 items and search bags of 20 tokens drawn
uniformly (the most distinct rows per batch: real, skewed ids touch fewer). The item
tables (input and output) have `rows` rows, the token table 50,000; d = 64, depth 2,
2,048 sampled negatives, one thread per process.

"dense" gives every table dense gradients: each step all-reduces the whole tables.
"sparse" (`CandidateConfig.sparse`) all-gathers only the rows the batch touched. Reported
per process and step: payload bytes put into collectives (for 2 processes, the bytes each
sends), wall and CPU time in the gradient exchange and in the whole step; and the same
model's step on one process with the whole batch, for scale. On a shared machine the wall
times include waiting for a core (the load average is recorded); CPU times do not.
Prints a table and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

import funnelrec.training.loop
from funnelrec.candidates import CandidateConfig, CandidateInputs, CandidateModel, synthetic_batch
from funnelrec.training.distributed import Distributed, StepSync, setup, sync_gradients, teardown
from funnelrec.training.loop import TrainConfig, seed_everything, train

RESULTS = Path(__file__).parent / "results" / "distributed.json"
BATCH = 1024
DIM = 64
TOKENS = 50_000
WORLD = 2
WARMUP = 2


def make_model(rows: int, sparse: bool) -> CandidateModel:
    seed_everything(0)
    inputs = CandidateInputs(
        item_vocab=rows + 1, token_vocab=TOKENS, region_vocab=50, device_vocab=5, num_dense=3
    )
    cfg = CandidateConfig(dim=DIM, depth=2, num_negatives=2048, sparse=sparse)
    return CandidateModel(cfg, inputs)


class TimedSync:
    """Wraps the loop's `sync_gradients`: wall and CPU seconds of each exchange."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, *args: Any, **kw: Any) -> StepSync:
        t, c = time.perf_counter(), time.process_time()
        out = sync_gradients(*args, **kw)
        self.wall.append(time.perf_counter() - t)
        self.cpu.append(time.process_time() - c)
        return out


def run_steps(
    model: CandidateModel, batch: int, steps: int, seed: int, dist: Distributed | None
) -> dict[str, float]:
    """`steps` timed steps (after WARMUP untimed ones) of `batch` examples per process."""
    g = torch.Generator().manual_seed(seed)
    data = [
        synthetic_batch(model.inputs, batch, history_len=50, search_len=20, generator=g)
        for _ in range(WARMUP + steps)
    ]
    cfg = TrainConfig(lr=1e-3, batch_size=BATCH, checkpoint_every=0, threads=1)
    warm = dataclasses.replace(cfg, max_steps=WARMUP)
    train(model, lambda e, s: iter(data[:WARMUP]), warm, progress=False, dist=dist)
    timed = TimedSync()
    funnelrec.training.loop.sync_gradients = timed
    cpu = time.process_time()
    # max_steps: the run ends without the epoch-end exchange (1 per epoch, not per step)
    cfg = dataclasses.replace(cfg, max_steps=steps)
    result = train(model, lambda e, s: iter(data[WARMUP:]), cfg, progress=False, dist=dist)
    cpu = time.process_time() - cpu
    funnelrec.training.loop.sync_gradients = sync_gradients
    touched = sum(torch.unique(b.history).numel() for b in data[WARMUP:]) / steps
    return {
        "step_ms": 1000 * result.seconds / result.steps,
        "step_cpu_ms": 1000 * cpu / result.steps,
        "comm_ms": 1000 * sum(timed.wall) / result.steps,
        "comm_cpu_ms": 1000 * sum(timed.cpu) / result.steps,
        "comm_bytes": result.comm_bytes_per_step,
        "history_rows_touched": touched,
    }


def _rank(rank: int, port: int, rows: int, sparse: bool, steps: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    dist = setup("cpu")
    try:
        figures = run_steps(make_model(rows, sparse), BATCH // WORLD, steps, 100 + rank, dist)
        every = dist.all_gather_objects(figures)
        if dist.is_main:
            Path(out).write_text(json.dumps(every))
    finally:
        teardown(dist)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(rows: int, sparse: bool, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        mp.spawn(_rank, args=(_free_port(), rows, sparse, steps, str(out)), nprocs=WORLD)
        ranks = json.loads(out.read_text())
    torch.set_num_threads(1)
    one = run_steps(make_model(rows, sparse), BATCH, steps, 7, None)
    model = make_model(rows, sparse)
    table_bytes = sum(
        p.numel() * 4 for p in model.parameters() if p.dim() == 2 and p.shape[0] > 1000
    )
    mean = {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0]}
    return {
        "rows": rows,
        "gradients": "sparse" if sparse else "dense",
        "table_bytes": table_bytes,
        "processes": WORLD,
        **{k: round(v, 1) for k, v in mean.items()},
        "one_process_step_ms": round(one["step_ms"], 1),
        "one_process_step_cpu_ms": round(one["step_cpu_ms"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    results = [measure(r, s, args.steps) for r in args.rows for s in (False, True)]
    table = Table(title=f"gradient exchange, {WORLD} gloo processes, batch {BATCH}, d={DIM}")
    for col in ("item rows", "grads", "MB/step/proc", "exchange ms", "exchange CPU ms",
                "step ms", "step CPU ms", "1-proc step ms", "1-proc CPU ms"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            f"{r['rows']:,}", r["gradients"], f"{r['comm_bytes'] / 1e6:,.2f}",
            f"{r['comm_ms']:,.0f}", f"{r['comm_cpu_ms']:,.0f}", f"{r['step_ms']:,.0f}",
            f"{r['step_cpu_ms']:,.0f}", f"{r['one_process_step_ms']:,.0f}",
            f"{r['one_process_step_cpu_ms']:,.0f}",
        )  # fmt: skip
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    doc = {
        "benchmark": "distributed",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "setting": {
            "batch": BATCH,
            "dim": DIM,
            "token_rows": TOKENS,
            "depth": 2,
            "negatives": 2048,
            "history_len": 50,
            "search_len": 20,
            "threads_per_process": 1,
            "backend": "gloo",
        },
        "results": results,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
