"""The feature build over blocks of users: the same examples as the whole-data build,
bounded by blocks, and resumable after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig, blocked
from funnelrec.features.build import build_features
from funnelrec.features.loader import read_examples, read_requests
from funnelrec.features.partition import BlockTables, CountIndex, partition, plan_blocks
from funnelrec.features.splits import TimeIndex
from funnelrec.features.vocab import Vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("blocks")
    generate(
        preset_config("tiny", ["n_users=150", "days=8"]), seed=5, out=root / "d", progress=False
    )
    return Dataset.open(root / "d")


def _events(ds: Dataset) -> int:
    return sum(ds.num_rows(n) for n in ("watches", "searches", "impressions"))


def _config(**kw: object) -> FeaturesConfig:
    # No per-user sampling, so both builds make exactly the same examples.
    base: dict[str, object] = {"history_n": 20, "search_n": 10, "cap": None, "eval_cap": None}
    return FeaturesConfig(**{**base, **kw})  # type: ignore[arg-type]


def _nan_equal(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    if pa.types.is_floating(a.type):
        x, y = a.to_numpy(), b.to_numpy()
        return bool(np.array_equal(x, y, equal_nan=True))
    return bool(a.equals(b))


def _same_rows(a: pa.Table, b: pa.Table, keys: list[str], skip: tuple[str, ...] = ()) -> None:
    assert a.num_rows == b.num_rows
    assert a.column_names == b.column_names
    if keys:
        sort = [(k, "ascending") for k in keys]
        a, b = a.sort_by(sort), b.sort_by(sort)
    for c in a.column_names:
        if c not in skip:
            assert _nan_equal(a[c], b[c]), c


@pytest.mark.parametrize("split", ["last", "time"])
def test_blocks_make_the_examples_of_the_whole_data(
    world: Dataset, tmp_path: Path, split: str
) -> None:
    whole, blocked = tmp_path / "whole", tmp_path / "blocked"
    build_features(world, whole, split=split, config=_config(), progress=False)  # type: ignore[arg-type]
    n = _events(world)
    cfg = _config(block_events=n // 4)
    build_features(world, blocked, split=split, config=cfg, progress=False)  # type: ignore[arg-type]
    fw, fb = Features.open(whole), Features.open(blocked)
    assert fw.manifest["timing"]["blocks"] == 1
    assert fb.manifest["timing"]["blocks"] >= 4
    for key in ("counts", "oov", "vocabularies", "candidates", "ranking", "split"):
        assert fw.manifest[key] == fb.manifest[key], key
    for name in fw.manifest["vocabularies"]:
        vw, vb = fw.vocab(name), fb.vocab(name)
        assert list(vw.values) == list(vb.values) and np.array_equal(vw.counts, vb.counts), name
    assert np.array_equal(fw.item_label_counts(), fb.item_label_counts())
    # Every (sampled) training ranking value is in both fits: the same quantiles.
    assert (fw.path / "transforms" / "ranking_dense.json").read_text() == (
        fb.path / "transforms" / "ranking_dense.json"
    ).read_text()
    assert len(fb.shards("candidates", "train")) >= 4
    for part in ("valid", "test"):  # held-out examples keep their order: user id, then time
        a, b = read_examples(fw, "candidates", part), read_examples(fb, "candidates", part)
        assert a.num_rows > 0
        _same_rows(a, b, [])
    _same_rows(
        read_examples(fw, "candidates", "train"),
        read_examples(fb, "candidates", "train"),
        ["user_id", "ts", "label"],
    )
    for part in ("train", "valid", "test"):
        a, b = read_examples(fw, "ranking", part), read_examples(fb, "ranking", part)
        assert a.num_rows > 0
        keys = ["user_id", "request_id", "position"]
        _same_rows(a, b, keys, skip=("request_index",))
        # Each impression still points at its own request's bags.
        for f, t in ((fw, a), (fb, b)):
            req = read_requests(f, part)
            joined = req.take(t["request_index"])
            assert joined["request_id"].equals(t["request_id"])
            assert joined["user_id"].equals(t["user_id"])
        ra = read_requests(fw, part).take(
            a.sort_by([(k, "ascending") for k in keys])["request_index"]
        )
        rb = read_requests(fb, part).take(
            b.sort_by([(k, "ascending") for k in keys])["request_index"]
        )
        assert ra["history"].equals(rb["history"]) and ra["search"].equals(rb["search"])


def test_an_interrupted_blocked_build_resumes(
    world: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(cap=5, block_events=_events(world) // 5)
    straight = tmp_path / "straight"
    build_features(world, straight, config=cfg, progress=False)
    out = tmp_path / "f"
    real = blocked._write_block
    calls: list[int] = []

    def flaky(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third block
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(blocked, "_write_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_features(world, out, config=cfg, progress=False)
    assert not out.exists()
    state = json.loads((tmp_path / ".f.partial" / "progress.json").read_text())
    assert state["blocks_done"] == [0, 1]
    calls.clear()
    monkeypatch.setattr(blocked, "_write_block", real)
    build_features(world, out, config=cfg, progress=False)
    assert not (tmp_path / ".f.partial").exists()
    a, b = Features.open(straight), Features.open(out)
    assert b.manifest["timing"]["resumed"] is True
    assert a.manifest["counts"] == b.manifest["counts"]
    # Sampling is seeded per block, so the resumed build wrote the very same shards.
    for stage in ("candidates", "ranking"):
        for part in ("train", "valid", "test"):
            names_a = [p.name for p in a.shards(stage, part)]
            assert names_a == [p.name for p in b.shards(stage, part)]
            for pa_, pb_ in zip(a.shards(stage, part), b.shards(stage, part), strict=True):
                ta, tb = pq.read_table(pa_), pq.read_table(pb_)
                for c in ta.column_names:
                    assert _nan_equal(ta[c], tb[c]), (pa_.name, c)


def test_a_partial_build_of_other_config_starts_over(world: Dataset, tmp_path: Path) -> None:
    work = tmp_path / ".f.partial"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"key": {"other": 1}, "blocks_done": [0]}))
    (work / "stale.txt").write_text("x")
    cfg = _config(block_events=_events(world) // 3)
    build_features(world, tmp_path / "f", config=cfg, progress=False)
    assert Features.open(tmp_path / "f").manifest["timing"]["resumed"] is False
    assert not work.exists()
    assert not (tmp_path / "f" / "stale.txt").exists()


def test_partition_puts_every_event_in_its_users_block(world: Dataset, tmp_path: Path) -> None:
    n = _events(world)
    plan = plan_blocks(n_events=n, n_users=150, block_events=-(-n // 3))
    assert plan.n_blocks == 3
    summary = partition(world, tmp_path / "b", plan)
    for name in ("watches", "searches", "impressions"):
        assert sum(summary.rows[name]) == world.num_rows(name)
        for b in range(plan.n_blocks):
            t = BlockTables(tmp_path / "b", b).table(name)
            users = t["user_id"].to_numpy()
            assert ((users >= plan.edges[b]) & (users < plan.edges[b + 1])).all()
    w = world.table("watches")
    assert np.array_equal(summary.watch_ts, w["ts"].to_numpy())
    assert np.array_equal(summary.watch_item, w["item_id"].to_numpy())


def test_count_index_counts_like_a_time_index() -> None:
    rng = np.random.default_rng(0)
    group = rng.integers(0, 50, 5000)
    ts = rng.integers(1_000, 2_000, 5000)
    index = CountIndex.build(group, ts)
    assert len(index.keys) == 5000 and group.max() < 50  # the input was copied, not consumed
    q_group = rng.integers(0, 60, 3000)
    q_ts = rng.integers(900, 2_100, 3000)
    start, end = TimeIndex(group, ts).before(q_group, q_ts)
    assert np.array_equal(index.count_before(q_group, q_ts), end - start)


def test_count_index_saves_and_loads(tmp_path: Path) -> None:
    index = CountIndex.build(np.array([3, 1, 3]), np.array([10, 20, 30]))
    index.save(tmp_path / "i.npy")
    back = CountIndex.load(tmp_path / "i.npy", index.lo, index.span)
    assert back.count_before(np.array([3, 3, 1, 2]), np.array([31, 30, 21, 99])).tolist() == [
        2,
        1,
        1,
        0,
    ]


def test_vocabulary_from_counts_matches_fit() -> None:
    values = np.array([5, 3, 5, 9, 3, 5, 7])
    fit = Vocabulary.fit("item", values, max_size=2)
    parts = [np.unique(values[:3], return_counts=True), np.unique(values[3:], return_counts=True)]
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    got = Vocabulary.from_counts("item", keys, counts, max_size=2)
    assert got.values.tolist() == fit.values.tolist()
    assert got.counts.tolist() == fit.counts.tolist() and got.counts.dtype == np.int64
    s = Vocabulary.from_counts("t", pa.array(["b", "a", "b", None]), np.array([1, 2, 3, 4]))
    assert s.values.tolist() == ["b", "a"] and s.counts.tolist() == [0, 4, 2]


def test_worker_processes_write_the_same_examples(world: Dataset, tmp_path: Path) -> None:
    cfg = _config(cap=5, block_events=_events(world) // 3)
    one, two = tmp_path / "one", tmp_path / "two"
    build_features(world, one, split="time", config=cfg, progress=False)
    build_features(world, two, split="time", config=cfg, progress=False, workers=2)
    a, b = Features.open(one), Features.open(two)
    assert a.manifest["counts"] == b.manifest["counts"]
    assert a.manifest["vocabularies"] == b.manifest["vocabularies"]
    for stage in ("candidates", "ranking"):
        for part in ("train", "valid", "test"):
            for pa_, pb_ in zip(a.shards(stage, part), b.shards(stage, part), strict=True):
                assert pa_.name == pb_.name
                ta, tb = pq.read_table(pa_), pq.read_table(pb_)
                for c in ta.column_names:
                    assert _nan_equal(ta[c], tb[c]), (pa_.name, c)
    with pytest.raises(FunnelrecError, match="workers"):
        build_features(world, tmp_path / "x", config=cfg, progress=False, workers=0)


@pytest.mark.parametrize("blocks", [1, 3])
def test_rank_cap_keeps_whole_pages_of_a_few_requests_per_user(
    world: Dataset, tmp_path: Path, blocks: int
) -> None:
    n = _events(world)
    full, capped = tmp_path / "full", tmp_path / "capped"
    build_features(world, full, split="time", config=_config(block_events=n), progress=False)
    cfg = _config(rank_cap=2, block_events=n if blocks == 1 else n // blocks)
    build_features(world, capped, split="time", config=cfg, progress=False)
    ff, fc = Features.open(full), Features.open(capped)
    a, b = read_examples(ff, "ranking", "train"), read_examples(fc, "ranking", "train")
    pages = b.group_by(["user_id", "request_id"]).aggregate([("position", "count")])
    per_user = pages.group_by("user_id").aggregate([("request_id", "count")])
    assert 0 < b.num_rows < a.num_rows
    assert max(per_user["request_id_count"].to_pylist()) == 2
    # A kept page keeps every impression it had.
    full_pages = a.group_by(["user_id", "request_id"]).aggregate([("position", "count")])
    sizes = dict(
        zip(
            zip(
                full_pages["user_id"].to_pylist(), full_pages["request_id"].to_pylist(), strict=True
            ),
            full_pages["position_count"].to_pylist(),
            strict=True,
        )
    )
    for u, r, c in zip(
        pages["user_id"].to_pylist(),
        pages["request_id"].to_pylist(),
        pages["position_count"].to_pylist(),
        strict=True,
    ):
        assert sizes[(u, r)] == c
    req = read_requests(fc, "train")
    assert req.num_rows == pages.num_rows
    assert req.take(b["request_index"])["request_id"].equals(b["request_id"])
    for part in ("valid", "test"):
        assert ff.manifest["counts"]["ranking"][part] == fc.manifest["counts"]["ranking"][part]
    assert fc.manifest["counts"]["ranking"]["train"] == b.num_rows


def test_blocks_honour_candidate_columns_off(world: Dataset, tmp_path: Path) -> None:
    """The blocked build ignores the impressions' cand_source / cand_score under
    `candidate_columns=false` as the whole-data build does; on (the default) both are
    ranking features."""
    n = _events(world)
    whole, blocked, on = tmp_path / "whole", tmp_path / "blocked", tmp_path / "on"
    off = _config(candidate_columns=False)
    build_features(world, whole, split="time", config=off, progress=False)
    cfg = _config(candidate_columns=False, block_events=n // 3)
    build_features(world, blocked, split="time", config=cfg, progress=False)
    build_features(world, on, split="time", config=_config(block_events=n // 3), progress=False)
    fw, fb, fo = Features.open(whole), Features.open(blocked), Features.open(on)
    assert fb.manifest["timing"]["blocks"] >= 3 and fo.manifest["timing"]["blocks"] >= 3
    assert "source" in fo.manifest["vocabularies"]
    assert "cand_score" in fo.manifest["ranking"]["raw_continuous"]
    assert fo.manifest["config"]["candidate_columns"] is True
    assert fb.manifest["config"]["candidate_columns"] is False
    assert "source" not in fb.manifest["vocabularies"]
    assert "cand_score" not in fb.manifest["ranking"]["raw_continuous"]
    assert ["source", "source"] not in fb.ranking_spec["categorical"]
    for key in ("counts", "vocabularies", "ranking"):
        assert fw.manifest[key] == fb.manifest[key], key
    for part in ("train", "valid", "test"):
        a, b = read_examples(fw, "ranking", part), read_examples(fb, "ranking", part)
        assert not {"source", "cand_score"} & set(b.column_names)
        _same_rows(a, b, ["user_id", "request_id", "position"], skip=("request_index",))


def test_blocks_without_impressions_or_held_out_watches(tmp_path: Path) -> None:
    # Blocks of a few events: some hold no impression and some no held-out watch, and
    # each block's counts must still land at its own index.
    from tests.data.test_damaged import write_world

    data = write_world(tmp_path / "data")
    whole, small = tmp_path / "whole", tmp_path / "small"
    build_features(data, whole, config=_config(), progress=False)
    build_features(data, small, config=_config(block_events=3), progress=False)
    fw, fs = Features.open(whole), Features.open(small)
    assert fs.manifest["timing"]["blocks"] > 2
    assert fw.manifest["counts"] == fs.manifest["counts"]
    for part in ("train", "valid", "test"):
        a, b = read_examples(fw, "candidates", part), read_examples(fs, "candidates", part)
        assert a.num_rows == b.num_rows, part
