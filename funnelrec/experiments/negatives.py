"""`funnelrec experiment negatives` (Covington et al. 2016, section 3.1): sampled softmax
with a grid of shared negatives per batch, with and without the logQ correction, against
the full softmax: held-out quality and training examples per second, every model trained
to convergence under the same rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from funnelrec.experiments.common import (
    ArmSpec,
    candidate_arm,
    cell,
    ci_text,
    convergence_note,
    per_seed,
    seeds_note,
    time_features,
    train_arms,
    yerr,
)
from funnelrec.experiments.evaluation import mean_sd, paired_interval
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features

NAME = "negatives"
METRIC = "recall@100"
NEAR_FULL = 0.9  # "about as well as the full softmax": at least this share of its quality
THOUSANDS = 4096  # the largest sampled size that still counts as "thousands" of negatives


_Arms = dict[tuple[str, int], list[dict[str, Any]]]
"""(logQ "on" / "off" / "full", negatives) -> one trained model per seed."""


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    feats = time_features(h)
    n_items = len(feats.vocab("item")) - 1
    grid = [n for n in h.budget.negatives if n < n_items] or [min(h.budget.negatives)]
    arms = _arms(h, feats, grid, n_items)
    doc = _document(h, arms, grid, n_items)
    h.finish(NAME, doc, timer)
    return doc


def _overrides(logq: str, n: int) -> list[str]:
    if logq == "full":
        return ["loss=full"]
    return [f"num_negatives={n}", f"logq_correction={'true' if logq == 'on' else 'false'}"]


def _arms(h: Harness, feats: Features, grid: list[int], n_items: int) -> _Arms:
    """Sampled softmax at every size of `grid` with logQ on and off, then the full one."""
    keys = [(logq, n) for logq in ("on", "off") for n in grid] + [("full", n_items)]
    # the most negatives first (the full softmax last in `keys`): they take longest
    longest = sorted(keys, key=lambda k: -k[1])
    train_arms(h, [ArmSpec(feats, _overrides(*k), s) for k in longest for s in h.seeds])
    return {k: [candidate_arm(h, feats, _overrides(*k), s) for s in h.seeds] for k in keys}


def _speed(runs: list[dict[str, Any]], key: str) -> float:
    if key == "examples_per_s":
        return mean_sd([r["examples_per_s"] for r in runs])[0]
    # CPU time of the whole training call (validation included): on a shared machine it
    # varies far less with the load than wall time does
    return mean_sd([r["examples"] / max(r["cpu_s"], 1e-9) for r in runs])[0]


def _table_rows(arms: _Arms) -> list[list[str]]:
    rows = []
    for (logq, n), runs in arms.items():
        label = "full softmax" if logq == "full" else f"sampled, logQ {logq}"
        steps = [r.get("best_step") or 0 for r in runs]
        rows.append(
            [
                label,
                f"{n:,}",
                ci_text(cell(runs, METRIC)),
                ci_text(cell(runs, "map@100")),
                f"{int(np.median(steps)):,}",
                f"{_speed(runs, 'examples_per_s'):,.0f}",
                f"{_speed(runs, 'examples_per_cpu_s'):,.0f}",
            ]
        )
    return rows


def _series(arms: _Arms, grid: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The figures' lines of the sampled arms: quality, and examples per CPU second."""
    series_q, series_s = [], []
    for logq in ("on", "off"):
        ivs = [cell(arms[(logq, n)], METRIC) for n in grid]
        series_q.append(
            {
                "label": f"sampled, logQ {logq}",
                "x": grid,
                "y": [iv.mean for iv in ivs],
                "yerr": yerr(ivs),
            }
        )
        series_s.append(
            {
                "label": f"sampled, logQ {logq}",
                "x": grid,
                "y": [_speed(arms[(logq, n)], "examples_per_cpu_s") for n in grid],
            }
        )
    return series_q, series_s


