"""Features built to and read from a filesystem other than the local one (memory:// here,
through fsspec, as s3:// and gs:// go through pyarrow's own): the same values as a local
build, shards read in place, unfinished directories refused."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
import torch
from pyarrow import fs as pafs
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.dataset import MANIFEST as DATA_MANIFEST
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import MANIFEST, Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import candidate_loader, ranking_loader, read_requests
from funnelrec.filesystems import resolve, upload_tree
from tests.features.test_loader import write_random_world

CFG = FeaturesConfig(history_n=8, search_n=4, cap=None, row_group_rows=100, rows_per_shard=450)
# small blocks: the build in blocks of users (its own staging and resume folder)
BLOCKED = FeaturesConfig(
    history_n=8, search_n=4, cap=None, row_group_rows=100, rows_per_shard=450, block_events=600
)


def _memory(name: str) -> str:
    """A fresh memory:// folder (the memory filesystem is one per process)."""
    return f"memory://t-{uuid.uuid4().hex[:8]}/{name}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, str]:
    """The tiny world on disk, and the same dataset uploaded to memory://."""
    root = tmp_path_factory.mktemp("fs")
    data = write_random_world(root / "data")
    remote = _memory("data")
    upload_tree(data, resolve(remote), marker=DATA_MANIFEST)
    return data, remote


def _files(feat: Features) -> dict[str, Path | str]:
    """Every file of a features directory but its manifest, by relative path."""
    loc = feat.location or resolve(feat.path)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    root = loc.path.rstrip("/") + "/"
    return {
        i.path.removeprefix(root): i.path
        for i in infos
        if i.is_file and not i.path.endswith("/" + MANIFEST)
    }


def _comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m.pop("timing")
    m["data"].pop("path")
    return m


@pytest.mark.parametrize("cfg", [CFG, BLOCKED], ids=["in-memory", "blocked"])
def test_memory_build_equals_local_build(world, tmp_path, cfg):
    data, remote = world
    local = Features.open(build_features(data, tmp_path / "feat", config=cfg, progress=False))
    out = _memory("feat")
    assert build_features(remote, out, config=cfg, progress=False) == out
    far = Features.open(out)
    assert far.location is not None and far.uri == out
    assert far.manifest["data"]["path"] == remote
    assert _comparable(far.manifest) == _comparable(local.manifest)
    mine, theirs = _files(local), _files(far)
    assert sorted(mine) == sorted(theirs)
    assert any(k.startswith("candidates/train/part-") for k in mine)
    assert any(k.startswith("ranking/train/") for k in mine)
    assert any(k.startswith("transforms/") for k in mine)
    for rel in mine:
        # byte for byte: the same values (NaN included) written by the same writer
        with far.location.fs.open_input_stream(theirs[rel]) as f:
            assert Path(mine[rel]).read_bytes() == f.read(), rel
    for name in local.manifest["vocabularies"]:
        assert local.vocab(name).counts.tolist() == far.vocab(name).counts.tolist()
    assert local.normalizer("ranking").to_dict() == far.normalizer("ranking").to_dict()


def _same_batches(a, b) -> None:
    xs, ys = list(a), list(b)
    assert len(xs) == len(ys) > 1
    for x, y in zip(xs, ys, strict=True):
        for field, value in vars(x).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(y, field)), field


def test_loader_reads_shards_in_place(world, tmp_path):
    data, remote = world
    local = build_features(data, tmp_path / "feat", config=CFG, progress=False)
    out = build_features(remote, _memory("feat"), config=CFG, progress=False)
    for split in ("train", "valid"):
        _same_batches(
            candidate_loader(local, split, 16, shuffle=True, seed=3),
            candidate_loader(out, split, 16, shuffle=True, seed=3),
        )
    _same_batches(
        ranking_loader(local, "train", 64, shuffle=True, seed=3, rank=1, world_size=2),
        ranking_loader(out, "train", 64, shuffle=True, seed=3, rank=1, world_size=2),
    )
    assert read_requests(local, "test").equals(read_requests(out, "test"))
    with pytest.raises(ArtifactError, match="not on a local filesystem"):
        Features.open(out).shards("candidates", "train")


def test_unknown_scheme_is_refused(world, tmp_path):
    with pytest.raises(FunnelrecError, match="unknown filesystem scheme 'nosuchfs://'"):
        resolve("nosuchfs://bucket/feat")
    with pytest.raises(FunnelrecError, match="nosuchfs"):
        build_features(world[0], "nosuchfs://bucket/feat", config=CFG, progress=False)


def test_unfinished_directories_are_refused(world):
    data, remote = world
    out = build_features(remote, _memory("feat"), config=CFG, progress=False)
    loc = resolve(out)
    # the manifest is the completion marker: a build or upload cut short has none
    loc.fs.delete_file(loc.join(MANIFEST).path)
    with pytest.raises(ArtifactError, match="has not finished"):
        Features.open(out)
    with pytest.raises(ArtifactError, match="has not finished"):
        candidate_loader(out, "train")
    half = _memory("data")
    upload_tree(data, resolve(half), marker=DATA_MANIFEST)
    resolve(half).fs.delete_file(resolve(half).join(DATA_MANIFEST).path)
    with pytest.raises(ArtifactError, match="still being written"):
        Dataset.open(half)


def test_existing_output_needs_force(world):
    _, remote = world
    out = build_features(remote, _memory("feat"), config=CFG, progress=False)
    with pytest.raises(FunnelrecError, match="already exists"):
        build_features(remote, out, config=CFG, progress=False)
    build_features(remote, out, config=CFG, progress=False, force=True)
    assert Features.open(out).num_examples("candidates", "train") > 0


def test_cli_builds_and_describes_on_memory(world):
    _, remote = world
    out = _memory("feat")
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["features", "build", "--data", remote, "--out", out, "history_n=8", "search_n=4"],
    )
    assert res.exit_code == 0, res.output
    assert out in res.output
    res = runner.invoke(app, ["features", "describe", out])
    assert res.exit_code == 0, res.output


def test_train_candidates_reads_features_on_memory(world, tmp_path):
    _, remote = world
    out = build_features(remote, _memory("feat"), config=CFG, progress=False)
    config = Path(__file__).parents[2] / "configs" / "candidates-tiny.toml"
    art = tmp_path / "cand"
    args = ["train", "candidates", "-f", out, "-o", str(art), "--config", str(config)]
    res = CliRunner().invoke(app, [*args, "dim=8", "epochs=1", "patience=0", "threads=1"])
    assert res.exit_code == 0, res.output
    assert (art / "config.json").is_file()


def test_train_ranker_reads_features_on_memory(world, tmp_path):
    _, remote = world
    out = build_features(remote, _memory("feat"), config=CFG, progress=False)
    art = tmp_path / "ranker"
    args = ["train", "ranker", "-f", out, "-o", str(art), "model.tower=8", "train.epochs=1"]
    res = CliRunner().invoke(app, [*args, "train.threads=1"])
    assert res.exit_code == 0, res.output
    assert (art / "config.json").is_file()


def test_a_copy_of_the_features_sent_to_a_worker_leaves_the_local_files(world):
    _, remote = world
    feats = Features.open(build_features(remote, _memory("feat"), config=CFG, progress=False))
    clone = pickle.loads(pickle.dumps(feats))
    del clone
    assert feats.vocab("item") is not None and (feats.path / MANIFEST).is_file()
