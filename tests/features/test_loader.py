"""The example loader: batches for nn.EmbeddingBag, every row once, repeatable shuffles."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from funnelrec.data.dataset import DatasetWriter
from funnelrec.errors import ArtifactError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import (
    bag,
    candidate_loader,
    ranking_loader,
    read_examples,
    read_requests,
    seen_items,
)


def write_random_world(path: Path, seed: int = 0) -> Path:
    """~60 users, 80 items, ~1,500 watches, searches and impressions with random content."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 80
    n_w = 1500
    user = rng.integers(1, n_users + 1, size=n_w)
    item = rng.zipf(1.5, size=n_w) % n_items + 1
    ts = rng.integers(0, 10_000, size=n_w)
    words = np.array(["cat", "dog", "fun", "news", "song", "game"])
    n_s = 300
    n_r = 200
    with DatasetWriter(path, source="test") as w:
        w.write(
            "users",
            pa.table(
                {
                    "user_id": np.arange(1, n_users + 1),
                    "age": pa.array(rng.uniform(10, 80, n_users), pa.float32()),
                    "region": rng.choice(["a", "b", "c"], n_users).tolist(),
                }
            ),
        )
        w.write(
            "items",
            pa.table(
                {
                    "item_id": np.arange(1, n_items + 1),
                    "duration_s": pa.array(rng.lognormal(5, 1, n_items), pa.float32()),
                    "channel_id": rng.integers(1, 10, n_items),
                    "upload_ts": rng.integers(-1000, 5000, n_items),
                }
            ),
        )
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": user,
                    "item_id": item,
                    "ts": ts,
                    "watch_time_s": pa.nulls(n_w, pa.float32()),
                    "source": pa.nulls(n_w, pa.string()),
                }
            ),
        )
        w.write(
            "searches",
            pa.table(
                {
                    "user_id": rng.integers(1, n_users + 1, n_s),
                    "ts": rng.integers(0, 10_000, n_s),
                    "query": [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(n_s)],
                }
            ),
        )
        slate = 5
        req_user = rng.integers(1, n_users + 1, n_r)
        req_ts = rng.integers(0, 10_000, n_r)
        clicked = rng.random(n_r * slate) < 0.2
        w.write(
            "impressions",
            pa.table(
                {
                    "request_id": np.repeat(np.arange(1, n_r + 1), slate),
                    "user_id": np.repeat(req_user, slate),
                    "item_id": rng.integers(1, n_items + 1, n_r * slate),
                    "ts": np.repeat(req_ts, slate),
                    "position": pa.array(np.tile(np.arange(slate), n_r), pa.int32()),
                    "clicked": clicked,
                    "watch_time_s": pa.array(
                        np.where(clicked, rng.exponential(100, n_r * slate), 0), pa.float32()
                    ),
                }
            ),
        )
    return path


@pytest.fixture(scope="module")
def feat(tmp_path_factory) -> Features:
    root = tmp_path_factory.mktemp("loader")
    data = write_random_world(root / "data")
    cfg = FeaturesConfig(history_n=8, search_n=4, cap=None, row_group_rows=100, rows_per_shard=450)
    build_features(data, root / "feat", config=cfg, progress=False)
    return Features.open(root / "feat")


def _keys(batches) -> list[tuple[int, int, int]]:
    return [
        (u, t, lab)
        for b in batches
        for u, t, lab in zip(b.user_id.tolist(), b.ts.tolist(), b.label.tolist(), strict=True)
    ]


