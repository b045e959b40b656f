"""`funnelrec experiment baselines`: funnelrec's candidate model beside the classic baselines,
and the whole funnel beside each of its sources.

The paper's comparison (the deep candidate generator replaced matrix factorisation at
YouTube): same world, same split, same held-out examples, same metrics. Every model is
fitted on the training part of a leave-last-out split only (`package.training_watches`)
and ranks all items for a random sample of users' last watches, seen items excluded.

    most popular (all time) / (last 7 days)    baselines.Popularity
    co-watch (last 5 watches, decayed)         baselines.CoWatch
    BPR, ALS (64 factors, `implicit`)          baselines.BPR / ALS, the user's learned vector
    funnelrec candidate model                  the harness's default model, converged

What a practitioner asks next: does the funnel (the sources' candidates mixed, then
ranked) beat each source on its own? The packaged funnel of the time split (the default
candidate model and the 1024->512->256 watch-time ranker, the funnel-ab experiment's) is
served every held-out watch of the test period's first users through
`serving.evaluation.evaluate_funnel`, which scores the served list beside each source's
own list (deep in ANN order, co-watch, fresh) for the same request.

`baselines.ItemKNN` is left out: its all-pairs cosine fit is too slow for the small world
on two cores (docs/results.md); benchmarks/real_data.py compares it on real data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from funnelrec.baselines import ALS, BPR, CoWatch, Interactions, Popularity
from funnelrec.candidates.metrics import Scorer
from funnelrec.data.dataset import Dataset
from funnelrec.experiments.common import (
    ArmSpec,
    arm_jobs,
    candidate_arm,
    ci_text,
    convergence_note,
    heldout_sample,
    seeds_note,
    time_features,
)
from funnelrec.experiments.evaluation import (
    CURVE_KS,
    BaselineScorer,
    ExampleSample,
    Interval,
    example_ranks,
    mean_interval,
    paired_interval,
    per_example,
    recall_curve,
    sample_batches,
)
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.ranking_table import WLR_BEST, ranker_jobs
from funnelrec.experiments.verdict import Check, checks_table, decide, verdict
from funnelrec.features import Features
from funnelrec.serving.evaluation import LISTS, Served, evaluate_funnel
from funnelrec.serving.package import training_watches

NAME = "baselines"
Fittable = Popularity | CoWatch | BPR | ALS
WEEK = 7 * 86_400
COLUMNS = ("recall@10", "recall@50", "recall@100", "ndcg@10", "map@100", "mrr")
METRIC = "recall@100"
DEEP = "funnelrec candidate model"
MF = ("BPR (64 factors)", "ALS (64 factors)")
FUNNEL_KS = (10, 100)


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
    tfeats = time_features(h)
    # every model the experiment needs, trained at once (budget.workers processes), the
    # rankers (the longest) first
    h.parallel(
        [
            *ranker_jobs(h, tfeats, [WLR_BEST[1]]),
            *arm_jobs(h, [ArmSpec(f, (), seed) for f in (feats, tfeats) for seed in h.seeds]),
        ]
    )
    sample = heldout_sample(h, feats)
    batches = sample_batches(feats, sample)
    per_seed = [
        h.cached(
            "baselines-ranks",
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
    deep = [candidate_arm(h, feats, [], seed) for seed in h.seeds]
    for ranks, arm in zip(per_seed, deep, strict=True):
        ranks["ranks"][DEEP] = arm["ranks"]
        ranks["fit_s"][DEEP] = arm["wall_s"]
    funnel = [_funnel_lists(h, tfeats, seed) for seed in h.seeds]
    doc = _document(h, per_seed, deep, funnel, len(sample.positions))
    h.finish(NAME, doc, timer)
    return doc


def _evaluate(
    h: Harness, feats: Features, sample: ExampleSample, batches: Any, seed: int
) -> dict[str, Any]:
    """Fit every baseline and rank the sample's targets with each."""
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
    er = example_ranks(scorers, feats, sample, batches=batches)
    return {
        "ranks": {name: [float(x) if np.isfinite(x) else None for x in r]
                  for name, r in er.ranks.items()},
        "fit_s": fit_s,
    }  # fmt: skip


def _ranks(per_seed: list[dict[str, Any]], name: str) -> list[np.ndarray]:
    return [
        np.array([np.inf if x is None else x for x in s["ranks"][name]], dtype=np.float64)
        for s in per_seed
    ]


def _values(per_seed: list[dict[str, Any]], name: str, metric: str) -> np.ndarray:
    """[seeds, examples]: each example's `metric` under each seed's fit of `name`."""
    return np.stack([per_example(r, metric) for r in _ranks(per_seed, name)])


# --------------------------------------------------------------------------- the funnel


def _funnel_lists(h: Harness, feats: Features, seed: int) -> dict[str, Any]:
    """Each request's rank of its target in the funnel's list and in each source's
    (`evaluate_funnel` on the test split's first `funnel_users` users; cached)."""
    cand = candidate_arm(h, feats, [], seed)
    ranker = h.ranker_run(feats, WLR_BEST[1], seed)

    def lists() -> dict[str, Any]:
        art = h.funnel(feats, cand["artifact"], ranker["artifact"])
        ranks: dict[str, list[float | None]] = {name: [] for name in LISTS}

        def record(served: Served) -> None:
            for name in LISTS:
                at = np.flatnonzero(served.lists[name] == served.target)
                ranks[name].append(float(at[0] + 1) if at.size else None)

        report = evaluate_funnel(
            art, "test", ks=FUNNEL_KS, limit=h.budget.funnel_users, on_request=record
        )
        return {"ranks": ranks, "pool": report.pool, "counts": report.counts}

    key = {
        "cand": cand["artifact"],
        "ranker": ranker["artifact"],
        "users": h.budget.funnel_users,
        "ks": list(FUNNEL_KS),
    }
    return h.cached("funnel-lists", key, lists)


