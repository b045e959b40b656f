"""The paper's experiments end to end on the tiny world, with step budgets of a few steps.

One world, its features and models are shared by all tests of this module (as they are by
the experiments of one output directory), so each experiment runs once, in seconds.
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
# A few steps per model: the tests check the machinery, not the paper's findings.
BUDGET = (
    "cand_steps=6",
    "rank_steps=3",
    "eval_examples=150",
    "ab_users=12",
    "mf_iterations=2",
    "depths=0,1",
    "negatives=8,64",
)


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> ExperimentOptions:
    root = tmp_path_factory.mktemp("experiments")
    return ExperimentOptions(preset="tiny", seeds=1, out=root, budget=BUDGET, progress=False)


def _check_doc(root: Path, name: str) -> dict[str, Any]:
    out = root / name
    doc = read_doc(out / "metrics.json")
    assert doc["experiment"] == name
    assert doc["verdict"]["holds"] in ("yes", "partly", "no", "unclear")
    assert doc["verdict"]["text"]
    assert doc["protocol"] and doc["claim"]
    for table in doc["tables"]:
        assert table["rows"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert doc["figures"]
    for fig in doc["figures"]:
        assert (out / fig["file"]).read_bytes().startswith(PNG)
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith(f"funnelrec experiment {name} --preset tiny")
    assert len(run["data"]["fingerprint"]) == 16
    assert run["environment"]["funnelrec"]
    assert run["settings"]["budget"]["cand_steps"] == 6
    return doc


def test_baselines(options: ExperimentOptions) -> None:
    doc = run_experiment("baselines", options)
    _check_doc(options.out, "baselines")
    models = [row[0] for row in doc["tables"][0]["rows"]]
    assert models[-1] == "funnelrec candidate model" and len(models) == 6
    for m in doc["results"]["models"].values():
        assert 0.0 <= m["recall@10"] <= m["recall@50"] <= m["recall@100"] <= 1.0
    # popularity ignores the history: its all-time ranking is the training counts'
    assert doc["results"]["models"]["most popular (all time)"]["recall@100"] > 0


def test_depth_features(options: ExperimentOptions) -> None:
    doc = run_experiment("depth-features", options)
    _check_doc(options.out, "depth-features")
    table = doc["tables"][0]
    assert table["columns"] == ["features", "depth 0", "depth 1"]
    assert [r[0] for r in table["rows"]] == [
        "watches only",
        "+ searches",
        "+ example age",
        "all features",
    ]
    # four feature sets x two depths, each its own model
    models = list((options.out / "_shared" / "models").glob("cand-*/config.json"))
    assert len(models) >= 8


def test_example_age(options: ExperimentOptions) -> None:
    doc = run_experiment("example-age", options)
    _check_doc(options.out, "example-age")
    res = doc["results"]
    for shares in [res["empirical"]["shares"], *res["arms"]["with example age"]]:
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-6)  # a distribution over age buckets
        assert shares[-1] == 0.0  # nothing recommended or watched before its upload


def test_labels(options: ExperimentOptions) -> None:
    doc = run_experiment("labels", options)
    _check_doc(options.out, "labels")
    assert set(doc["results"]["stats"]) == {"next watch (rollback)", "random held-out watch"}


def test_ranking_table(options: ExperimentOptions) -> None:
    doc = run_experiment("ranking-table", options)
    _check_doc(options.out, "ranking-table")
    rows = doc["tables"][0]["rows"]
    assert len(rows) == 9 and rows[0][0] == "none"
    for s in doc["results"]["stats"].values():
        assert 0.0 <= s["wpul_pct"][0] <= 100.0


def test_examples_per_user(options: ExperimentOptions) -> None:
    doc = run_experiment("examples-per-user", options)
    _check_doc(options.out, "examples-per-user")
    n = doc["results"]["n_per_group"]
    assert sum(n.values()) == 150  # every sampled example in exactly one activity group
    shares = doc["tables"][1]["rows"]
    assert [r[0] for r in shares] == ["light", "medium", "heavy"]


def test_negatives(options: ExperimentOptions) -> None:
    doc = run_experiment("negatives", options)
    _check_doc(options.out, "negatives")
    labels = [(r[0], r[1]) for r in doc["tables"][0]["rows"]]
    assert ("sampled, logQ on", "8") in labels and ("sampled, logQ off", "64") in labels
    assert labels[-1][0] == "full softmax"


def test_funnel_ab(options: ExperimentOptions) -> None:
    doc = run_experiment("funnel-ab", options)
    _check_doc(options.out, "funnel-ab")
    policies = doc["results"]["per_seed"][0]["replay"]["policies"]
    assert len(policies) == 6
    for p in policies.values():
        assert p["impressions"] > 0
        assert 0.0 <= p["expected_ctr"] <= 1.0 and p["expected_watch_s"] >= 0.0
        lo, hi = p["ci_expected_watch_s"]
        assert lo <= p["expected_watch_s"] <= hi
    latency = doc["results"]["per_seed"][0]["replay"]["request_ms"]
    assert len(latency["funnel, WLR ranker"]) == 12


def test_paper_reuses_everything_and_writes_the_report(options: ExperimentOptions) -> None:
    models = sorted((options.out / "_shared" / "models").iterdir())
    doc = run_experiment("paper", options)
    assert sorted((options.out / "_shared" / "models").iterdir()) == models  # all cached
    assert [r[0] for r in doc["tables"][0]["rows"]] == [*EXPERIMENTS, "total"]
    md = (options.out / "report.md").read_text()
    for name in EXPERIMENTS:
        assert f"Source: `{name}/metrics.json`" in md
    page = (options.out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == md.count("](report_figures/")


def test_cli_and_bad_input(options: ExperimentOptions) -> None:
    args = ["labels", "--preset", "tiny", "--out", str(options.out), "--no-progress", *BUDGET]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "labels:" in result.output
    bad = CliRunner().invoke(app, ["nope", "--preset", "tiny", "--out", str(options.out)])
    assert isinstance(bad.exception, FunnelrecError)
    assert "unknown experiment 'nope'" in str(bad.exception)
    with pytest.raises(FunnelrecError, match="unknown config key 'cand_stepz'"):
        Harness(ExperimentOptions(preset="tiny", budget=("cand_stepz=3",)))
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
