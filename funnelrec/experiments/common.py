"""Pieces several experiments share: training and scoring candidate-model arms (in
parallel where the budget allows), per-example values over seeds for paired intervals,
and the notes every protocol states (seeds, the convergence rule and where runs stopped).

    specs = [ArmSpec(feats, ["depth=3"], seed) for seed in h.seeds]
    train_arms(h, specs)                        # budget.workers processes at once
    arms = [candidate_arm(h, s.feats, s.overrides, s.seed) for s in specs]   # cached
    per_seed(arms, "map@100")                   # [seeds, examples] for paired_interval
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from funnelrec.candidates import check_features, load_candidate_model, read_candidate_config
from funnelrec.candidates.metrics import ModelScorer, Scorer
from funnelrec.experiments.evaluation import (
    ExampleSample,
    Interval,
    example_ranks,
    mean_interval,
    per_example,
    summary,
)
from funnelrec.experiments.harness import Harness, Job
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


@dataclass(frozen=True)
class ArmSpec:
    """One candidate-model run of an experiment: trained on `feats` with `overrides` and
    `seed`, scored on the test sample of `eval_feats` (default: `feats`), with the ranks
    of seen items kept as well when `seen_included`."""

    feats: Features
    overrides: Sequence[str] = ()
    seed: int = 0
    eval_feats: Features | None = None
    seen_included: bool = False

    def job(self) -> tuple[Any, ...]:
        ev = self.eval_feats.path if self.eval_feats is not None else None
        return (self.feats.path, list(self.overrides), self.seed, ev, self.seen_included)


def _arm_job(
    h: Harness,
    train: Any,
    overrides: list[str],
    seed: int,
    ev: Any,
    seen_included: bool,
) -> None:
    """A worker's part of `train_arms`: the arm trained and scored, left in the cache."""
    feats = Features.open(train)
    candidate_arm(
        h,
        feats,
        overrides,
        seed,
        eval_feats=Features.open(ev) if ev is not None else None,
        seen_included=seen_included,
    )


def arm_jobs(h: Harness, specs: Sequence[ArmSpec]) -> list[Job]:
    """The `Harness.parallel` jobs that train and score the arms of `specs` whose models
    are not trained yet (scoring a trained one is left to the experiment's own call)."""
    return [
        (_arm_job, s.job()) for s in specs if not h.candidate_trained(s.feats, s.overrides, s.seed)
    ]


def train_arms(h: Harness, specs: Sequence[ArmSpec]) -> None:
    """Train and score every arm of `specs` (`Harness.parallel`: budget.workers at once;
    list the longest first)."""
    h.parallel(arm_jobs(h, specs))


def candidate_arm(
    h: Harness,
    train_feats: Features,
    overrides: Sequence[str],
    seed: int,
    *,
    eval_feats: Features | None = None,
    seen_included: bool = False,
) -> dict[str, Any]:
    """Train (or find) one candidate model and score it on the held-out sample.

    eval_feats: the features whose test split is scored (default: the training ones);
    they must share the item vocabulary (same world and split, e.g. other labels).
    Returns the training summary with "ranks" ([n] exact rank of each sampled example's
    target, seen items excluded; inf = miss), "metrics" (means of them) and, with
    `seen_included`, "ranks_seen_included" and "metrics_seen_included" (nothing excluded).
    """
    ev = eval_feats or train_feats
    run = h.candidate_run(train_feats, overrides, seed)
    # the same data and item vocabulary, or the scores would name other items
    check_features(read_candidate_config(run["artifact"]), ev, run["artifact"])
    sample = heldout_sample(h, ev)

    def score() -> dict[str, Any]:
        model = load_candidate_model(run["artifact"])
        scorers: dict[str, Scorer] = {"m": ModelScorer(model)}
        out = {"ranks": _to_json(example_ranks(scorers, ev, sample).ranks["m"])}
        if seen_included:
            r = example_ranks(scorers, ev, sample, exclude_seen=False).ranks["m"]
            out["ranks_seen_included"] = _to_json(r)
        return out

    key = {
        "model": run["artifact"],
        "features": ev.path.name,
        "n": len(sample.positions),
        "seen_included": seen_included,
    }
    scored = h.cached("cand-ranks", key, score)
    arm = {**run, "ranks": _from_json(scored["ranks"])}
    arm["metrics"] = summary(arm["ranks"], (10, 50, 100))
    if seen_included:
        arm["ranks_seen_included"] = _from_json(scored["ranks_seen_included"])
        arm["metrics_seen_included"] = summary(arm["ranks_seen_included"], (10, 50, 100))
    return arm


