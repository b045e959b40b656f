"""`funnelrec experiment baselines`: funnelrec's candidate model beside the classic baselines.

Same world, same split, same held-out examples, same metrics: every model is fitted on
the training part of a leave-last-out split only (`package.training_watches`) and ranks
all items for a random sample of users' last watches, seen items excluded.

    most popular (all time) / (last 7 days)    baselines.Popularity
    co-watch (last 5 watches, decayed)         baselines.CoWatch
    BPR, ALS (64 factors, `implicit`)          baselines.BPR / ALS, the user's learned vector
    funnelrec candidate model                  the harness's default model and budget

`baselines.ItemKNN` is left out: its all-pairs cosine fit is too slow for the small world
on two cores (docs/results.md); benchmarks/real_data.py compares it on real data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from funnelrec.baselines import ALS, BPR, CoWatch, Interactions, Popularity
from funnelrec.candidates import load_candidate_model
from funnelrec.candidates.metrics import ModelScorer, Scorer
from funnelrec.data.dataset import Dataset
from funnelrec.experiments.evaluation import (
    CURVE_KS,
    BaselineScorer,
    ExampleSample,
    bootstrap_ci,
    example_ranks,
    mean_sd,
    per_example,
    recall_curve,
    sample_batches,
    summary,
)
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.features import Features
from funnelrec.serving.package import training_watches

NAME = "baselines"
Fittable = Popularity | CoWatch | BPR | ALS
WEEK = 7 * 86_400
COLUMNS = ("recall@10", "recall@50", "recall@100", "ndcg@10", "map@100", "mrr")


def _models(h: Harness, seed: int) -> dict[str, Fittable]:
    it = h.budget.mf_iterations
    return {
        "most popular (all time)": Popularity(),
        "most popular (last 7 days)": Popularity(window_s=WEEK),
        "co-watch (last 5 watches)": CoWatch(next_n=5, neighbours=100, last_n=5, last_decay=0.5),
        # one thread: implicit's BPR is only reproducible single-threaded
        "BPR (64 factors)": BPR(64, iterations=it, threads=1, seed=seed),
        "ALS (64 factors)": ALS(64, iterations=min(15, it), threads=h.budget.threads, seed=seed),
    }


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    feats = h.features("last", ["ranking=false"])
    sample = ExampleSample.draw(feats, "test", h.budget.eval_examples)
    batches = sample_batches(feats, sample)
    per_seed = [
        h.cached(
            "baselines",
            {
                "features": feats.path.name,
                "sample": [sample.split, len(sample.positions)],
                "seed": seed,
                "budget": h.settings()["budget"],
                "models": {k: m.config() for k, m in _models(h, seed).items()},
            },
            lambda seed=seed: _evaluate(h, feats, sample, batches, seed),  # type: ignore[misc]
        )
        for seed in h.seeds
    ]
    doc = _document(h, per_seed, len(sample.positions))
    h.finish(NAME, doc, timer)
    return doc


def _evaluate(
    h: Harness, feats: Features, sample: ExampleSample, batches: Any, seed: int
) -> dict[str, Any]:
    """Fit every baseline, train the deep model, and score them all on the sample."""
    ds = Dataset.open(h.data())
    n_items = int(ds.manifest.row_counts["items"])
    values = feats.vocab("item").values
    data = Interactions.of(training_watches(ds, feats))
    scorers: dict[str, Scorer] = {}
    fit_s: dict[str, float] = {}
    for name, model in _models(h, seed).items():
        model.fit(data, num_items=n_items)
        fit_s[name] = model.fit_seconds
        scorers[name] = BaselineScorer(model, values)
    run = h.candidate_run(feats, [], seed)
    scorers["funnelrec candidate model"] = ModelScorer(load_candidate_model(run["artifact"]))
    fit_s["funnelrec candidate model"] = run["wall_s"]
    er = example_ranks(scorers, feats, sample, batches=batches)
    return {
        name: {
            "metrics": summary(r, (10, 50, 100)),
            "curve": recall_curve(r),
            "ci_recall@100": bootstrap_ci(per_example(r, "recall@100")),
            "fit_s": fit_s[name],
        }
        for name, r in er.ranks.items()
    }


def _verdict(h: Harness, results: dict[str, Any], names: list[str]) -> tuple[str, str]:
    """(holds, text): is the deep model ahead of the best baseline, or of matrix
    factorisation at least?"""
    model = results["funnelrec candidate model"]["recall@100"]
    best_name = max((n for n in names if n != "funnelrec candidate model"),
                    key=lambda n: results[n]["recall@100"])  # fmt: skip
    best = results[best_name]["recall@100"]
    mf = max(results["BPR (64 factors)"]["recall@100"], results["ALS (64 factors)"]["recall@100"])
    holds = "yes" if model > best else ("partly" if model > mf else "no")
    verdict = (
        f"The deep candidate model's recall@100 is {model:.3f}; the best baseline "
        f"({best_name}) reaches {best:.3f} ({_rel(model, best)}), matrix factorisation "
        f"{mf:.3f} ({_rel(model, mf)}). "
        + (
            "The deep model is ahead of every baseline."
            if holds == "yes"
            else "The deep model beats matrix factorisation but not the best baseline."
            if holds == "partly"
            else "The deep model does not beat the matrix factorisation baselines at this budget."
        )
        + f" The deep model trained for {h.budget.cand_steps} steps only; see the protocol."
    )
    return holds, verdict


def _document(h: Harness, per_seed: list[dict[str, Any]], n_users: int) -> dict[str, Any]:
    names = [*_models(h, 0), "funnelrec candidate model"]
    rows, series = [], []
    results: dict[str, Any] = {}
    for name in names:
        stats = {c: mean_sd([s[name]["metrics"][c] for s in per_seed]) for c in COLUMNS}
        ci = per_seed[0][name]["ci_recall@100"]
        fit = float(np.mean([s[name]["fit_s"] for s in per_seed]))
        rows.append(
            [name, *(_pm(*stats[c]) for c in COLUMNS), f"[{ci[0]:.3f}, {ci[1]:.3f}]", f"{fit:.1f}"]
        )
        curve = np.mean([s[name]["curve"] for s in per_seed], axis=0).tolist()
        series.append({"label": name, "x": list(CURVE_KS), "y": curve})
        results[name] = {c: stats[c][0] for c in COLUMNS} | {"fit_s": fit}
    holds, verdict = _verdict(h, results, names)
    seeds = f"{len(h.seeds)} seed(s)"
    return {
        "title": "Baselines: popularity, co-watch, BPR, ALS and the deep model",
        "claim": "The deep candidate generator (which replaced a matrix factorisation approach "
        "at YouTube) retrieves the next watch better than classic collaborative filtering.",
        "protocol": f"{h.options.preset} world, leave-last-out split (last watch = test), "
        f"{n_users} test users sampled at random (the same for every model); "
        "all models fitted on the training part only; full ranking of every training-"
        "vocabulary item, items watched before excluded (never the target); ties broken "
        f"by a fixed random order; mean ± sd over {seeds} (BPR, ALS and the deep model "
        "depend on the seed); 95% bootstrap interval of recall@100 over users (seed 0). "
        f"Deep model: {h.budget.cand_steps} steps of {h.budget.cand_batch} examples "
        f"(d = {h.budget.cand_dim}, depth 2, {h.budget.cand_negatives} sampled negatives).",
        "tables": [
            {
                "title": "held-out next watch (seen items excluded)",
                "columns": ["model", *COLUMNS, "recall@100 95% CI", "fit s"],
                "rows": rows,
            }
        ],
        "figures": [
            {
                "name": "recall_curve",
                "kind": "line",
                "title": "recall@K of the held-out last watch",
                "xlabel": "K",
                "ylabel": "recall@K",
                "logx": True,
                "series": series,
            }
        ],
        "verdict": {"holds": holds, "text": verdict},
        "results": {"models": results, "per_seed": per_seed},
    }


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.4f}" if sd == 0 else f"{mean:.4f} ± {sd:.4f}"


def _rel(a: float, b: float) -> str:
    if b <= 0:
        return "n/a"
    return f"{100 * (a / b - 1):+.0f}%"
