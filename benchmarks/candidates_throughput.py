"""Training throughput of the candidate model, against the machine's fp32 matmul peak.

    .venv/bin/python benchmarks/candidates_throughput.py                  # synthetic batches
    .venv/bin/python benchmarks/candidates_throughput.py --features FEAT  # real examples

The setting the throughput goal is set for: depth 2 tower, d = 256, 4,096 shared sampled
negatives, batch 1,024, histories of 50 items. Without --features, batches are synthetic
with the small world's shape (10,000 items; every history exactly 50 items, every search
bag 20 tokens). Steps run through the real loop (`train.train`: forward, backward,
clipping, optimizer).

Model FLOPs count the matrix multiplications only (tower layers and the sampled logits,
forward and backward = 3x forward); gathers, bag means and element-wise work are not
counted, as in the usual model-FLOPs-utilisation convention. The peak is the best of
several square fp32 matmuls measured in the same run with the same thread count.

Each step is timed (median and best reported) by wall and by CPU time: on a shared
machine the wall time includes waiting for a core, the CPU time does not (with more than
one thread it counts spinning threads too). Both are set against the matmul peak measured
the same way.

The host's speed drifts (the same matmul runs at different rates from one minute to the
next on the 2-core machine; docs/candidates.md, "Throughput"), so the peak is also
measured in turns with the steps: before each window of `--window` steps, the best of
three 2048-square matmuls (not timed as part of a step). `fraction_of_peak_in_turns` is
the median over windows of the window's achieved FLOP/s (its median step) over that
window's peak. `fraction_of_peak` is the cautious figure: the median step of the whole run
against the best matmul of the run.
Prints a table and writes benchmarks/results/candidates_throughput.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from funnelrec.candidates import CandidateConfig, CandidateInputs, CandidateModel, synthetic_batch
from funnelrec.kernels import rowsum
from funnelrec.kernels.softmax import row_pass
from funnelrec.training.loop import TrainConfig, seed_everything, train

RESULTS = Path(__file__).parent / "results" / "candidates_throughput.json"


def best_matmul(
    n: int, *, repeats: int = 3, seconds: float = 0.0, warmup: int = 0
) -> tuple[float, float]:
    """Best GFLOP/s (wall, CPU time) of n-square fp32 matmuls: at least `repeats` of them,
    and more until `seconds` have passed, after `warmup` untimed ones."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(warmup):
        a @ b
    flops = 2 * n**3
    wall, cpu, done = 0.0, 0.0, 0
    end = time.perf_counter() + seconds
    while done < repeats or time.perf_counter() < end:
        t, c = time.perf_counter(), time.process_time()
        a @ b
        wall = max(wall, flops / (time.perf_counter() - t) / 1e9)
        cpu = max(cpu, flops / max(time.process_time() - c, 1e-9) / 1e9)
        done += 1
    return wall, cpu


def matmul_peak(seconds: float = 3.0) -> dict[str, dict[str, float]]:
    """Best fp32 GFLOP/s of square matmuls of a few sizes, by wall and by CPU time."""
    best: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for n in (1024, 2048, 3072):
        best["wall"][str(n)], best["cpu"][str(n)] = best_matmul(n, seconds=seconds / 3, warmup=2)
    return best


def step_flops(cfg: CandidateConfig, inputs: CandidateInputs, batch: int) -> float:
    """Matmul FLOPs of one training step (forward + backward)."""
    in_width = (cfg.item_dim or cfg.dim) + (cfg.token_dim or cfg.dim)
    in_width += inputs.region_dim + inputs.device_dim + inputs.num_dense + 1
    fwd = 0.0
    for w in cfg.tower_widths():
        fwd += 2.0 * batch * in_width * w
        in_width = w
    fwd += 2.0 * batch * cfg.dim * cfg.num_negatives  # sampled logits
    fwd += 2.0 * batch * cfg.dim  # the positives' dot products
    return 3.0 * fwd


