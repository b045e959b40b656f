"""`funnelrec package`: one checked artifact from trained parts, refusing parts that disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from funnelrec.ann.index import ItemIndex
from funnelrec.baselines import CoWatch, Popularity, load_baseline
from funnelrec.candidates import load_item_embeddings
from funnelrec.cli.package import package_command
from funnelrec.data.dataset import Dataset, file_sha256
from funnelrec.errors import ArtifactError, DataError, FunnelrecError
from funnelrec.features import Features
from funnelrec.pipeline import build_tiny_artifact
from funnelrec.serving.package import (
    IMPRESSION_COUNTS_SCHEMA,
    impression_counts,
    load_package_config,
    package,
    training_watches,
)
from funnelrec.serving.recommender import MANIFEST, STATE_DIR, Recommender


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/{data, feat, cand, ranker, art}: the real pipeline, barely trained."""
    root = tmp_path_factory.mktemp("package")
    build_tiny_artifact(root, steps=30, simulate=["n_users=300", "days=14"])
    return root


def _parts(root: Path) -> tuple[Path, Path, Path]:
    return root / "feat", root / "cand", root / "ranker"


def _edit_json(path: Path, edit: dict[str, object]) -> None:
    meta = json.loads(path.read_text())
    for dotted, value in edit.items():
        node = meta
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(meta))


def test_layout_and_manifest(root: Path) -> None:
    art = root / "art"
    m = json.loads((art / MANIFEST).read_text())
    feats = Features.open(root / "feat")
    assert m["kind"] == "funnelrec-recommender" and m["format_version"] == 1
    assert m["data"]["fingerprint"] == feats.fingerprint
    assert m["data"]["now"] == Dataset.open(root / "data").manifest.time_range["max_ts"]
    assert len(m["fingerprint"]) == 16
    assert m["candidates"]["index"]["kind"] == "exact"  # ~1k items: exact by default
    assert m["candidates"]["index"]["built_by"] == "package"  # the candidates had none
    files = set(m["files"])
    for part in (
        "features/features.json",
        "features/transforms/rank_item.parquet",
        "candidates/model.safetensors",
        "candidates/item_embeddings.safetensors",
        "candidates/index/index.faiss",
        "ranker/model.safetensors",
        "sources/fresh/baseline.json",
        "sources/cowatch/baseline.json",
        "items.parquet",
        "users.parquet",
        "state/watches.parquet",
        "state/searches.parquet",
        "state/impressions.parquet",
    ):
        assert part in files, part
    # transforms only: the example shards stay behind
    assert not [f for f in files if f.startswith(("features/candidates", "features/ranking"))]
    assert not any(p.name.endswith(".pkl") for p in art.rglob("*"))
    assert {k: (art / k).stat().st_size for k in files} == m["files"]
    rec = Recommender.load(art)
    assert rec.fingerprint == m["fingerprint"] and rec.now == m["data"]["now"]


def test_sources_are_fitted_on_the_training_split_only(root: Path) -> None:
    ds, feats = Dataset.open(root / "data"), Features.open(root / "feat")
    users = np.asarray(ds.table("watches", ["user_id"]).column("user_id").to_numpy())
    per_user = np.bincount(users)
    held_out = 2 * int((per_user >= feats.config.min_watches).sum())  # leave-last-out
    train = training_watches(ds, feats)
    assert train.num_rows == len(users) - held_out
    cowatch = load_baseline(root / "art" / "sources" / "cowatch")
    assert isinstance(cowatch, CoWatch)
    refit = CoWatch().fit(train, cowatch.num_items)
    assert (cowatch.sim != refit.sim).nnz == 0
    everything = CoWatch().fit(ds.table("watches", ["user_id", "item_id", "ts"]), cowatch.num_items)
    assert (cowatch.sim != everything.sim).nnz > 0  # held-out watches were left out
    fresh = load_baseline(root / "art" / "sources" / "fresh")
    assert isinstance(fresh, Popularity) and fresh.cfg.fresh_half_life_s is not None
    assert fresh.now == ds.manifest.time_range["max_ts"]


