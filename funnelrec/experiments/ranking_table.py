"""`funnelrec experiment ranking-table` (the paper's Table 1): weighted per-user loss of the
ranker for the paper's hidden-layer configurations, plus the two ablations: continuous
features without x^2 / sqrt(x), and positives and negatives weighted equally (CTR).

`Budget.rank_table` = "depth" leaves out the rows of other widths at the same depth
(512, 1024, 1024->512), to save time. Every ranker is trained on the same ranking
examples of the time split to convergence
under the same rule (`Harness.convergence`: validation weighted per-user loss) and
scored on the test period's logged pages (`evaluate_ranker`); the losses are compared
user by user (`harness.ranker_user_losses`). A larger version on the medium world lives
in benchmarks/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from funnelrec.experiments.common import convergence_note, seeds_note, time_features
from funnelrec.experiments.evaluation import Interval, mean_sd, paired_interval
from funnelrec.experiments.harness import Harness, Job, Timer
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features

NAME = "ranking-table"
BEST = "1024->512->256"
# (label, overrides, the paper's weighted per-user loss in %)
CONFIGS: list[tuple[str, list[str], float]] = [
    ("none", ["model.tower=none"], 41.6),
    ("256", ["model.tower=256"], 36.9),
    ("512", ["model.tower=512"], 36.7),
    ("1024", ["model.tower=1024"], 35.8),
    ("512->256", ["model.tower=512,256"], 35.2),
    ("1024->512", ["model.tower=1024,512"], 34.7),
    (BEST, ["model.tower=1024,512,256"], 34.6),
    (f"{BEST}, no x^2 / sqrt(x)", ["model.tower=1024,512,256", "model.power_features=false"], 34.8),
    (f"{BEST}, unit weights (CTR)", ["model.tower=1024,512,256", "model.objective=ctr"], 38.7),
]
WLR_BEST = CONFIGS[6]
NO_POWER = CONFIGS[7]
CTR = CONFIGS[8]
# The rows a "depth" table leaves out (`Budget.rank_table`): the other widths at a depth.
PER_WIDTH = ("512", "1024", "1024->512")


def _ranker_job(h: Harness, feats: Path, overrides: list[str], seed: int) -> None:
    """A worker's part of `train_rankers`: one ranker trained and scored, left cached."""
    h.ranker_run(Features.open(feats), overrides, seed)


def ranker_jobs(h: Harness, feats: Features, configs: list[list[str]]) -> list[Job]:
    """The `Harness.parallel` jobs that train every configuration with every seed (those
    not trained yet)."""
    return [
        (_ranker_job, (feats.path, c, s))
        for c in configs
        for s in h.seeds
        if not h.ranker_trained(feats, c, s)
    ]


def train_rankers(h: Harness, feats: Features, configs: list[list[str]]) -> None:
    """Train every configuration with every seed (`Harness.parallel`)."""
    h.parallel(ranker_jobs(h, feats, configs))


def configs(h: Harness) -> list[tuple[str, list[str], float]]:
    """The rows of the table the budget asks for (`Budget.rank_table`)."""
    if h.budget.rank_table == "all":
        return CONFIGS
    return [c for c in CONFIGS if c[0] not in PER_WIDTH]


def arms(h: Harness) -> dict[str, list[dict[str, Any]]]:
    """Every configuration's rankers (one per seed), trained once (shared with funnel-ab)."""
    feats = time_features(h)
    rows = configs(h)
    # the widest towers first: they take longest
    train_rankers(h, feats, [overrides for _, overrides, _ in reversed(rows)])
    return {
        label: [h.ranker_run(feats, overrides, seed) for seed in h.seeds]
        for label, overrides, _ in rows
    }


