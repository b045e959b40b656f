"""The feature build on a Dask cluster: what the local engine builds, value for value;
resumable by the same progress record; a clear error without a scheduler."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.dataset import Dataset
from funnelrec.engines import (
    SCHEDULER_ENV,
    DaskEngine,
    LocalEngine,
    check_visible,
    local_path,
)
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig, blocked
from funnelrec.features.build import build_features

pytest.importorskip("distributed")
pytestmark = pytest.mark.usefixtures("dask_time_bound")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("dask-world")
    generate(
        preset_config("tiny", ["n_users=120", "days=6"]), seed=7, out=root / "d", progress=False
    )
    return Dataset.open(root / "d")


@pytest.fixture(scope="module")
def config(world: Dataset) -> FeaturesConfig:
    n = sum(world.num_rows(t) for t in ("watches", "searches", "impressions"))
    # cap=5 and rank_cap: per-block sampling, seeded by block, must match across engines
    return FeaturesConfig(history_n=20, search_n=10, cap=5, rank_cap=4, block_events=n // 4)


@pytest.fixture(scope="module")
def local_build(
    world: Dataset, config: FeaturesConfig, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("local") / "f"
    build_features(world, out, split="time", config=config, progress=False)
    return out


def _same_features(a: Features, b: Features) -> None:
    """Vocabularies, normalisers and every example shard equal, value for value."""
    assert a.manifest["timing"]["blocks"] == b.manifest["timing"]["blocks"] >= 4
    for key in ("counts", "oov", "vocabularies", "candidates", "ranking", "split", "config"):
        assert a.manifest[key] == b.manifest[key], key
    for name in a.manifest["vocabularies"]:
        va, vb = a.vocab(name), b.vocab(name)
        assert list(va.values) == list(vb.values), name
        assert np.array_equal(va.counts, vb.counts), name
    for norm in ("candidates_dense.json", "ranking_dense.json"):
        assert (a.path / "transforms" / norm).read_text() == (
            b.path / "transforms" / norm
        ).read_text(), norm
    assert np.array_equal(a.item_label_counts(), b.item_label_counts())
    n_files = 0
    for stage in ("candidates", "ranking"):
        for part in ("train", "valid", "test"):
            files_a, files_b = a.shards(stage, part), b.shards(stage, part)
            assert [p.name for p in files_a] == [p.name for p in files_b], (stage, part)
            for fa, fb in zip(files_a, files_b, strict=True):
                ta, tb = pq.read_table(fa), pq.read_table(fb)
                assert ta.schema.equals(tb.schema), fa.name
                for c in ta.column_names:
                    x, y = ta[c], tb[c]
                    if pa.types.is_floating(x.type):
                        assert np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True)
                    else:
                        assert x.equals(y), (fa.name, c)
                n_files += 1
    assert n_files >= 4 * 3


def test_the_dask_engine_builds_what_the_local_engine_builds(
    world: Dataset, config: FeaturesConfig, local_build: Path, cluster: str, tmp_path: Path
) -> None:
    out = tmp_path / "f"
    # file:// URIs in and out: the same paths the local engine was given as plain paths
    built = build_features(
        f"file://{world.path.resolve()}",
        f"file://{out}",
        split="time",
        config=config,
        progress=False,
        engine=DaskEngine(cluster),
    )
    assert built == out
    _same_features(Features.open(local_build), Features.open(out))


class _Recording(DaskEngine):
    """A Dask engine that records the blocks each pass sends to the cluster; with `keep`,
    the write pass records only `keep` blocks as written and then stops as Ctrl-C would."""

    def __init__(self, address: str, keep: int | None = None) -> None:
        super().__init__(address)
        self.keep = keep
        self.sent: dict[str, list[int]] = {}

    def map_blocks(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], done: Callable[[int, Any], None]
    ) -> None:
        self.sent[fn.__name__] = sorted(job.block for job in jobs)
        if self.keep is None or fn is not blocked._write_block_job:
            super().map_blocks(fn, jobs, done)
            return
        keep, finished = self.keep, []

        def some(b: int, result: Any) -> None:
            finished.append(b)
            if len(finished) <= keep:
                done(b, result)

        # every task ends before the interrupt: none still writes while the build resumes
        super().map_blocks(fn, jobs, some)
        raise KeyboardInterrupt


def test_an_interrupted_dask_build_resumes_without_redoing_written_blocks(
    world: Dataset, config: FeaturesConfig, local_build: Path, cluster: str, tmp_path: Path
) -> None:
    out = tmp_path / "f"
    first = _Recording(cluster, keep=2)
    with pytest.raises(KeyboardInterrupt):
        build_features(world, out, split="time", config=config, progress=False, engine=first)
    assert not out.exists()
    state = json.loads((tmp_path / ".f.partial" / "progress.json").read_text())
    written = state["blocks_done"]
    n_blocks = len(state["partition"]["edges"]) - 1
    assert len(written) == 2 and n_blocks >= 4
    assert first.sent["_count_block_job"] == list(range(n_blocks))

    again = _Recording(cluster)
    build_features(world, out, split="time", config=config, progress=False, engine=again)
    # neither the fit nor a block already written ran again
    assert "_count_block_job" not in again.sent
    assert again.sent["_write_block_job"] == sorted(set(range(n_blocks)) - set(written))
    feats = Features.open(out)
    assert feats.manifest["timing"]["resumed"] is True
    _same_features(Features.open(local_build), feats)


def test_the_dask_engine_needs_a_scheduler_address(
    world: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    with pytest.raises(FunnelrecError, match=f"--cluster tcp://HOST:8786.*{SCHEDULER_ENV}"):
        DaskEngine()
    args = ["--data", str(world.path), "--out", str(tmp_path / "f"), "--engine", "dask"]
    result = CliRunner().invoke(app, ["features", "build", *args])
    assert result.exit_code == 1 and isinstance(result.exception, FunnelrecError)
    assert SCHEDULER_ENV in str(result.exception)
    assert not (tmp_path / "f").exists()
    monkeypatch.setenv(SCHEDULER_ENV, "tcp://10.1.2.3:8786")
    assert DaskEngine().address == "tcp://10.1.2.3:8786"
    assert DaskEngine("tcp://other:8786").address == "tcp://other:8786"  # the flag first
    with pytest.raises(FunnelrecError, match="local:N"):
        DaskEngine("local:0")


def test_paths_are_local_or_file_uris(tmp_path: Path) -> None:
    assert local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert local_path("relative/x") == Path("relative/x")
    with pytest.raises(FunnelrecError, match="s3:// is not supported yet"):
        local_path("s3://bucket/features")


def test_a_folder_the_workers_cannot_see_is_named(tmp_path: Path) -> None:
    with pytest.raises(FunnelrecError, match=r"cannot see .*nowhere.*same path"):
        check_visible(LocalEngine(), [tmp_path, tmp_path / "nowhere"])