def test_batches_match_the_shards_row_for_row(feat) -> None:
    assert len(feat.shards("candidates", "train")) > 1  # several files, several row groups
    rows = read_examples(feat, "candidates", "train").to_pylist()
    loader = candidate_loader(feat, "train", batch_size=64)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(rows) // 64)
    i = 0
    for b in batches:
        assert b.history.dtype == torch.int64 and b.history_offsets.shape == (len(b),)
        hist_ends = torch.cat([b.history_offsets[1:], torch.tensor([b.history.numel()])])
        search_ends = torch.cat([b.search_offsets[1:], torch.tensor([b.search.numel()])])
        for j in range(len(b)):
            r = rows[i]
            assert b.history[b.history_offsets[j] : hist_ends[j]].tolist() == r["history"]
            assert b.search[b.search_offsets[j] : search_ends[j]].tolist() == r["search"]
            assert b.dense[j].tolist() == pytest.approx(r["dense"])
            assert (b.label[j].item(), b.user_id[j].item(), b.ts[j].item()) == (
                r["label"], r["user_id"], r["ts"],
            )  # fmt: skip
            assert b.region[j].item() == r["region"]
            assert b.example_age[j].item() == pytest.approx(r["example_age"])
            i += 1
    assert i == len(rows)


def test_shuffle_is_a_repeatable_permutation_per_epoch(feat) -> None:
    plain = sorted(_keys(candidate_loader(feat, "train", batch_size=50)))
    loader = candidate_loader(feat, "train", batch_size=50, shuffle=True, seed=7)
    e0 = _keys(loader)
    e1 = _keys(loader)
    assert sorted(e0) == plain and sorted(e1) == plain  # every row exactly once
    assert e0 != e1  # a new order each epoch
    again = candidate_loader(feat, "train", batch_size=50, shuffle=True, seed=7)
    assert _keys(again) == e0
    again.set_epoch(1)
    assert _keys(again) == e1  # resuming at epoch 1 gives epoch 1's order
    other = candidate_loader(feat, "train", batch_size=50, shuffle=True, seed=8)
    assert _keys(other) != e0
    # Shuffling mixes rows across row groups, not only inside them.
    first = [k for k in e0[:50]]
    assert len({u for u, _, _ in first}) > 10


def test_drop_last_and_workers(feat) -> None:
    n = feat.num_examples("candidates", "train")
    loader = candidate_loader(feat, "train", batch_size=64, drop_last=True)
    sizes = [len(b) for b in loader]
    assert set(sizes) == {64} and len(sizes) == n // 64 == len(loader)
    two = candidate_loader(feat, "train", batch_size=64, num_workers=2)
    assert sorted(_keys(two)) == sorted(_keys(candidate_loader(feat, "train", batch_size=64)))


def test_batches_feed_embedding_bag(feat) -> None:
    b = next(iter(candidate_loader(feat, "valid", batch_size=32)))
    table = torch.nn.EmbeddingBag(len(feat.vocab("item")), 8, mode="mean", padding_idx=0)
    out = table(b.history, b.history_offsets)
    assert out.shape == (len(b), 8)
    empty = torch.diff(b.history_offsets, append=torch.tensor([b.history.numel()])) == 0
    assert torch.all(out[empty] == 0)
    assert b.dense.shape == (len(b), len(feat.candidate_spec["dense_columns"]))


def test_ranking_batches(feat) -> None:
    spec = feat.ranking_spec
    rows = read_examples(feat, "ranking", "train").to_pylist()
    batches = list(ranking_loader(feat, "train", batch_size=128))
    assert sum(len(b) for b in batches) == len(rows) == feat.num_examples("ranking", "train")
    b = batches[0]
    assert list(b.categorical) == [f for f, _ in spec["categorical"]]
    assert list(b.bags) == [f for f, _ in spec["bags"]]
    assert b.dense.shape == (len(b), len(spec["dense_columns"]))
    norm = feat.normalizer("ranking")
    raw = {
        c: np.array([r[c] for r in rows[: len(b)]], dtype=np.float64) for c in norm.input_columns
    }
    np.testing.assert_allclose(b.dense.numpy(), norm.transform(raw), rtol=1e-6)
    assert b.label.tolist() == [r["label"] for r in rows[: len(b)]]
    assert b.watch_time.tolist() == pytest.approx([r["watch_time"] for r in rows[: len(b)]])
    assert b.request_id.tolist() == [r["request_id"] for r in rows[: len(b)]]
    requests = read_requests(feat, "train").to_pylist()
    ids, offsets = b.bags["history"]
    ends = torch.cat([offsets[1:], torch.tensor([ids.numel()])])
    for j, r in enumerate(rows[: len(b)]):
        q = requests[r["request_index"]]
        assert (q["request_id"], q["user_id"], q["ts"]) == (r["request_id"], r["user_id"], r["ts"])
        assert ids[offsets[j] : ends[j]].tolist() == q["history"]
    assert offsets[0] == 0 and offsets.shape == (len(b),)
    # valid/test keep the impressions of one request together, in position order
    v = read_examples(feat, "ranking", "valid", ["request_id", "position"]).to_pylist()
    first_seen: dict[int, int] = {}
    for i, r in enumerate(v):
        first_seen.setdefault(r["request_id"], i)
        assert i - first_seen[r["request_id"]] == r["position"]


