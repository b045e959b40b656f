"""Pieces several experiments share: scoring a candidate model on the held-out sample,
formatting mean ± sd over seeds, and relative differences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from funnelrec.candidates import check_features, load_candidate_model, read_candidate_config
from funnelrec.candidates.metrics import ModelScorer
from funnelrec.experiments.evaluation import (
    ExampleSample,
    bootstrap_ci,
    example_ranks,
    per_example,
    summary,
)
from funnelrec.experiments.harness import Harness
from funnelrec.features import Features

# The held-out metrics every candidate-model arm reports.
CAND_METRICS = ("recall@10", "recall@100", "map@100", "ndcg@10", "mrr")


def time_features(h: Harness, overrides: Sequence[str] = ()) -> Features:
    """The time-split features most experiments share (the held-out period after the
    training window: example age 0 at serving is the right age there)."""
    return h.features("time", list(overrides))


def heldout_sample(h: Harness, feats: Features) -> ExampleSample:
    """The same random sample of test examples for every model of an experiment."""
    return ExampleSample.draw(feats, "test", h.budget.eval_examples, seed=0)


def candidate_arm(
    h: Harness,
    train_feats: Features,
    overrides: Sequence[str],
    seed: int,
    *,
    eval_feats: Features | None = None,
) -> dict[str, Any]:
    """Train (or find) one candidate model and score it on the held-out sample.

    eval_feats: the features whose test split is scored (default: the training ones);
    they must share the item vocabulary (same world and split, e.g. other labels).
    Returns the training summary with "metrics", "ci" (bootstrap 95% of map@100) and
    "examples_per_s"."""
    ev = eval_feats or train_feats
    run = h.candidate_run(train_feats, overrides, seed)
    # the same data and item vocabulary, or the scores would name other items
    check_features(read_candidate_config(run["artifact"]), ev, run["artifact"])
    sample = heldout_sample(h, ev)

    def score() -> dict[str, Any]:
        model = load_candidate_model(run["artifact"])
        ranks = example_ranks({"m": ModelScorer(model)}, ev, sample).ranks["m"]
        return {
            "metrics": summary(ranks, (10, 50, 100)),
            "ci_map@100": bootstrap_ci(per_example(ranks, "map@100")),
            "ci_recall@100": bootstrap_ci(per_example(ranks, "recall@100")),
        }

    scored = h.cached(
        "cand-eval",
        {"model": run["artifact"], "features": ev.path.name, "n": len(sample.positions)},
        score,
    )
    return {**run, **scored}


def pm(mean: float, sd: float, digits: int = 4) -> str:
    """ "mean ± sd" (just the mean when sd is 0: one seed)."""
    return f"{mean:.{digits}f}" if sd == 0 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def rel(a: float, b: float) -> str:
    """a relative to b in percent, e.g. '+12%'."""
    if not b:
        return "n/a"
    return f"{100 * (a / b - 1):+.1f}%"


def seeds_note(h: Harness) -> str:
    n = len(h.seeds)
    return (
        f"mean ± sd over {n} training seeds"
        if n > 1
        else "one training seed (no spread over seeds)"
    )


def arm_ranks(h: Harness, arm: dict[str, Any], ev: Features) -> list[float]:
    """Each sampled held-out example's target rank under a trained arm's model (cached),
    in sample order: for paired comparisons of two models on the same examples."""
    sample = heldout_sample(h, ev)

    def ranks() -> dict[str, Any]:
        model = load_candidate_model(arm["artifact"])
        r = example_ranks({"m": ModelScorer(model)}, ev, sample).ranks["m"]
        return {"ranks": [float(x) if np.isfinite(x) else None for x in r]}

    key = {"model": arm["artifact"], "features": ev.path.name, "n": len(sample.positions)}
    return [
        math.inf if x is None else float(x) for x in h.cached("cand-ranks", key, ranks)["ranks"]
    ]