def test_mismatched_parts_are_refused(root: Path, tmp_path: Path) -> None:
    feat, cand, ranker = _parts(root)
    other = tmp_path / "ranker"
    shutil.copytree(ranker, other)
    _edit_json(other / "config.json", {"data.fingerprint": "0000000000000000"})
    with pytest.raises(ArtifactError, match="trained on data with fingerprint 0000000000000000"):
        package(feat, cand, other, tmp_path / "art", progress=False)
    assert not (tmp_path / "art").exists()
    assert not list(tmp_path.glob(".art.tmp-*"))  # nothing half-written is left
    shutil.copytree(ranker, other, dirs_exist_ok=True)
    _edit_json(other / "config.json", {"spec.dense_columns": ["x"]})
    with pytest.raises(ArtifactError, match="feature spec differs"):
        package(feat, cand, other, tmp_path / "art", progress=False)
    cand2 = tmp_path / "cand"
    shutil.copytree(cand, cand2)
    _edit_json(cand2 / "config.json", {"vocab.item.digest": "feedfacefeedface"})
    with pytest.raises(ArtifactError, match="item vocabulary differs"):
        package(feat, cand2, ranker, tmp_path / "art", progress=False)
    with pytest.raises(FunnelrecError, match="already exists"):
        package(feat, cand, ranker, root / "art", progress=False)


def test_load_refuses_a_tampered_artifact(root: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(root / "art", art)
    config = art / "ranker" / "config.json"
    _edit_json(config, {"data.fingerprint": "0000000000000000"})
    with pytest.raises(ArtifactError, match=r"ranker/config.json has .* bytes"):
        Recommender.load(art)
    # with the manifest's size made to match, the content hash still tells
    m = json.loads((art / MANIFEST).read_text())
    m["files"]["ranker/config.json"] = config.stat().st_size
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"ranker/config\.json does not match its content hash"):
        Recommender.load(art)
    # and with the hash made to match too, the parts must agree
    m["sha256"]["ranker/config.json"] = file_sha256(config)
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="ranker was trained on data 0000000000000000"):
        Recommender.load(art)
    shutil.copy2(root / "art" / "ranker" / "config.json", config)
    m["files"]["ranker/config.json"] = config.stat().st_size
    m["sha256"]["ranker/config.json"] = file_sha256(config)
    m["data"]["fingerprint"] = "1111111111111111"
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"features of data .*, the artifact is of data 1111"):
        Recommender.load(art)
    m["format_version"] = 99
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99"):
        Recommender.load(art)
    with pytest.raises(ArtifactError, match="not a recommender artifact"):
        Recommender.load(root / "cand")
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        Recommender.load(tmp_path / "nowhere")


def test_load_refuses_weights_damaged_in_place(root: Path, tmp_path: Path) -> None:
    """Weights overwritten with NaN, the file's size unchanged: the content hash refuses
    the artifact, and the weights' own check refuses NaN even where the hash was redone."""
    art = tmp_path / "art"
    shutil.copytree(root / "art", art)
    weights = art / "ranker" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # safetensors: header size, header, data
    assert all(v.dtype == torch.float32 for v in load_file(str(weights)).values())
    nan = np.float32("nan").tobytes()
    raw[start:] = nan * ((len(raw) - start) // 4)
    weights.write_bytes(bytes(raw))
    m = json.loads((art / MANIFEST).read_text())
    assert weights.stat().st_size == m["files"]["ranker/model.safetensors"]
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match its content hash"):
        Recommender.load(art)
    m["sha256"]["ranker/model.safetensors"] = file_sha256(weights)
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="holds NaN or infinite values"):
        Recommender.load(art)
    # a manifest without the hashes (packaged before they were listed): its fingerprint
    del m["sha256"]
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not match the manifest's fingerprint"):
        Recommender.load(art)
    shutil.copy2(root / "art" / "ranker" / "model.safetensors", weights)
    assert Recommender.load(art).fingerprint == m["fingerprint"]


