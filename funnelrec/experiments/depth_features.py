"""`funnelrec experiment depth-features` (the paper's Fig. 6, Covington et al. 2016,
section 3.5): held-out MAP of candidate generation against tower depth 0-4, for four
feature sets:

    watches only        history bag only
    + searches          + the bag of search tokens
    + example age       + the example-age input (section 3.3)
    all features        + demographics (region, device, gender, logged-in, age)

Tower depths as in the paper, scaled to d: 0 linear to d; 1: d; 2: 2d -> d; 3: 4d -> 2d -> d;
4: 8d -> 4d -> 2d -> d. Every model trains to convergence under the same rule
(`Harness.convergence`), with every training seed.
"""

from __future__ import annotations

import itertools
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
from funnelrec.experiments.evaluation import Interval, paired_interval
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features

NAME = "depth-features"
METRIC = "map@100"
FEATURE_SETS: dict[str, list[str]] = {
    "watches only": ["use_search=false", "use_example_age=false", "use_demographics=false"],
    "+ searches": ["use_search=true", "use_example_age=false", "use_demographics=false"],
    "+ example age": ["use_search=true", "use_example_age=true", "use_demographics=false"],
    "all features": ["use_search=true", "use_example_age=true", "use_demographics=true"],
}
ALL = "all features"


_Grid = dict[str, dict[int, list[dict[str, Any]]]]
"""feature set -> depth -> one trained model per seed."""
_Cells = dict[str, dict[int, Interval]]
"""feature set -> depth -> a metric's mean over seeds and examples, with its interval."""


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    feats = time_features(h)
    depths = list(h.budget.depths)
    grid = _grid(h, feats, depths)
    doc = _document(h, grid, depths)
    h.finish(NAME, doc, timer)
    return doc


def _grid(h: Harness, feats: Features, depths: list[int]) -> _Grid:
    """Every feature set at every depth, one model per seed."""
    specs = {
        (name, depth): [ArmSpec(feats, [*over, f"depth={depth}"], seed) for seed in h.seeds]
        for name, over in FEATURE_SETS.items()
        for depth in depths
    }
    h.console.print(f"[bold]{NAME}[/] {len(specs) * len(h.seeds)} models")
    # the deepest towers first: they take longest
    train_arms(h, [s for (_, d), ss in sorted(specs.items(), key=lambda kv: -kv[0][1]) for s in ss])
    grid: _Grid = {name: {} for name in FEATURE_SETS}
    for (name, depth), ss in specs.items():
        grid[name][depth] = [candidate_arm(h, s.feats, s.overrides, s.seed) for s in ss]
    return grid


def _cells(grid: _Grid, metric: str) -> _Cells:
    return {name: {d: cell(arms, metric) for d, arms in by.items()} for name, by in grid.items()}


def _over_depths(grid: _Grid, name: str, depths: list[int]) -> np.ndarray:
    """[seeds, examples]: each example's METRIC averaged over the depths."""
    return np.mean([per_seed(grid[name][d], METRIC) for d in depths], axis=0)


def _checks(grid: _Grid, depths: list[int]) -> list[Check]:
    """Fig. 6's two directions: each feature group added raises MAP (averaged over the
    depths), and the deepest tower beats the linear one (depth 0) with all features."""
    checks = [
        Check(
            f"adding {b.removeprefix('+ ')} raises MAP",
            f"{b} - {a}",
            ">",
            paired_interval(_over_depths(grid, b, depths), _over_depths(grid, a, depths)),
            f"{METRIC}, mean over depths",
        )
        for a, b in itertools.pairwise(FEATURE_SETS)
    ]
    lo, hi = depths[0], depths[-1]
    if hi != lo:
        checks.append(
            Check(
                "a deeper tower raises MAP",
                f"depth {hi} - depth {lo}",
                ">",
                paired_interval(per_seed(grid[ALL][hi], METRIC), per_seed(grid[ALL][lo], METRIC)),
                f"{METRIC}, all features",
            )
        )
    return checks


