"""`funnelrec experiment examples-per-user` (Covington et al. 2016, section 3.4): a fixed
number of training examples per user against all of them, scored separately for light,
medium and heavy users.

Both models train under the same convergence rule (`Harness.convergence`: the same
validation examples, evaluation interval and patience); the uncapped features draw most
examples from heavy users, the capped ones (`FeaturesConfig.cap`, 30 by default) spread
them evenly. Users are split into terciles by their number of training watches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from funnelrec.candidates import load_candidate_model
from funnelrec.candidates.metrics import ModelScorer
from funnelrec.data.dataset import Dataset
from funnelrec.experiments.common import (
    ArmSpec,
    candidate_arm,
    ci_text,
    convergence_note,
    rel,
    seeds_note,
    time_features,
    train_arms,
    yerr,
)
from funnelrec.experiments.evaluation import (
    ExampleSample,
    Interval,
    example_ranks,
    mean_interval,
    paired_interval,
    per_example,
)
from funnelrec.experiments.harness import Harness, Timer, stable_hash
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features
from funnelrec.features.loader import read_examples
from funnelrec.serving.package import training_watches

NAME = "examples-per-user"
METRIC = "recall@100"
GROUPS = ("light", "medium", "heavy")


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    capped = time_features(h)
    cap = capped.config.cap
    uncapped = time_features(h, ["cap=none", "ranking=false"])
    n_train = _training_watches_per_user(h, capped)
    cuts = np.quantile(n_train[n_train > 0], [1 / 3, 2 / 3])
    share_rows = _share_rows(n_train, cuts, cap)
    sample, group_of = _stratified_sample(h, capped, n_train, cuts)
    group = group_of[sample.positions]
    arms_def = {f"capped ({cap} per user)": capped, "uncapped (all watches)": uncapped}
    train_arms(
        h,
        [ArmSpec(f, (), seed, eval_feats=capped) for f in arms_def.values() for seed in h.seeds],
    )
    arms = {
        label: [_arm(h, feats, capped, sample, group, seed) for seed in h.seeds]
        for label, feats in arms_def.items()
    }
    # all test examples: the group means weighted by each group's share of them
    weight = {g: float((group_of == i).mean()) for i, g in enumerate(GROUPS)}
    doc = _document(h, cap, arms, group, weight, cuts, share_rows)
    h.finish(NAME, doc, timer)
    return doc


def _training_watches_per_user(h: Harness, feats: Features) -> np.ndarray:
    """[max user id + 1] each user's number of training watches."""
    train = training_watches(Dataset.open(h.data()), feats)
    return np.bincount(np.asarray(train.column("user_id").to_numpy(), dtype=np.int64))


def _share_rows(n_train: np.ndarray, cuts: np.ndarray, cap: int | None) -> list[list[str]]:
    """Per activity group: its users, and its share of the training examples uncapped
    and capped."""
    active = n_train[n_train > 0]
    capped_n = np.minimum(active, cap) if cap else active
    rows = []
    for g, (lo, hi) in zip(GROUPS, [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], np.inf)],
                           strict=True):  # fmt: skip
        in_g = (active > lo) & (active <= hi) if g != "light" else active <= hi
        rows.append(
            [
                g,
                f"{int(lo) + (g != 'light')}-{'' if np.isinf(hi) else int(hi)}",
                f"{in_g.sum():,}",
                f"{active[in_g].sum() / active.sum():.1%}",
                f"{capped_n[in_g].sum() / capped_n.sum():.1%}",
            ]
        )
    return rows


def _stratified_sample(
    h: Harness, feats: Features, n_train: np.ndarray, cuts: np.ndarray
) -> tuple[ExampleSample, np.ndarray]:
    """As many test examples from each activity group (heavy users hold most test
    examples, so a uniform sample would say little about light users), and the group of
    every test example."""
    test_users = np.asarray(
        read_examples(feats, "candidates", "test", ["user_id"]).column("user_id").to_numpy(),
        dtype=np.int64,
    )
    group_of = np.digitize(n_train[np.minimum(test_users, n_train.size - 1)], cuts, right=True)
    group_of = np.where(test_users < n_train.size, group_of, 0)  # no training watches: light
    per_group = (h.budget.eval_examples or test_users.size) // len(GROUPS)
    rng = np.random.default_rng(0)
    positions = np.sort(
        np.concatenate(
            [
                rng.choice(idx, min(per_group, idx.size), replace=False)
                for idx in (np.flatnonzero(group_of == i) for i in range(len(GROUPS)))
            ]
        )
    )
    return ExampleSample("test", positions, test_users.size), group_of