def test_an_index_in_the_candidate_artifact_is_checked_and_kept(root: Path, tmp_path: Path) -> None:
    feat, cand, ranker = _parts(root)
    cand2 = tmp_path / "cand"
    shutil.copytree(cand, cand2)
    emb, ids = load_item_embeddings(cand2)
    ItemIndex.build(emb.numpy(), ids.numpy(), kind="hnsw").save(cand2 / "index")
    art = package(feat, cand2, ranker, tmp_path / "art", progress=False)
    index = json.loads((art / MANIFEST).read_text())["candidates"]["index"]
    assert index["kind"] == "hnsw" and index["built_by"] == "candidates artifact"
    assert Recommender.load(art).index.kind == "hnsw"
    # an index over other items does not fit these embeddings
    shutil.rmtree(cand2 / "index")
    ItemIndex.build(emb.numpy()[:-1], ids.numpy()[:-1]).save(cand2 / "index")
    with pytest.raises(ArtifactError, match="item-id mapping"):
        package(feat, cand2, ranker, tmp_path / "art2", progress=False)


def test_config_overrides_reach_the_manifest_and_the_recommender(
    root: Path, tmp_path: Path
) -> None:
    cfg = load_package_config(None, ["serving.deep_k=40", "cowatch.neighbours=7", "state_n=3"])
    art = package(*_parts(root), tmp_path / "art", config=cfg, progress=False)
    m = json.loads((art / MANIFEST).read_text())
    assert m["serving"]["deep_k"] == 40 and m["sources"]["cowatch"]["neighbours"] == 7
    rec = Recommender.load(art)
    assert rec.config.deep_k == 40 and rec.cowatch.cfg.neighbours == 7
    assert m["counts"]["state_watches"] <= 3 * m["counts"]["users"]
    with pytest.raises(FunnelrecError, match=r"unknown config key 'serving\.deep'"):
        load_package_config(None, ["serving.deep=1"])


def test_cli_command(root: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(package_command)
    feat, cand, ranker = _parts(root)
    args = ["-f", str(feat), "-c", str(cand), "-r", str(ranker), "-o", str(tmp_path / "a")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "funnelrec serve" in res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "already exists" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "--force", "serving.fresh_k=5"])
    assert res.exit_code == 0, res.output
    assert Recommender.load(tmp_path / "a").config.fresh_k == 5


def _grouped_by_arrow(impressions: pa.Table) -> pa.Table:
    agg = impressions.group_by(["user_id", "item_id"]).aggregate([("ts", "count"), ("ts", "max")])
    return pa.table(
        [agg["user_id"], agg["item_id"], agg["ts_count"], agg["ts_max"]],
        schema=IMPRESSION_COUNTS_SCHEMA,
    ).sort_by([("user_id", "ascending"), ("item_id", "ascending")])


def test_impression_counts_are_arrows_group_by_sorted(root: Path) -> None:
    rng = np.random.default_rng(3)
    n = 5_000
    shuffled = pa.table(
        {
            "user_id": rng.integers(0, 40, n),
            "item_id": rng.integers(0, 60, n),
            "ts": rng.integers(0, 1_000, n),
        }
    )
    assert impression_counts(shuffled).equals(_grouped_by_arrow(shuffled))
    assert impression_counts(shuffled.slice(0, 0)).equals(IMPRESSION_COUNTS_SCHEMA.empty_table())
    # the artifact's seed is the same table for the tiny world's impressions
    imp = Dataset.open(root / "data").table("impressions", ["user_id", "item_id", "ts"])
    seeded = pq.read_table(root / "art" / STATE_DIR / "impressions.parquet")
    assert seeded.equals(_grouped_by_arrow(imp))
    with pytest.raises(DataError, match="negative"):
        impression_counts(pa.table({"user_id": [-1], "item_id": [0], "ts": [0]}))