def user_losses(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """([seeds, users] mispredicted, [seeds, users] total watch time) of test users."""
    users = runs[0]["test_users"]["user_id"]
    for r in runs:
        if r["test_users"]["user_id"] != users:
            raise ValueError("rankers scored on different test users")
    wrong = np.array([r["test_users"]["wrong"] for r in runs], dtype=np.float64)
    total = np.array([r["test_users"]["total"] for r in runs], dtype=np.float64)
    return wrong, total


def loss_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Interval:
    """Weighted per-user loss of arm a minus arm b (fractions), paired by user and seed."""
    wa, ta = user_losses(a)
    wb, tb = user_losses(b)
    return paired_interval(wa, wb, den_a=ta, den_b=tb)


def loss_interval(runs: list[dict[str, Any]]) -> Interval:
    """One arm's weighted per-user loss (a fraction) with its interval."""
    w, t = user_losses(runs)
    return paired_interval(w, np.zeros_like(w), den_a=t)


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    runs = arms(h)
    first = runs[CONFIGS[0][0]][0]["test"]
    random_pct = 100 * first["random"]["weighted_per_user_loss"]
    oracle_pct = 100 * first.get("oracle", {}).get("weighted_per_user_loss", np.nan)
    doc = _document(h, runs, random_pct, oracle_pct)
    h.finish(NAME, doc, timer)
    return doc


def _config_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's test-period metrics over its seeds."""
    cb = mean_sd([r["test"].get("clickbait", {}).get("model_top_k_share", np.nan)
                  for r in runs])  # fmt: skip
    best = [r["training"].get("best_step") or 0 for r in runs]
    return {
        "wpul": loss_interval(runs),
        "auc": mean_sd([r["test"]["model"]["auc"] for r in runs]),
        "clickbait_top10": cb,
        "best_step": int(np.median(best)),
        "examples_per_s": float(np.mean([r["training"]["examples_per_s"] for r in runs])),
    }


def _checks(runs: dict[str, list[dict[str, Any]]]) -> list[Check]:
    """Hidden layers, x^2 / sqrt(x) and watch-time weights each lower the loss."""
    best = runs[BEST]

    def points(name: str, compared: str, expect: Literal[">", "<"], iv: Interval) -> Check:
        metric = "weighted per-user loss, test period"
        return Check(name, compared, expect, iv, metric, scale=100.0, digits=2, unit="points")

    return [
        points("hidden layers lower the loss", f"{BEST} - none", "<",
               loss_difference(best, runs["none"])),
        points("x^2 / sqrt(x) of the continuous features lower the loss", "without - with",
               ">", loss_difference(runs[NO_POWER[0]], best)),
        points("weighting positives by watch time lowers the loss",
               "unit weights (CTR) - watch-time weights", ">",
               loss_difference(runs[CTR[0]], best)),
    ]  # fmt: skip


def _document(
    h: Harness, runs: dict[str, list[dict[str, Any]]], random_pct: float, oracle_pct: float
) -> dict[str, Any]:
    rows_of = [c for c in CONFIGS if c[0] in runs]
    stats = {label: _config_stats(runs[label]) for label, _, _ in rows_of}
    checks = _checks(runs)
    rows = [
        [
            label,
            f"{100 * st['wpul'].mean:.2f} [{100 * st['wpul'].lo:.2f}, {100 * st['wpul'].hi:.2f}]",
            f"{paper:.1f}",
            f"{st['auc'][0]:.4f}",
            f"{st['clickbait_top10'][0]:.4f}",
            f"{st['best_step']:,}",
            f"{st['examples_per_s']:,.0f}",
        ]
        for label, _, paper in rows_of
        for st in [stats[label]]
    ]
    text = (
        f"Random order {random_pct:.2f}%, the simulator's true expected watch time "
        f"{oracle_pct:.2f}%."
    )
    all_runs = [r for rs in runs.values() for r in rs]
    loss = {label: st["wpul"] for label, st in stats.items()}
    return {
        "title": "Ranking (Table 1): weighted per-user loss by hidden layers",
        "claim": "Wider and deeper hidden layers lower the weighted per-user loss (41.6% with "
        "none to 34.6% with 1024->512->256); without x^2 / sqrt(x) it rises 0.2 points; "
        "weighting positives and negatives equally raises it 4.1 points.",
        "protocol": f"{h.options.preset} world, time split; rankers trained on the training "
        f"window's impressions (batches of {h.budget.rank_batch}, AdamW lr "
        f"{h.budget.rank_lr}); weighted per-user loss on the test period's logged pages: "
        "for each (user, page), every clicked x unclicked pair whose unclicked impression "
        "scores higher counts the clicked one's watch time as mispredicted; loss = "
        "mispredicted / total watch time of the pairs, compared user by user; "
        f"{seeds_note(h)}; {convergence_note(h, all_runs, 'ranker')}.",
        "tables": [
            checks_table(checks),
            {
                "title": "ranker on the test period (loss in % [95% CI], paper beside; AUC and "
                "clickbait: mean over seeds)",
                "columns": [
                    "hidden layers",
                    "weighted per-user loss %",
                    "paper %",
                    "AUC (clicks)",
                    "high-clickbait share of top 10",
                    "steps to best (median)",
                    "train ex/s",
                ],
                "rows": rows,
                "note": f"random order {random_pct:.2f}%, truth's expected watch time "
                f"{oracle_pct:.2f}%",
            },
        ],
        "figures": [
            {
                "name": "ranking_table",
                "kind": "bar",
                "title": "weighted per-user loss (test period; 95% CI)",
                "categories": [label for label, _, _ in rows_of],
                "ylabel": "weighted per-user loss %",
                "series": [
                    {
                        "label": "funnelrec",
                        "y": [100 * loss[label].mean for label, _, _ in rows_of],
                        "yerr": [
                            [100 * (loss[label].mean - loss[label].lo) for label, _, _ in rows_of],
                            [100 * (loss[label].hi - loss[label].mean) for label, _, _ in rows_of],
                        ],
                    },
                    {"label": "paper", "y": [p for _, _, p in rows_of]},
                ],
                "hlines": [{"y": random_pct, "label": "random order"}]
                + (
                    [{"y": oracle_pct, "label": "truth", "color": "green"}]
                    if np.isfinite(oracle_pct)
                    else []
                ),
            }
        ],
        "verdict": verdict(checks, text),
        "results": {
            "loss_pct": {k: [100 * v for v in iv.to_list()] for k, iv in loss.items()},
            "random_pct": random_pct,
            "oracle_pct": oracle_pct,
        },
    }