def _arm(
    h: Harness,
    feats: Features,
    capped: Features,
    sample: ExampleSample,
    group: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """A model trained on `feats`: its hits on the sample (cached) and recall by group."""
    arm = candidate_arm(h, feats, [], seed, eval_feats=capped)

    def score() -> dict[str, Any]:
        model = load_candidate_model(arm["artifact"])
        r = example_ranks({"m": ModelScorer(model)}, capped, sample).ranks["m"]
        return {"hits": per_example(r, METRIC).tolist()}

    key = {"model": arm["artifact"], "positions": stable_hash(sample.positions.tolist())}
    hits = np.asarray(h.cached("epu-hits", key, score)["hits"])
    by_group = {g: float(hits[group == i].mean()) for i, g in enumerate(GROUPS)}
    return {**arm, "groups": by_group, "hits": hits}


def _values(
    runs: list[dict[str, Any]], group: np.ndarray, weight: dict[str, float]
) -> dict[str, np.ndarray]:
    """Per group: [seeds, examples of the group] hits; "all": [seeds, examples] hits
    weighted so that their mean weighs the groups by their shares of all test examples."""
    hits = np.stack([r["hits"] for r in runs])
    out = {g: hits[:, group == i] for i, g in enumerate(GROUPS)}
    w = np.zeros(group.shape, dtype=np.float64)
    for i, g in enumerate(GROUPS):
        n = int((group == i).sum())
        w[group == i] = weight[g] * group.size / max(n, 1)
    out["all"] = hits * w
    return out


def _table(
    arms: dict[str, list[dict[str, Any]]], group: np.ndarray, weight: dict[str, float]
) -> tuple[dict[str, dict[str, Interval]], dict[str, Interval], list[list[str]]]:
    """Each arm's recall by group over seeds, the paired difference per group (capped
    minus uncapped), and the table's rows of both."""
    values = {label: _values(runs, group, weight) for label, runs in arms.items()}
    cols = (*GROUPS, "all")
    stats = {label: {g: mean_interval(v[g]) for g in cols} for label, v in values.items()}
    labels = list(arms)
    rows = [[label, *(ci_text(stats[label][g]) for g in cols)] for label in labels]
    diffs = {g: paired_interval(values[labels[0]][g], values[labels[1]][g]) for g in cols}
    rows.append(["difference (capped - uncapped)", *(diffs[g].text() for g in cols)])
    return stats, diffs, rows


def _document(
    h: Harness,
    cap: int | None,
    arms: dict[str, list[dict[str, Any]]],
    group: np.ndarray,
    weight: dict[str, float],
    cuts: np.ndarray,
    share_rows: list[list[str]],
) -> dict[str, Any]:
    n_per_group = {g: int((group == i).sum()) for i, g in enumerate(GROUPS)}
    labels = list(arms)
    stats, diffs, rows = _table(arms, group, weight)
    checks = [
        Check(
            "a fixed number of examples per user helps light users",
            "capped - uncapped",
            ">",
            diffs["light"],
            f"{METRIC} of light users",
        )
    ]
    c, u = stats[labels[0]], stats[labels[1]]
    text = (
        f"Capping changes {METRIC} of light users by {rel(c['light'].mean, u['light'].mean)}, "
        f"heavy users by {rel(c['heavy'].mean, u['heavy'].mean)}, all users by "
        f"{rel(c['all'].mean, u['all'].mean)}."
    )
    runs = [a for runs in arms.values() for a in runs]
    return {
        "title": "Examples per user: capped vs uncapped, by user activity",
        "claim": "Generating a fixed number of training examples per user weighs users "
        "equally in the loss and keeps a few heavy users from dominating it.",
        "protocol": f"{h.options.preset} world, time split; capped features take {cap} "
        "training watches per user at random, uncapped ones all; users are split into "
        "terciles of their number of training watches; "
        f"test next watches sampled at random within each group (light "
        f"{n_per_group['light']}, medium {n_per_group['medium']}, heavy "
        f"{n_per_group['heavy']}); 'all' weighs the groups by their shares of all test "
        f"examples; {METRIC}, seen items excluded; {seeds_note(h)}; "
        f"{convergence_note(h, runs)}.",
        "tables": [
            checks_table(checks),
            {
                "title": f"{METRIC} by user activity, mean over seeds [95% CI]",
                "columns": ["training examples", *GROUPS, "all"],
                "rows": rows,
            },
            {
                "title": "who the training examples come from",
                "columns": [
                    "users",
                    "training watches",
                    "users",
                    "uncapped share",
                    "capped share",
                ],
                "rows": share_rows,
            },
        ],
        "figures": [
            {
                "name": "examples_per_user",
                "kind": "bar",
                "title": f"held-out {METRIC} by user activity (95% CI)",
                "categories": [*GROUPS, "all"],
                "ylabel": METRIC,
                "series": [
                    {
                        "label": label,
                        "y": [stats[label][g].mean for g in (*GROUPS, "all")],
                        "yerr": yerr([stats[label][g] for g in (*GROUPS, "all")]),
                    }
                    for label in labels
                ],
            }
        ],
        "verdict": verdict(checks, text),
        "results": {
            "stats": {k: {g: iv.to_list() for g, iv in v.items()} for k, v in stats.items()},
            "paired_difference": {g: iv.to_list() for g, iv in diffs.items()},
            "tercile_cuts": cuts.tolist(),
            "n_per_group": n_per_group,
        },
    }
