"""`funnelrec index build|bench` and `evaluate candidates --ann` on a trained tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from funnelrec.ann import index as ann
from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import load_item_embeddings, split_user_vectors
from funnelrec.cli import evaluate as evaluate_cli
from funnelrec.cli import index as index_cli
from funnelrec.errors import ArtifactError, FunnelrecError

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A candidate model artifact trained briefly on the tiny world (its features beside)."""
    from funnelrec.candidates import fit_candidates, load_training_config
    from funnelrec.features.build import build_features
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("cli_index")
    world = preset_config("tiny", ["n_users=300", "days=14"])  # smaller still: a quick fixture
    generate(world, seed=0, out=root / "data", progress=False)
    build_features(root / "data", root / "feat", split="last", progress=False)
    cfg = load_training_config(
        None,
        [
            "dim=16",
            "num_negatives=64",
            "batch_size=256",
            "max_steps=60",
            "patience=0",
            "valid_examples=200",
            "threads=1",
        ],
    )
    fit_candidates(root / "feat", root / "cand", cfg, progress=False)
    return root / "cand"


@pytest.fixture
def art(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the artifact per test (`index build` writes into it)."""
    return Path(shutil.copytree(trained, tmp_path / "cand"))


def build(art: Path, *args: str) -> str:
    res = runner.invoke(index_cli.app, ["build", str(art), "--threads", "1", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def test_build_tunes_on_validation_users_and_records_it(art: Path, trained: Path) -> None:
    out = build(art, "--kind", "hnsw_sq", "--hnsw-m", "8", "--ef-construction", "40")
    meta = json.loads((art / "index" / "index.json").read_text())
    emb, ids = load_item_embeddings(art)
    assert meta["kind"] == "hnsw_sq" and meta["dim"] == emb.shape[1] == 16
    assert meta["count"] == len(ids) and meta["params"]["sq_type"] == "sq8"
    recall = meta["recall"]
    assert recall["k"] == 100 and recall["target_recall"] == 0.95
    assert recall["query_source"].startswith("valid user vectors")
    assert set(recall["search_params"]) == {"ef_search", "rerank"}
    assert recall["recall"] >= 0.95 and f"{recall['recall']:.4f}" in out

    # The recorded recall is what the saved index gives on the validation users.
    index = ItemIndex.load(art / "index", expected_dim=16, expected_item_ids=ids.numpy())
    users = split_user_vectors(art, trained.parent / "feat", "valid").vectors.numpy()
    assert recall["queries"] == len(users)
    assert index.recall_vs_exact(users, 100) == pytest.approx(recall["recall"])

    res = runner.invoke(index_cli.app, ["build", str(art)])
    assert res.exit_code != 0 and "already exists" in str(res.exception)
    res = runner.invoke(index_cli.app, ["build", str(art), "--kind", "lsh", "--force"])
    assert isinstance(res.exception, FunnelrecError) and "--kind lsh" in str(res.exception)
    # a fixed knob is measured, not tuned; --force replaces the index
    build(art, "--kind", "ivfpq_fs", "--nprobe", "2", "--rerank", "4", "--force")
    meta = json.loads((art / "index" / "index.json").read_text())
    assert meta["kind"] == "ivfpq_fs" and "target_recall" not in meta["recall"]
    assert meta["recall"]["search_params"] == {"nprobe": 2, "rerank": 4.0}


def test_default_kind_is_exact_on_a_small_corpus_and_bench_sweeps_the_knob(art: Path) -> None:
    build(art)
    assert json.loads((art / "index" / "index.json").read_text())["kind"] == "exact"
    build(art, "--kind", "ivfpq_fs", "--force")
    res = runner.invoke(
        index_cli.app, ["bench", str(art), "--latency-queries", "20", "--values", "1,4"]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    assert "exact" in res.output
    rerank = ann.DEFAULT_RERANK["ivfpq_fs"]
    for row in (f"nprobe=1 rerank={rerank:g}", f"nprobe=4 rerank={rerank:g}"):
        assert row in res.output


def test_evaluate_shows_ann_metrics_beside_the_exact_ones(art: Path) -> None:
    # Through an exact index, the ANN rows must reproduce the exact metrics.
    build(art, "--kind", "exact")
    res = runner.invoke(evaluate_cli.app, ["candidates", str(art), "--ann", "--k", "10,50"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "model (exact)" in res.output and "model ANN" in res.output
    metrics = json.loads((art / "metrics.json").read_text())
    proto = metrics["protocol"]
    assert proto["ann"]["index"]["kind"] == "exact" and "model_ann" in proto["scoring"]
    assert proto["scoring"]["model"].startswith("exact")
    for variant in ("", "_seen_included"):
        exact, ann = metrics["model" + variant], metrics["model_ann" + variant]
        for name in ("recall@10", "recall@50", "ndcg@50", "map@10"):
            assert ann[name] == pytest.approx(exact[name], abs=2e-3), (variant, name)
        assert ann["mrr"] <= exact["mrr"] + 1e-9  # cut at 50 for the list
    assert metrics["model"]["recall@50"] > 0.05  # the model retrieves something

    # An approximate index, tuned: close to the exact metrics, never far above them.
    build(art, "--kind", "hnsw_sq", "--hnsw-m", "8", "--force")
    out = art / "metrics-ann.json"
    res = runner.invoke(
        evaluate_cli.app, ["candidates", str(art), "--ann", "--k", "10,50", "--out", str(out)]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    metrics = json.loads(out.read_text())
    assert metrics["protocol"]["ann"]["index"]["kind"] == "hnsw_sq"
    exact, ann = metrics["model"], metrics["model_ann"]
    assert exact["recall@50"] - 0.05 <= ann["recall@50"] <= exact["recall@50"] + 0.01


def test_evaluate_refuses_an_index_that_does_not_match_the_model(art: Path, tmp_path: Path) -> None:
    emb, ids = load_item_embeddings(art)
    x, item_ids = emb.numpy(), ids.numpy()
    res = runner.invoke(evaluate_cli.app, ["candidates", str(art), "--ann"])
    assert isinstance(res.exception, ArtifactError) and "no ANN index" in str(res.exception)
    ItemIndex.build(x, item_ids[::-1].copy(), "exact").save(tmp_path / "reordered")
    res = runner.invoke(
        evaluate_cli.app, ["candidates", str(art), "--index", str(tmp_path / "reordered")]
    )
    assert isinstance(res.exception, ArtifactError) and "item-id mapping" in str(res.exception)
    ItemIndex.build(np.ascontiguousarray(x[:, :8]), item_ids, "exact").save(tmp_path / "narrow")
    res = runner.invoke(
        evaluate_cli.app, ["candidates", str(art), "--index", str(tmp_path / "narrow")]
    )
    assert isinstance(res.exception, ArtifactError)
    assert "dimension 8 does not match the model's embedding dimension 16" in str(res.exception)