def test_bag_of_sliced_list_column() -> None:
    col = pa.array([[1, 2], [], [3], [4, 5, 6]], pa.list_(pa.int32())).slice(1, 3)
    ids, offsets = bag(col)
    assert ids.tolist() == [3, 4, 5, 6] and offsets.tolist() == [0, 0, 1]


def test_seen_items_and_errors(feat) -> None:
    flat, offsets = seen_items(feat, "test")
    assert len(offsets) == feat.num_examples("candidates", "test") + 1
    for a, b in itertools.pairwise(offsets):
        items = flat[a:b]
        assert np.all(np.diff(items) > 0) and np.all(items > 0)  # distinct, sorted, no OOV
    with pytest.raises(ArtifactError):
        seen_items(feat, "train")
    with pytest.raises(Exception, match="split must be one of"):
        candidate_loader(feat, "bogus")


def test_a_limit_reads_only_the_first_rows(feat) -> None:
    whole = read_examples(feat, "candidates", "train")
    for limit in (0, 1, 99, 100, 101, 450, 451, whole.num_rows, whole.num_rows + 5):
        part = read_examples(feat, "candidates", "train", ["user_id", "ts"], limit=limit)
        assert part.column_names == ["user_id", "ts"]
        assert part.equals(whole.select(["user_id", "ts"]).slice(0, limit))
    flat, offsets = seen_items(feat, "test")
    f3, o3 = seen_items(feat, "test", limit=3)
    assert len(o3) == 4 and np.array_equal(o3, offsets[:4])
    assert np.array_equal(f3, flat[: offsets[3]])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("whole_groups", [False, True], ids=["cut groups", "whole groups"])
def test_ranks_share_out_every_row_once_per_epoch(
    feat, world: int, whole_groups: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import funnelrec.features.loader

    # 1: as with many row groups per rank, which read disjoint row groups; 16: as with
    # small data, where row groups are cut into parts
    monkeypatch.setattr(funnelrec.features.loader, "MIN_UNITS_PER_RANK", 1 if whole_groups else 16)
    plain = sorted(_keys(candidate_loader(feat, "train", batch_size=50)))
    loaders = [
        candidate_loader(feat, "train", batch_size=20, shuffle=True, seed=3, rank=r,
                         world_size=world)
        for r in range(world)
    ]  # fmt: skip
    units = loaders[0].shards.units
    groups = sum(pq.ParquetFile(f).num_row_groups for f in feat.shards("candidates", "train"))
    if whole_groups:
        assert len(units) == groups and all(first == 0 for _, _, first, _ in units)
    else:
        assert groups < 16 * world <= len(units)
    shares_of_epoch = []
    for _ in range(2):
        shares = [_keys(loader) for loader in loaders]
        assert sorted(k for share in shares for k in share) == plain  # each row once, one rank
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= max(rows for *_, rows in units)
        shares_of_epoch.append(shares)
    assert shares_of_epoch[0][0] != shares_of_epoch[1][0]  # a new order (and share) each epoch
    # a resumed rank gets the same share of an epoch
    again = candidate_loader(feat, "train", batch_size=20, shuffle=True, seed=3, rank=1,
                             world_size=world)  # fmt: skip
    again.set_epoch(1)
    assert _keys(again) == shares_of_epoch[1][1]
    with pytest.raises(ValueError, match=r"rank 2 is not in 0\.\.1"):
        candidate_loader(feat, "train", rank=2, world_size=2)
