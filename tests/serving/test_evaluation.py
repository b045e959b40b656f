"""`evaluate_funnel` and `funnelrec evaluate funnel` on the tiny packaged artifact."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from funnelrec.candidates import load_item_embeddings
from funnelrec.cli import evaluate as evaluate_cli
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features
from funnelrec.features.loader import read_examples
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.evaluation import (
    FORMAT_VERSION,
    KIND,
    LISTS,
    FunnelReport,
    Served,
    evaluate_funnel,
    held_out,
)
from funnelrec.serving.recommender import Recommender, RecommendRequest

runner = CliRunner()
K = 50  # the default cut-offs' largest


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/art, packaged from ROOT/feat (leave-last-out) of ROOT/data."""
    return build_tiny_artifact(tmp_path_factory.mktemp("funnel_eval"), steps=100)


@pytest.fixture(scope="module")
def rec(art: Path) -> Recommender:
    return Recommender.load(art)


def run(rec: Recommender, limit: int) -> tuple[FunnelReport, list[Served]]:
    """The test split's first `limit` users, with every request's outcome."""
    served: list[Served] = []
    report = evaluate_funnel(rec, "test", limit=limit, on_request=served.append)
    return report, served


def test_metrics_are_rates_and_limit_limits(rec: Recommender, art: Path) -> None:
    report, served = run(rec, limit=30)
    c = report.counts
    # leave-last-out: one test example per user, the first 30 users of the shards
    first = read_examples(art.parent / "feat", "candidates", "test", ["user_id"], limit=30)
    assert c["users"] == c["requests"] == len(served) == 30
    assert [s.user_id for s in served] == first.column("user_id").to_pylist()
    assert set(report.metrics) == set(LISTS)
    for name, m in report.metrics.items():
        assert all(0.0 <= v <= 1.0 for v in m.values()), name
        assert m["hr@10"] <= m["hr@20"] <= m["hr@50"] and m["recall@10"] == m["hr@10"]
        assert m["ndcg@10"] <= m["hr@10"]
    assert 0.0 <= report.pool["hit_rate"] <= 1.0 and report.pool["mean_candidates"] > K
    for h in report.hit_sources:
        assert h["hits"] == round(report.metrics["funnel"][f"hr@{h['k']}"] * 30)
        assert all(0.0 <= v <= 1.0 for v in h["nominated_by"].values())
        assert h["hits"] == 0 or max(h["nominated_by"].values()) > 0
    assert report.timing["requests_per_s"] > 0 and report.timing["funnel_ms_mean"] > 0
    # all the split's examples without a limit
    assert len(held_out(Features.open(art.parent / "feat"), "test")) > 30


def test_matches_a_brute_force_recomputation(rec: Recommender, art: Path) -> None:
    report, served = run(rec, limit=12)
    ds = Dataset.open(art.parent / "data")
    w = ds.table("watches", ["user_id", "item_id", "ts"]).to_pydict()
    s = ds.table("searches", ["user_id", "ts", "query"]).to_pydict()
    emb, item_ids = load_item_embeddings(art / "candidates")
    assert rec.index.kind == "exact"  # so the ANN order is the order of dot products
    ranks: dict[str, list[float]] = {name: [] for name in LISTS}
    for got in served:
        u = got.user_id
        # leave-last-out: the test target is the user's last watch, the rest came before
        mine = sorted(
            (t, row, i)
            for row, (uu, i, t) in enumerate(zip(w["user_id"], w["item_id"], w["ts"], strict=True))
            if uu == u
        )
        history, target = [i for _, _, i in mine[:-1]], mine[-1][2]
        searches = sorted(
            (t, row, q)
            for row, (uu, t, q) in enumerate(zip(s["user_id"], s["ts"], s["query"], strict=True))
            if uu == u and t < mine[-1][0]
        )
        queries = [q for _, _, q in searches]
        assert (got.target, got.context.history, got.rewatch) == (
            target,
            history,
            target in history,
        )
        assert got.context.queries == queries
        excl = sorted(set(history) - {target})
        lists: dict[str, list[int]] = {}
        # the watched items but the target excluded; without a re-watch, as in production
        req = RecommendRequest(user_id=u, history=history, queries=queries, k=K, exclude=excl)
        resp = rec.recommend(req)
        lists["funnel"] = [it.item_id for it in resp.items]
        if target not in history:
            plain = RecommendRequest(user_id=u, history=history, queries=queries, k=K)
            assert [it.item_id for it in rec.recommend(plain).items] == lists["funnel"]
        batch = rec.features.candidate_batch([history], [queries], [rec.user_demographics(u)])
        with torch.no_grad():
            scores = (emb @ rec.candidate_model(batch)[0]).numpy()
        ok = ~np.isin(item_ids.numpy(), excl)
        best = np.argsort(-scores[ok], kind="stable")[:K]
        lists["deep"] = item_ids.numpy()[ok][best].tolist()
        lists["cowatch"] = rec.cowatch.top_k(history, K, exclude=excl)[0].tolist()
        lists["fresh"] = rec.fresh.top_k(history, K, exclude=excl)[0].tolist()
        for name in LISTS:
            assert got.lists[name].tolist() == lists[name], (u, name)
            place = lists[name].index(target) + 1 if target in lists[name] else math.inf
            ranks[name].append(place)
    for name in LISTS:
        r = np.asarray(ranks[name])
        m = report.metrics[name]
        for k in (10, 20, 50):
            assert m[f"hr@{k}"] == pytest.approx(np.mean(r <= k))
            ndcg = np.where(r <= k, 1.0 / np.log2(r + 1), 0.0)
            assert m[f"ndcg@{k}"] == pytest.approx(ndcg.mean())
        assert m["mrr"] == pytest.approx(np.where(r <= K, 1.0 / r, 0.0).mean())