def _to_json(ranks: np.ndarray) -> list[float | None]:
    return [float(x) if np.isfinite(x) else None for x in ranks]


def _from_json(ranks: list[float | None]) -> np.ndarray:
    return np.array([math.inf if x is None else x for x in ranks], dtype=np.float64)


def per_seed(arms: Sequence[dict[str, Any]], metric: str, ranks: str = "ranks") -> np.ndarray:
    """[seeds, examples]: each example's contribution to `metric` under each seed's model
    (`ranks`: "ranks" or "ranks_seen_included"), for `paired_interval`."""
    return np.stack([per_example(a[ranks], metric) for a in arms])


def cell(arms: Sequence[dict[str, Any]], metric: str, ranks: str = "ranks") -> Interval:
    """The mean of `metric` over seeds and examples, with its 95% interval."""
    return mean_interval(per_seed(arms, metric, ranks))


def ci_text(iv: Interval, digits: int = 4) -> str:
    """'0.0243 [0.0200, 0.0289]'."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(iv.mean)} [{f.format(iv.lo)}, {f.format(iv.hi)}]"


def pm(mean: float, sd: float, digits: int = 4) -> str:
    """ "mean ± sd" (just the mean when sd is 0: one seed)."""
    return f"{mean:.{digits}f}" if sd == 0 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def yerr(ivs: Sequence[Interval]) -> list[list[float]]:
    """A figure's asymmetric error bars [[below...], [above...]] from intervals."""
    return [[max(0.0, iv.mean - iv.lo) for iv in ivs], [max(0.0, iv.hi - iv.mean) for iv in ivs]]


def rel(a: float, b: float) -> str:
    """a relative to b in percent, e.g. '+12%'."""
    if not b:
        return "n/a"
    return f"{100 * (a / b - 1):+.1f}%"


def seeds_note(h: Harness) -> str:
    n = len(h.seeds)
    return (
        f"{n} training seeds per arm (0-{n - 1}), the same for every arm; 95% intervals "
        "resample seeds and units together, paired between arms"
        if n > 1
        else "one training seed per arm (intervals over units only)"
    )


def convergence_note(h: Harness, runs: Sequence[dict[str, Any]], stage: str = "candidates") -> str:
    """The convergence rule and where the runs `runs` (training summaries) stopped."""
    b = h.budget
    if stage == "candidates":
        every, most, batch = b.cand_eval_every, b.cand_max_steps, b.cand_batch
        metric = f"validation Recall@100 ({b.valid_examples:,} examples)"
        best = [r.get("best_step") for r in runs]
        early = [bool(r.get("stopped_early")) for r in runs]
    else:
        every, most, batch = b.rank_eval_every, b.rank_max_steps, b.rank_batch
        metric = "validation weighted per-user loss"
        best = [r["training"].get("best_step") for r in runs]
        early = [bool(r["training"].get("stopped_early")) for r in runs]
    steps = [s for s in best if s is not None]
    where = (
        f"best weights at {min(steps):,}-{max(steps):,} steps (median {int(np.median(steps)):,})"
        if steps
        else "no evaluation ran"
    )
    return (
        f"every run trained until {metric} had not improved for {b.patience} evaluations "
        f"{every} steps apart (batches of {batch:,}; at most {most:,} steps), the best "
        f"weights kept: {where}; {sum(early)} of {len(runs)} runs stopped by the rule, "
        f"{len(runs) - sum(early)} at the maximum"
    )
