"""`funnelrec experiment labels` (the paper's Fig. 5, Covington et al. 2016, section 3.4):
predicting the next watch from the history before it ("rollback") against predicting a
randomly held-out watch from the history on both sides of it, both scored on predicting
the next watch.

The two feature sets differ only in `FeaturesConfig.labels` ("next" or "random"); they are
built from the same world and split, so their vocabularies and held-out examples agree,
and both models are scored on the next-watch test examples of the "next" features.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from funnelrec.errors import FunnelrecError
from funnelrec.experiments.common import (
    CAND_METRICS,
    arm_ranks,
    candidate_arm,
    pm,
    rel,
    seeds_note,
    time_features,
)
from funnelrec.experiments.evaluation import mean_sd, paired_diff_ci, per_example
from funnelrec.experiments.harness import Harness, Timer

NAME = "labels"
ARMS = {"next watch (rollback)": "labels=next", "random held-out watch": "labels=random"}


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    base = time_features(h)
    feats = {
        label: base if flag == "labels=next" else time_features(h, [flag, "ranking=false"])
        for label, flag in ARMS.items()
    }
    if feats["random held-out watch"].vocab("item").values.tolist() != (
        base.vocab("item").values.tolist()
    ):
        raise FunnelrecError("labels: the two feature sets have different item vocabularies")
    arms = {
        label: [candidate_arm(h, f, [], seed, eval_feats=base) for seed in h.seeds]
        for label, f in feats.items()
    }
    stats = {
        label: {m: mean_sd([r["metrics"][m] for r in runs]) for m in CAND_METRICS}
        for label, runs in arms.items()
    }
    rows = [
        [
            label,
            *(pm(*stats[label][m]) for m in CAND_METRICS),
            "[{:.4f}, {:.4f}]".format(*arms[label][0]["ci_map@100"]),
        ]
        for label in arms
    ]
    nxt, rnd = stats["next watch (rollback)"], stats["random held-out watch"]
    gain = rel(nxt["map@100"][0], rnd["map@100"][0])
    gain_r = rel(nxt["recall@100"][0], rnd["recall@100"][0])
    # paired on the same test examples (seed 0): next minus random, per example
    r_next = np.asarray(arm_ranks(h, arms["next watch (rollback)"][0], base))
    r_rand = np.asarray(arm_ranks(h, arms["random held-out watch"][0], base))
    diff = paired_diff_ci(per_example(r_next, "map@100"), per_example(r_rand, "map@100"))
    holds = "yes" if diff[1] > 0 else "no" if diff[2] < 0 else "unclear"
    text = (
        f"Next-watch labels reach map@100 {nxt['map@100'][0]:.4f} against "
        f"{rnd['map@100'][0]:.4f} for random held-out labels ({gain}; recall@100 {gain_r}); "
        f"paired difference {diff[0]:+.4f}, 95% CI [{diff[1]:+.4f}, {diff[2]:+.4f}]. "
        + (
            "Predicting the next watch is better, as in the paper: the simulated world's "
            "co-watch is asymmetric (series are watched in order, users drift from popular "
            "to niche), and a random label's history on both sides of it leaks the future."
            if holds == "yes"
            else (
                "Random held-out labels are better here, against the paper."
                if holds == "no"
                else "The difference is within noise: the paper's clear win is not reproduced."
            )
            + " The simulated users' interests are stationary topic mixtures, so the watches "
            "on both sides of a random label describe the same interests; the asymmetric "
            "structure that makes rollback win (series watched in order, drift from popular "
            "to niche) drives only part of the simulated watches, and an unordered bag of "
            "history trained for a fraction of an epoch hardly uses it."
        )
    )
    doc = {
        "title": "Labels (Fig. 5): next watch vs random held-out watch",
        "claim": "Predicting the next watch from the history before it beats predicting a "
        "randomly held-out watch from the history around it, when both are scored on the "
        "next watch (A/B and offline).",
        "protocol": f"{h.options.preset} world, time split, both models trained on the "
        "training window with the same budget "
        f"({h.budget.cand_steps} steps of {h.budget.cand_batch}, d = {h.budget.cand_dim}, "
        f"depth 2); {h.budget.eval_examples or 'all'} next watches of the test period sampled "
        f"at random, seen items excluded; paired bootstrap interval of the map@100 difference "
        f"on the same examples; {seeds_note(h)}.",
        "tables": [
            {
                "title": "held-out next watch",
                "columns": ["training labels", *CAND_METRICS, "map@100 95% CI (seed 0)"],
                "rows": rows,
            }
        ],
        "figures": [
            {
                "name": "labels",
                "kind": "bar",
                "title": "held-out next watch by training labels",
                "categories": list(CAND_METRICS),
                "ylabel": "metric",
                "series": [
                    {
                        "label": label,
                        "y": [stats[label][m][0] for m in CAND_METRICS],
                        "yerr": [stats[label][m][1] for m in CAND_METRICS],
                    }
                    for label in arms
                ],
            }
        ],
        "verdict": {"holds": holds, "text": text},
        "results": {"stats": stats, "paired_map@100_difference": diff},
    }
    h.finish(NAME, doc, timer)
    return doc