def _checks(arms: _Arms, grid: list[int], n_items: int) -> list[Check]:
    """logQ helps (over the grid), more negatives help, and thousands of corrected
    negatives reach NEAR_FULL of the full softmax's quality."""
    on = np.mean([per_seed(arms[("on", n)], METRIC) for n in grid], axis=0)
    off = np.mean([per_seed(arms[("off", n)], METRIC) for n in grid], axis=0)
    full = per_seed(arms[("full", n_items)], METRIC)
    ref = max([n for n in grid if n <= THOUSANDS] or grid[:1])
    checks = [
        Check(
            "the logQ correction helps",
            "logQ on - off",
            ">",
            paired_interval(on, off),
            f"{METRIC}, mean over {len(grid)} sizes",
        )
    ]
    if len(grid) > 1:
        checks.append(
            Check(
                "more sampled negatives help",
                f"{grid[-1]:,} - {grid[0]:,} negatives",
                ">",
                paired_interval(
                    per_seed(arms[("on", grid[-1])], METRIC),
                    per_seed(arms[("on", grid[0])], METRIC),
                ),
                f"{METRIC}, logQ on",
            )
        )
    checks.append(
        Check(
            f"{ref:,} corrected negatives reach {NEAR_FULL:.0%} of the full softmax",
            f"{ref:,} sampled - {NEAR_FULL} x full",
            ">",
            paired_interval(per_seed(arms[("on", ref)], METRIC), NEAR_FULL * full),
            METRIC,
        )
    )
    return checks


def _document(h: Harness, arms: _Arms, grid: list[int], n_items: int) -> dict[str, Any]:
    full = arms[("full", n_items)]
    full_q = cell(full, METRIC).mean
    full_eps = _speed(full, "examples_per_cpu_s")
    series_q, series_s = _series(arms, grid)
    checks = _checks(arms, grid, n_items)
    ref = max([n for n in grid if n <= THOUSANDS] or grid[:1])
    speedup = _speed(arms[("on", ref)], "examples_per_cpu_s") / max(full_eps, 1e-9)
    text = (
        f"With {ref:,} corrected negatives training runs {speedup:.1f}x as many examples per "
        f"CPU second as the full softmax over {n_items:,} items (the paper's >100x is over "
        "millions of items; the gap grows with the vocabulary)."
    )
    runs = [a for runs in arms.values() for a in runs]
    return {
        "title": "Negatives: sampled softmax (logQ on / off) vs full softmax",
        "claim": "Sampling thousands of negatives with the logQ (importance) correction "
        "trains about as well as the full softmax, and much faster.",
        "protocol": f"{h.options.preset} world ({n_items:,} items), time split; every model "
        f"d = {h.budget.cand_dim}, depth 2, batches of {h.budget.cand_batch}; unigram^0.75 "
        "proposal shared by the batch; training speed: examples per wall second (the "
        "trainer's own, which varies with the load of the machine) and per CPU second of "
        f"the training call; {h.budget.eval_examples or 'all'} test next watches, seen items "
        f"excluded; {seeds_note(h)}; {convergence_note(h, runs)}.",
        "tables": [
            checks_table(checks),
            {
                "title": "quality (mean over seeds [95% CI]) and training speed",
                "columns": [
                    "loss",
                    "negatives",
                    METRIC,
                    "map@100",
                    "steps to best (median)",
                    "train examples/s (wall)",
                    "examples per CPU s",
                ],
                "rows": _table_rows(arms),
            },
        ],
        "figures": [
            {
                "name": "negatives_quality",
                "kind": "line",
                "title": f"held-out {METRIC} vs sampled negatives (95% CI)",
                "xlabel": "negatives per batch",
                "ylabel": METRIC,
                "logx": True,
                "series": series_q,
                "hlines": [{"y": full_q, "label": "full softmax"}],
            },
            {
                "name": "negatives_speed",
                "kind": "line",
                "title": "training examples per CPU second vs sampled negatives",
                "xlabel": "negatives per batch",
                "ylabel": "examples / CPU s",
                "logx": True,
                "series": series_s,
                "hlines": [{"y": full_eps, "label": "full softmax"}],
            },
        ],
        "verdict": verdict(checks, text),
        "results": {
            "grid": grid,
            "quality": {f"{k[0]}-{k[1]}": cell(v, METRIC).to_list() for k, v in arms.items()},
            "examples_per_cpu_s": {
                f"{k[0]}-{k[1]}": _speed(v, "examples_per_cpu_s") for k, v in arms.items()
            },
        },
    }