def time_steps(
    model: CandidateModel, pool: list[Any], warmup: int, steps: int, window: int
) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """Wall and CPU seconds of each training step through `train.train`, and the matmul
    peak (wall, CPU GFLOP/s) measured before each window of `window` steps.

    Step i runs from the loop being handed batch i to it asking for batch i + 1: forward,
    backward, clipping, optimizer and progress bookkeeping. The peak is measured between
    the two stamps, outside any step. Warm-up steps are left out."""
    starts: list[tuple[float, float]] = []
    ends: list[tuple[float, float]] = []
    peaks: list[tuple[float, float]] = []

    def batches(epoch: int, start: int) -> Any:
        for i, batch in enumerate(itertools.islice(itertools.cycle(pool), start, None)):
            ends.append((time.perf_counter(), time.process_time()))  # of step i - 1
            timed = i - warmup
            if 0 <= timed < steps and timed % window == 0:
                peaks.append(best_matmul(2048))  # the peak now
            starts.append((time.perf_counter(), time.process_time()))
            yield batch

    tc = TrainConfig(lr=1e-3, checkpoint_every=0, max_steps=warmup + steps + 1)
    train(model, batches, tc, progress=False)
    span = range(warmup, warmup + steps)
    wall = [ends[i + 1][0] - starts[i][0] for i in span]
    cpu = [ends[i + 1][1] - starts[i][1] for i in span]
    return wall, cpu, peaks


