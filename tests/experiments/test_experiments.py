"""The paper's experiments end to end on the tiny world, with budgets of a few steps.

One world, its features and models are shared by all tests of this module (as they are by
the experiments of one output directory), so each experiment runs once, in seconds. Two
training seeds, so that every comparison is paired over seeds as well as examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from funnelrec.baselines import Popularity
from funnelrec.cli.experiment import app
from funnelrec.errors import FunnelrecError
from funnelrec.experiments import EXPERIMENTS, run_experiment
from funnelrec.experiments.evaluation import (
    BaselineScorer,
    bootstrap_ci,
    per_example,
    recall_curve,
    summary,
)
from funnelrec.experiments.harness import ExperimentOptions, Harness, read_doc, stable_hash
from funnelrec.features.batch import CandidateBatch

PNG = b"\x89PNG\r\n\x1a\n"
# A few steps per model, evaluated every few: the tests check the machinery (the
# convergence rule, the pairing, the documents), not the paper's findings.
BUDGET = (
    "patience=1",
    "cand_eval_every=3",
    "cand_max_steps=9",
    "rank_eval_every=2",
    "rank_max_steps=4",
    "valid_examples=100",
    "valid_impressions=3000",
    "eval_examples=150",
    "funnel_users=8",
    "ab_users=12",
    "mf_iterations=2",
    "depths=0,1",
    "negatives=8,64",
    "rank_table=depth",
)
SEEDS = 2


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> ExperimentOptions:
    root = tmp_path_factory.mktemp("experiments")
    return ExperimentOptions(preset="tiny-v2", seeds=SEEDS, out=root, budget=BUDGET, progress=False)


def _check_doc(root: Path, name: str) -> dict[str, Any]:
    out = root / name
    doc = read_doc(out / "metrics.json")
    assert doc["experiment"] == name
    v = doc["verdict"]
    assert v["holds"] in ("yes", "partly", "no", "unclear")
    assert v["text"]
    assert doc["protocol"] and doc["claim"]
    # every claim is a paired difference over both seeds, decided by its interval
    assert v["checks"]
    for c in v["checks"]:
        mean, lo, hi = c["difference"]
        assert lo <= mean <= hi and c["seeds"] == SEEDS
        side = "yes" if (lo > 0) == (c["expect"] == ">") else "no"
        assert c["holds"] == ("unclear" if lo <= 0 <= hi else side)
    assert v["decided"] == all(c["holds"] != "unclear" for c in v["checks"])
    assert doc["tables"][0]["rows"] == [
        [c["name"], c["compared"], f"{c['expect']} 0", c["metric"], r[4], c["holds"]]
        for c, r in zip(v["checks"], doc["tables"][0]["rows"], strict=True)
    ]
    for table in doc["tables"]:
        assert table["rows"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert doc["figures"]
    for fig in doc["figures"]:
        assert (out / fig["file"]).read_bytes().startswith(PNG)
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith(f"funnelrec experiment {name} --preset tiny-v2")
    assert len(run["data"]["fingerprint"]) == 16
    assert run["environment"]["funnelrec"]
    assert run["settings"]["budget"]["cand_max_steps"] == 9
    return doc


def _converged(runs: list[dict[str, Any]], every: int, most: int, patience: int = 1) -> None:
    """Each run stopped by the rule (`patience` evaluations after its best) or at the
    maximum, with its best evaluated weights kept."""
    for r in runs:
        t = r.get("training", r)
        assert t["best_step"] is not None and t["best_step"] % every == 0
        if t["stopped_early"]:
            assert t["steps"] == t["best_step"] + patience * every
        else:
            assert t["steps"] == most


def test_baselines(options: ExperimentOptions) -> None:
    doc = run_experiment("baselines", options)
    _check_doc(options.out, "baselines")
    assert [c["compared"] for c in doc["verdict"]["checks"]] == ["deep - BPR", "deep - ALS"]
    models = [row[0] for row in doc["tables"][1]["rows"]]
    assert models[-1] == "funnelrec candidate model" and len(models) == 6
    for m in doc["results"]["models"].values():
        assert 0.0 <= m["recall@10"][0] <= m["recall@50"][0] <= m["recall@100"][0] <= 1.0
    # popularity ignores the history: its all-time ranking is the training counts'
    assert doc["results"]["models"]["most popular (all time)"]["recall@100"][0] > 0
    # the funnel beside each of its sources, on the same requests
    funnel = doc["tables"][2]
    assert [r[0] for r in funnel["rows"]] == ["funnel", "deep", "cowatch", "fresh"]
    assert all(r[-1] in ("yes", "no", "unclear") for r in funnel["rows"][1:])


def test_depth_features(options: ExperimentOptions) -> None:
    doc = run_experiment("depth-features", options)
    _check_doc(options.out, "depth-features")
    table = doc["tables"][1]
    assert table["columns"] == ["features", "depth 0", "depth 1"]
    assert [r[0] for r in table["rows"]] == [
        "watches only",
        "+ searches",
        "+ example age",
        "all features",
    ]
    assert [c["compared"] for c in doc["verdict"]["checks"]][-1] == "depth 1 - depth 0"
    # four feature sets x two depths x two seeds, each its own model, each converged
    models = list((options.out / "_shared" / "models").glob("cand-*.json"))
    assert len(models) >= 16
    _converged([json.loads(m.read_text()) for m in models], 3, 9)


def test_example_age(options: ExperimentOptions) -> None:
    doc = run_experiment("example-age", options)
    _check_doc(options.out, "example-age")
    res = doc["results"]
    for shares in [res["empirical"]["shares"], res["summary"]["with example age"]["shares"]]:
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-6)  # a distribution over age buckets
        assert shares[-1] == 0.0  # nothing recommended or watched before its upload


def test_labels_reports_metrics_with_and_without_seen_exclusion(
    options: ExperimentOptions,
) -> None:
    doc = run_experiment("labels", options)
    _check_doc(options.out, "labels")
    checks = doc["verdict"]["checks"]
    assert [c["metric"] for c in checks] == [
        "map@100, seen items excluded",
        "map@100, seen items included",
    ]
    rows = doc["tables"][1]["rows"]
    assert [(r[0], r[1]) for r in rows] == [
        ("next watch (rollback)", "excluded"),
        ("random held-out watch", "excluded"),
        ("next watch (rollback)", "included"),
        ("random held-out watch", "included"),
    ]
    # the same examples either way: seen items only add competitors to the target, so
    # every metric is at most its value with them excluded
    cells = doc["results"]["cells"]
    for label in ("next watch (rollback)", "random held-out watch"):
        excluded, included = cells[f"{label} | seen excluded"], cells[f"{label} | seen included"]
        for metric in ("map@100", "recall@100", "mrr"):
            assert included[metric][0] <= excluded[metric][0] + 1e-12


def test_ranking_table(options: ExperimentOptions) -> None:
    doc = run_experiment("ranking-table", options)
    _check_doc(options.out, "ranking-table")
    rows = doc["tables"][1]["rows"]
    assert [r[0] for r in rows] == [
        "none",
        "256",
        "512->256",
        "1024->512->256",
        "1024->512->256, no x^2 / sqrt(x)",
        "1024->512->256, unit weights (CTR)",
    ]
    for mean, lo, hi in doc["results"]["loss_pct"].values():
        assert 0.0 <= lo <= mean <= hi <= 100.0
    rankers = [json.loads(m.read_text()) for m in options.out.glob("_shared/models/rank-*.json")]
    assert len(rankers) >= 6 * SEEDS
    _converged(rankers, 2, 4)
    # the users' parts add up to the ranker's own test loss
    for r in rankers:
        users = r["test_users"]
        loss = sum(users["wrong"]) / sum(users["total"])
        assert loss == pytest.approx(r["test"]["model"]["weighted_per_user_loss"])


def test_examples_per_user(options: ExperimentOptions) -> None:
    doc = run_experiment("examples-per-user", options)
    _check_doc(options.out, "examples-per-user")
    n = doc["results"]["n_per_group"]
    assert sum(n.values()) == 150  # every sampled example in exactly one activity group
    shares = doc["tables"][2]["rows"]
    assert [r[0] for r in shares] == ["light", "medium", "heavy"]


def test_negatives(options: ExperimentOptions) -> None:
    doc = run_experiment("negatives", options)
    _check_doc(options.out, "negatives")
    labels = [(r[0], r[1]) for r in doc["tables"][1]["rows"]]
    assert ("sampled, logQ on", "8") in labels and ("sampled, logQ off", "64") in labels
    assert labels[-1][0] == "full softmax"


def test_funnel_ab(options: ExperimentOptions) -> None:
    doc = run_experiment("funnel-ab", options)
    _check_doc(options.out, "funnel-ab")
    policies = doc["results"]["policies"]
    assert len(policies) == 6
    for p in policies.values():
        mean, lo, hi = p["expected_watch_s"]
        assert 0.0 <= lo <= mean <= hi
        assert 0.0 <= p["expected_ctr"][0] <= 1.0
    assert len(doc["figures"][2]["series"][0]["values"]) == 12  # one latency per user


def test_paper_reuses_everything_and_writes_the_report(options: ExperimentOptions) -> None:
    models = sorted((options.out / "_shared" / "models").iterdir())
    doc = run_experiment("paper", options)
    assert sorted((options.out / "_shared" / "models").iterdir()) == models  # all cached
    assert [r[0] for r in doc["tables"][0]["rows"]] == [*EXPERIMENTS, "total"]
    assert doc["results"]["decided"] == sum(
        read_doc(options.out / n / "metrics.json")["verdict"]["decided"] for n in EXPERIMENTS
    )
    md = (options.out / "report.md").read_text()
    assert "How the experiments are run." in md
    for name in EXPERIMENTS:
        assert f"Source: `{name}/metrics.json`" in md
    assert "difference [95% CI]" in md and "seen items" in md
    page = (options.out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == md.count("](report_figures/")


def test_cli_and_bad_input(options: ExperimentOptions) -> None:
    args = ["labels", "--preset", "tiny-v2", "--seeds", str(SEEDS), "--out", str(options.out),
            "--no-progress", *BUDGET]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "labels:" in result.output
    bad = CliRunner().invoke(app, ["nope", "--preset", "tiny", "--out", str(options.out)])
    assert isinstance(bad.exception, FunnelrecError)
    assert "unknown experiment 'nope'" in str(bad.exception)
    with pytest.raises(FunnelrecError, match="unknown config key 'cand_stepz'"):
        Harness(ExperimentOptions(preset="tiny", budget=("cand_stepz=3",)))
    assert ExperimentOptions().preset == "small-v2" and ExperimentOptions().seeds == 3
    with pytest.raises(FunnelrecError, match="unknown preset 'huge'"):
        ExperimentOptions(preset="huge")
    with pytest.raises(FunnelrecError, match="seeds must be >= 1"):
        ExperimentOptions(seeds=0)


# --------------------------------------------------------------------------- evaluation


def test_metrics_from_ranks_by_hand() -> None:
    ranks = np.array([1.0, 3.0, 12.0, math.inf])  # the last target is out of vocabulary
    m = summary(ranks, ks=(10,))
    assert m["recall@10"] == pytest.approx(2 / 4)
    assert m["map@10"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    for name in ("recall@10", "map@10", "ndcg@10", "mrr"):
        assert per_example(ranks, name).mean() == pytest.approx(m[name])
    assert recall_curve(ranks, (1, 3, 12)) == [0.25, 0.5, 0.75]


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    small = rng.random(50)
    large = rng.random(5000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)


def test_baseline_scorer_reindexes_dataset_items_to_the_vocabulary() -> None:
    # dataset items 1..4 watched 1, 3, 0, 2 times; vocabulary ids 1..3 are items 2, 4, 1
    train = {
        "user_id": np.array([1, 1, 1, 2, 2, 2]),
        "item_id": np.array([1, 2, 2, 2, 4, 4]),
        "ts": np.arange(6),
    }
    pop = Popularity().fit(train, num_items=4)
    scorer = BaselineScorer(pop, np.array([2, 4, 1]))
    batch = CandidateBatch(
        history=torch.tensor([3, 1]),  # user 7 watched vocabulary ids 3, 1 (items 1, 2)
        history_offsets=torch.tensor([0, 2]),  # user 8 watched nothing
        search=torch.zeros(0, dtype=torch.int64),
        search_offsets=torch.tensor([0, 0]),
        region=torch.zeros(2, dtype=torch.int64),
        device=torch.zeros(2, dtype=torch.int64),
        dense=torch.zeros(2, 0),
        example_age=torch.zeros(2),
        label=torch.tensor([1, 2]),
        user_id=torch.tensor([7, 8]),
        ts=torch.zeros(2, dtype=torch.int64),
    )
    q = scorer.queries(batch)
    assert q.tolist() == [[7, 3, 1], [8, 0, 0]]
    s = scorer.scores(q)
    assert s[0, 0] == -math.inf
    assert s[0, 1:].tolist() == [3.0, 2.0, 1.0]  # counts of items 2, 4, 1


def test_stable_hash_is_order_independent() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