def _document(h: Harness, grid: _Grid, depths: list[int]) -> dict[str, Any]:
    cells = _cells(grid, METRIC)
    recall = _cells(grid, "recall@100")
    by_depth = [
        [
            f"depth {d} - depth {depths[0]}",
            paired_interval(
                per_seed(grid[ALL][d], METRIC), per_seed(grid[ALL][depths[0]], METRIC)
            ).text(),
        ]
        for d in depths[1:]
    ]
    series = [
        {
            "label": name,
            "x": depths,
            "y": [cells[name][d].mean for d in depths],
            "yerr": yerr([cells[name][d] for d in depths]),
        }
        for name in FEATURE_SETS
    ]
    checks = _checks(grid, depths)
    runs = [a for by in grid.values() for arms in by.values() for a in arms]
    best = max(depths, key=lambda d: cells[ALL][d].mean)
    text = (
        f"With all features, depth {best} has the highest mean {METRIC} "
        f"({cells[ALL][best].mean:.4f}); depth {depths[0]} gives {cells[ALL][depths[0]].mean:.4f}."
    )
    columns = ["features", *(f"depth {d}" for d in depths)]
    return {
        "title": "Depth and features (Fig. 6): held-out MAP vs tower depth",
        "claim": "Holdout MAP rises with tower depth and with each feature group added: "
        "watches only < + searches < + example age < all features.",
        "protocol": f"{h.options.preset} world, time split (training before t1, test after "
        f"t2); {h.budget.eval_examples or 'all'} test next watches sampled at random, the same "
        "for every model; full ranking of the training vocabulary, seen items excluded; "
        f"example age 0 at serving; d = {h.budget.cand_dim}, {h.budget.cand_negatives} sampled "
        f"negatives with logQ correction; {seeds_note(h)}; {convergence_note(h, runs)}.",
        "tables": [
            checks_table(checks),
            {
                "title": f"{METRIC} by depth (columns) and feature set (rows), mean over seeds "
                "[95% CI]",
                "columns": columns,
                "rows": [[n, *(ci_text(cells[n][d]) for d in depths)] for n in FEATURE_SETS],
            },
            {
                "title": f"{METRIC} with all features: each depth against depth {depths[0]} "
                "(paired difference [95% CI])",
                "columns": ["depths", "difference [95% CI]"],
                "rows": by_depth or [["(one depth)", ""]],
            },
            {
                "title": "recall@100 by depth and feature set [95% CI]",
                "columns": columns,
                "rows": [[n, *(ci_text(recall[n][d]) for d in depths)] for n in FEATURE_SETS],
            },
            {
                "title": "training steps to the best validation Recall@100 (median over seeds)",
                "columns": columns,
                "rows": [[n, *(_median_best(grid[n][d]) for d in depths)] for n in FEATURE_SETS],
            },
        ],
        "figures": [
            {
                "name": "depth_features",
                "kind": "line",
                "title": f"held-out {METRIC} vs tower depth (Fig. 6; 95% CI)",
                "xlabel": "tower depth",
                "ylabel": METRIC,
                "series": series,
            }
        ],
        "verdict": verdict(checks, text),
        "results": {
            METRIC: {n: {str(d): iv.to_list() for d, iv in c.items()} for n, c in cells.items()},
            "recall@100": {
                n: {str(d): iv.to_list() for d, iv in c.items()} for n, c in recall.items()
            },
            "best_step": {
                n: {str(d): [a.get("best_step") for a in arms] for d, arms in by.items()}
                for n, by in grid.items()
            },
        },
    }


def _median_best(arms: list[dict[str, Any]]) -> str:
    steps = [a["best_step"] for a in arms if a.get("best_step") is not None]
    return f"{int(np.median(steps)):,}" if steps else "-"