def _funnel_table(funnel: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[str]]]:
    """The funnel against each source: each list's recall with its interval and the
    paired difference funnel - source (per request and seed)."""

    def values(name: str, k: int) -> np.ndarray:
        return np.array(
            [[1.0 if x is not None and x <= k else 0.0 for x in f["ranks"][name]] for f in funnel]
        )

    out: dict[str, Any] = {}
    rows = []
    for name in LISTS:
        cells = {k: mean_interval(values(name, k)) for k in FUNNEL_KS}
        diffs = {
            k: paired_interval(values(LISTS[0], k), values(name, k))
            for k in FUNNEL_KS
            if name != LISTS[0]
        }
        out[name] = {f"recall@{k}": cells[k].to_list() for k in FUNNEL_KS} | {
            f"funnel - {name}, recall@{k}": d.to_list() for k, d in diffs.items()
        }
        rows.append(
            [
                name,
                *(ci_text(cells[k]) for k in FUNNEL_KS),
                *(diffs[k].text() if diffs else "" for k in FUNNEL_KS),
                decide(diffs[FUNNEL_KS[0]], ">") if diffs else "",
            ]
        )
    return out, rows


# --------------------------------------------------------------------------- the document


def _checks(per_seed: list[dict[str, Any]]) -> list[Check]:
    """The deep model against each matrix factorisation model."""
    deep = _values(per_seed, DEEP, METRIC)
    return [
        Check(
            f"the deep candidate model beats {mf.split(' ')[0]}",
            f"deep - {mf.split(' ')[0]}",
            ">",
            paired_interval(deep, _values(per_seed, mf, METRIC)),
            METRIC,
        )
        for mf in MF
    ]


def _document(
    h: Harness,
    per_seed: list[dict[str, Any]],
    deep: list[dict[str, Any]],
    funnel: list[dict[str, Any]],
    n_users: int,
) -> dict[str, Any]:
    names = [*_models(h, 0), DEEP]
    rows, series = [], []
    results: dict[str, Any] = {}
    for name in names:
        cells: dict[str, Interval] = {c: mean_interval(_values(per_seed, name, c)) for c in COLUMNS}
        fit = float(np.mean([s["fit_s"][name] for s in per_seed]))
        rows.append(
            [name, *(f"{cells[c].mean:.4f}" for c in COLUMNS), ci_text(cells[METRIC]),
             f"{fit:.1f}"]
        )  # fmt: skip
        curve = np.mean([recall_curve(r) for r in _ranks(per_seed, name)], axis=0).tolist()
        series.append({"label": name, "x": list(CURVE_KS), "y": curve})
        results[name] = {c: iv.to_list() for c, iv in cells.items()} | {"fit_s": fit}
    funnel_results, funnel_rows = _funnel_table(funnel)
    checks = _checks(per_seed)
    best = max(names[:-1], key=lambda n: results[n][METRIC][0])
    text = (
        f"The deep candidate model's {METRIC} is {results[DEEP][METRIC][0]:.4f}; the best "
        f"baseline ({best}) reaches {results[best][METRIC][0]:.4f}."
    )
    pool = float(np.mean([f["pool"]["hit_rate"] for f in funnel]))
    requests = funnel[0]["counts"]["requests"]
    return {
        "title": "Baselines: the deep model against matrix factorisation, and the funnel "
        "against its sources",
        "claim": "The deep candidate generator (which replaced a matrix factorisation approach "
        "at YouTube) retrieves the next watch better than matrix factorisation.",
        "protocol": f"{h.options.preset} world, leave-last-out split (last watch = test), "
        f"{n_users} test users sampled at random (the same for every model); "
        "all models fitted on the training part only; full ranking of every training-"
        "vocabulary item, items watched before excluded (never the target); ties broken "
        f"by a fixed random order; BPR, ALS and the deep model are fitted with each of the "
        f"seeds (popularity and co-watch have none); {seeds_note(h)}; deep model: d = "
        f"{h.budget.cand_dim}, depth 2, {h.budget.cand_negatives} sampled negatives, "
        f"{convergence_note(h, deep)}. The funnel: time split, the packaged funnel of each "
        f"seed serving the {requests:,} held-out next watches of the test period's first "
        f"{h.budget.funnel_users} users (top {max(FUNNEL_KS)}; items watched before "
        "excluded), each source's own list for the same request beside it; paired by "
        f"request and seed. The sources' candidates hold the target in {pool:.1%} of the "
        "requests (the most any ranking of them can reach).",
        "tables": [
            checks_table(checks),
            {
                "title": "held-out last watch (leave-last-out), seen items excluded; mean "
                "over seeds",
                "columns": ["model", *COLUMNS, f"{METRIC} [95% CI]", "fit s"],
                "rows": rows,
            },
            {
                "title": "the funnel against each of its sources (time split, test period): "
                "recall [95% CI], the paired difference funnel - list [95% CI], and whether "
                f"the funnel is better at recall@{FUNNEL_KS[0]}",
                "columns": [
                    "list",
                    *(f"recall@{k}" for k in FUNNEL_KS),
                    *(f"funnel - list, recall@{k}" for k in FUNNEL_KS),
                    "funnel better",
                ],
                "rows": funnel_rows,
            },
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
        "verdict": verdict(checks, text),
        "results": {"models": results, "funnel": funnel_results},
    }
