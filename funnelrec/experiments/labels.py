"""`funnelrec experiment labels` (the paper's Fig. 5, Covington et al. 2016, section 3.4):
predicting the next watch from the history before it ("rollback") against predicting a
randomly held-out watch from the history on both sides of it, both scored on predicting
the next watch.

The two feature sets differ only in `FeaturesConfig.labels` ("next" or "random"); they are
built from the same world and split, so their vocabularies and held-out examples agree,
and both models are scored on the next-watch test examples of the "next" features, with
the items watched before the target excluded from the ranking (the protocol of every
experiment) and without that exclusion. The distinction matters here: a model trained on
random held-out labels sees the watches after its label in the history, and learns to
predict items the user also watched; seen items then compete with the next watch unless
they are excluded.
"""

from __future__ import annotations

from typing import Any

from funnelrec.errors import FunnelrecError
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
from funnelrec.experiments.evaluation import paired_interval
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.verdict import Check, checks_table, verdict

NAME = "labels"
NEXT, RANDOM = "next watch (rollback)", "random held-out watch"
ARMS = {NEXT: "labels=next", RANDOM: "labels=random"}
METRIC = "map@100"
COLUMNS = ("recall@10", "recall@100", "ndcg@10", "mrr")
EXCLUSION = {"ranks": "excluded", "ranks_seen_included": "included"}


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    base = time_features(h)
    feats = {NEXT: base, RANDOM: time_features(h, ["labels=random", "ranking=false"])}
    if feats[RANDOM].vocab("item").values.tolist() != base.vocab("item").values.tolist():
        raise FunnelrecError("labels: the two feature sets have different item vocabularies")
    specs = {
        label: [ArmSpec(f, (), seed, eval_feats=base, seen_included=True) for seed in h.seeds]
        for label, f in feats.items()
    }
    train_arms(h, [s for ss in specs.values() for s in ss])
    arms = {
        label: [
            candidate_arm(h, s.feats, s.overrides, s.seed, eval_feats=base, seen_included=True)
            for s in ss
        ]
        for label, ss in specs.items()
    }
    doc = _document(h, arms)
    h.finish(NAME, doc, timer)
    return doc


def _checks(arms: dict[str, list[dict[str, Any]]]) -> list[Check]:
    """Next-watch labels against random ones on the next watch, seen items excluded and
    not."""
    return [
        Check(
            f"next-watch labels beat random held-out labels (seen {word})",
            "next - random",
            ">",
            paired_interval(per_seed(arms[NEXT], METRIC, r), per_seed(arms[RANDOM], METRIC, r)),
            f"{METRIC}, seen items {word}",
        )
        for r, word in EXCLUSION.items()
    ]


def _document(h: Harness, arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cells = {
        (label, r): {m: cell(runs, m, r) for m in (METRIC, *COLUMNS)}
        for r in EXCLUSION
        for label, runs in arms.items()
    }
    rows = [
        [label, EXCLUSION[r], ci_text(c[METRIC]), *(f"{c[m].mean:.4f}" for m in COLUMNS)]
        for (label, r), c in cells.items()
    ]
    checks = _checks(arms)
    runs = [a for runs in arms.values() for a in runs]
    text = (
        "Both models are scored on the same next watches of the test period, with the "
        "items the user watched before excluded from the ranking (as in every experiment) "
        "and without that exclusion."
    )
    return {
        "title": "Labels (Fig. 5): next watch vs random held-out watch",
        "claim": "Predicting the next watch from the history before it beats predicting a "
        "randomly held-out watch from the history around it, when both are scored on the "
        "next watch (A/B and offline).",
        "protocol": f"{h.options.preset} world, time split, both models trained on the "
        f"training window under the same rule (d = {h.budget.cand_dim}, depth 2); "
        f"{h.budget.eval_examples or 'all'} next watches of the test period sampled at "
        "random, scored with the items watched before excluded and with them included; "
        f"{seeds_note(h)}; {convergence_note(h, runs)}.",
        "tables": [
            checks_table(checks),
            {
                "title": "held-out next watch, mean over seeds (map@100 with its 95% interval)",
                "columns": ["training labels", "seen items", f"{METRIC} [95% CI]", *COLUMNS],
                "rows": rows,
            },
        ],
        "figures": [
            {
                "name": "labels",
                "kind": "bar",
                "title": f"held-out next watch by training labels ({METRIC}, 95% CI)",
                "categories": [f"seen {w}" for w in EXCLUSION.values()],
                "ylabel": METRIC,
                "series": [
                    {
                        "label": label,
                        "y": [cells[(label, r)][METRIC].mean for r in EXCLUSION],
                        "yerr": yerr([cells[(label, r)][METRIC] for r in EXCLUSION]),
                    }
                    for label in arms
                ],
            }
        ],
        "verdict": verdict(checks, text),
        "results": {
            "cells": {
                f"{label} | seen {EXCLUSION[r]}": {m: iv.to_list() for m, iv in c.items()}
                for (label, r), c in cells.items()
            },
            "checks": [c.to_dict() for c in checks],
        },
    }