def in_turns(gflop: float, seconds: list[float], peaks: list[float], window: int) -> list[float]:
    """Each window's achieved GFLOP/s (by its median step) over the peak measured before it."""
    return [
        gflop / statistics.median(seconds[k * window : (k + 1) * window]) / peak
        for k, peak in enumerate(peaks)
        if seconds[k * window : (k + 1) * window]
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    if args.features:
        from funnelrec.features import Features
        from funnelrec.features.loader import candidate_loader

        feats = Features.open(args.features)
        inputs = CandidateInputs.from_features(feats)
        loader = candidate_loader(feats, "train", batch_size=args.batch, shuffle=True)
        pool = list(itertools.islice(iter(loader), args.pool))
        source = f"features {args.features}"
    else:
        inputs = CandidateInputs(
            item_vocab=args.items + 1,
            token_vocab=args.tokens + 1,
            region_vocab=51,
            device_vocab=6,
            num_dense=6,
            region_dim=12,
            device_dim=4,
        )
        g = torch.Generator().manual_seed(0)
        pool = [
            synthetic_batch(inputs, args.batch, history_len=50, search_len=20, generator=g)
            for _ in range(args.pool)
        ]
        source = "synthetic (small-world shape)"
    runs = []
    peaks = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak()
        peaks[str(threads)] = peak
        peak_wall, peak_cpu = max(peak["wall"].values()), max(peak["cpu"].values())
        for sparse in args.sparse:
            cfg = CandidateConfig(
                dim=args.dim, depth=args.depth, num_negatives=args.negatives, sparse=sparse
            )
            seed_everything(0)
            model = CandidateModel(cfg, inputs, label_counts=torch.ones(inputs.item_vocab))
            wall, cpu, window_peaks = time_steps(model, pool, args.warmup, args.steps, args.window)
            gflop = step_flops(cfg, inputs, args.batch) / 1e9
            wall_med, cpu_med = statistics.median(wall), statistics.median(cpu)
            turns = in_turns(gflop, wall, [p[0] for p in window_peaks], args.window)
            turns_cpu = in_turns(gflop, cpu, [p[1] for p in window_peaks], args.window)
            # the best matmul of the run: before the runs or in any window
            best_wall = max([peak_wall] + [p[0] for p in window_peaks])
            best_cpu = max([peak_cpu] + [p[1] for p in window_peaks])
            runs.append(
                {
                    "threads": threads,
                    "sparse": model.sparse,
                    "steps": len(wall),
                    "step_ms_median": 1000 * wall_med,
                    "step_ms_best": 1000 * min(wall),
                    "step_cpu_ms_median": 1000 * cpu_med,
                    "examples_per_s": args.batch / wall_med,
                    "examples_per_cpu_s": args.batch / cpu_med,
                    "model_gflop_per_step": gflop,
                    "achieved_gflop_per_s": gflop / wall_med,
                    "achieved_gflop_per_s_best": gflop / min(wall),
                    "achieved_gflop_per_cpu_s": gflop / cpu_med,
                    "fraction_of_peak": gflop / wall_med / best_wall,
                    "fraction_of_peak_best": gflop / min(wall) / best_wall,
                    "fraction_of_peak_cpu_time": gflop / cpu_med / best_cpu,
                    "window_steps": args.window,
                    "window_peak_gflop_per_s": [p[0] for p in window_peaks],
                    "window_fraction_of_peak": turns,
                    "fraction_of_peak_in_turns": statistics.median(turns),
                    "fraction_of_peak_in_turns_cpu_time": statistics.median(turns_cpu),
                }
            )
    return {
        "benchmark": "candidates_throughput",
        "source": source,
        "setting": {
            "depth": args.depth,
            "dim": args.dim,
            "negatives": args.negatives,
            "batch": args.batch,
            "history": 50,
            "items": inputs.num_items,
            "tokens": inputs.token_vocab - 1,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "softmax_row_pass": row_pass(),  # C (the model's c_softmax_rows is on) or torch
            "embedding_row_sums": rowsum.level(),  # C (c_row_sums is on) or torch
            # other processes on a shared machine: the runs compete with this many
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0],
        },
        "matmul_peak_gflop_per_s": peaks,  # per thread count
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--features", type=Path, default=None)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--tokens", type=int, default=5_000)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument(
        "--window", type=int, default=10, help="steps between two measurements of the peak"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool", type=int, default=8, help="distinct batches cycled through")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, torch.get_num_threads()], help="one run each"
    )
    p.add_argument(
        "--sparse",
        type=lambda s: {"true": True, "false": False}[s.lower()],
        nargs="+",
        default=[False, True],
        help="sparse embedding gradients, one run each (true/false)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    res = run(args)
    table = Table(title=f"candidate training throughput ({res['source']})")
    for col in (
        "threads", "sparse", "examples/s", "ms/step (best)", "GFLOP/s", "of peak (best)",
        "of peak, CPU time", "of peak, in turns",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in res["runs"]:
        table.add_row(
            str(r["threads"]),
            str(r["sparse"]),
            f"{r['examples_per_s']:,.0f}",
            f"{r['step_ms_median']:.0f} ({r['step_ms_best']:.0f})",
            f"{r['achieved_gflop_per_s']:.1f}",
            f"{100 * r['fraction_of_peak']:.0f}% ({100 * r['fraction_of_peak_best']:.0f}%)",
            f"{100 * r['fraction_of_peak_cpu_time']:.0f}%",
            f"{100 * r['fraction_of_peak_in_turns']:.0f}%",
        )
    console = Console()
    console.print(table)
    m = res["machine"]
    console.print(
        f"{res['runs'][0]['model_gflop_per_step']:.2f} model GFLOP per step; load average "
        f"(1 min) before/after: {m['load_average_1m_before']:.1f}/"
        f"{m['load_average_1m_after']:.1f} on {m['cores']} cores"
    )
    for threads, peak in res["matmul_peak_gflop_per_s"].items():
        console.print(
            f"fp32 matmul peak, {threads} thread(s), GFLOP/s by wall time: "
            + ", ".join(f"n={n}: {v:.1f}" for n, v in peak["wall"].items())
            + "; by CPU time: "
            + ", ".join(f"n={n}: {v:.1f}" for n, v in peak["cpu"].items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