def test_watched_items_are_excluded_but_the_target(rec: Recommender) -> None:
    report, served = run(rec, limit=80)
    assert report.counts["rewatch_targets"] == sum(s.rewatch for s in served) > 0
    found_rewatch = 0
    for got in served:
        other = set(got.context.history) - {got.target}
        for name, ids in got.lists.items():
            assert not other & set(ids.tolist()), (got.user_id, name)
            assert len(set(ids.tolist())) == len(ids)
        found_rewatch += got.rewatch and any(got.target in ids for ids in got.lists.values())
        if not got.rewatch and got.target in got.lists["funnel"]:
            # served as in production: a hit was nominated by the pool's sources
            assert got.in_pool and got.sources
    assert found_rewatch > 0  # re-watched targets stay retrievable


def test_requests_carry_the_features_examples_inputs(rec: Recommender, art: Path) -> None:
    """The deep model gets the very inputs of the features' examples (`evaluate candidates`)."""
    _, served = run(rec, limit=25)
    ex = read_examples(art.parent / "feat", "candidates", "test", ["history", "search"], limit=25)
    for got, hist, search in zip(
        served, ex.column("history").to_pylist(), ex.column("search").to_pylist(), strict=True
    ):
        b = rec.features.candidate_batch([got.context.history], [got.context.queries])
        assert b.history.tolist() == hist and b.search.tolist() == search


def test_deterministic_and_json(rec: Recommender, tmp_path: Path) -> None:
    a = evaluate_funnel(rec, "test", ks=(5, 10), limit=15)
    b = evaluate_funnel(rec, "test", ks=(10, 5), limit=15)
    assert a.metrics == b.metrics and a.hit_sources == b.hit_sources and a.ks == (5, 10)
    body = json.loads(a.save(tmp_path / "m.json").read_text())
    assert body["format_version"] == FORMAT_VERSION and body["kind"] == KIND
    assert (
        body["ks"] == [5, 10]
        and body["metrics"]["funnel"]["ndcg@5"] == a.metrics["funnel"]["ndcg@5"]
    )
    assert body["source"]["split_kind"] == "last" and body["protocol"]["exclusion"]


def test_bad_inputs_are_clear_errors(rec: Recommender, art: Path, tmp_path: Path) -> None:
    for split in ("train", "nope"):
        with pytest.raises(FunnelrecError, match="split must be valid or test"):
            evaluate_funnel(rec, split)
    with pytest.raises(FunnelrecError, match="at least 1 user"):
        evaluate_funnel(rec, limit=0)
    with pytest.raises(FunnelrecError, match="positive integers"):
        evaluate_funnel(rec, ks=(0, 10))
    with pytest.raises(ArtifactError, match="not a recommender artifact"):
        evaluate_funnel(tmp_path)

    bare = Path(shutil.copytree(art, tmp_path / "bare"))
    shutil.rmtree(bare / "features")
    with pytest.raises(ArtifactError, match="no features copy"):
        evaluate_funnel(bare)

    # the features it was packaged from are gone: say so, and how to point at them
    moved = Path(shutil.copytree(art, tmp_path / "moved"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["features"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="--features"):
        evaluate_funnel(moved)

    feat = Path(shutil.copytree(art.parent / "feat", tmp_path / "feat"))
    shard = sorted((feat / "candidates" / "test").glob("part-*.parquet"))
    for p in shard[1:]:
        p.unlink()
    pq.write_table(pq.read_schema(shard[0]).empty_table(), shard[0])
    with pytest.raises(FunnelrecError, match="no held-out examples"):
        evaluate_funnel(rec, features=feat)
    shutil.rmtree(feat / "candidates" / "test")
    with pytest.raises(ArtifactError, match="shards are missing"):
        evaluate_funnel(rec, features=feat)
    meta = json.loads((feat / "features.json").read_text())
    meta["split"]["min_watches"] = 7
    (feat / "features.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not the features build"):
        evaluate_funnel(rec, features=feat)


def test_cli_runs_and_writes_the_json(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "funnel.json"
    res = runner.invoke(
        evaluate_cli.app, ["funnel", str(art), "--limit", "10", "--k", "5,10", "--out", str(out)]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    body = json.loads(out.read_text())
    assert body["kind"] == KIND and body["counts"]["users"] == 10 and body["ks"] == [5, 10]
    assert set(body["metrics"]) == set(LISTS) and "hr@5" in body["metrics"]["deep"]
    assert "funnel (ranked)" in res.output and "hr@5" in res.output and str(out) in res.output

    copy = Path(shutil.copytree(art, tmp_path / "art"))  # default: ART/funnel_metrics.json
    res = runner.invoke(evaluate_cli.app, ["funnel", str(copy), "--limit", "3"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((copy / "funnel_metrics.json").read_text())["counts"]["users"] == 3

    res = runner.invoke(evaluate_cli.app, ["funnel", str(art), "--split", "train"])
    assert isinstance(res.exception, FunnelrecError) and "valid or test" in str(res.exception)
    res = runner.invoke(evaluate_cli.app, ["funnel", str(art), "--k", "ten"])
    assert isinstance(res.exception, FunnelrecError) and "--k" in str(res.exception)
