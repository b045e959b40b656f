"""Serving-time ranking features equal the training examples' for the same moment."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from funnelrec.data.dataset import Dataset
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import read_examples, read_requests
from funnelrec.features.serving import RankingFeaturizer, ServingItems, UserEvents
from funnelrec.ranking.model import RankingFeatureSpec
from funnelrec.simulate import POLICY_SOURCES, generate, preset_config

SOURCES = ("deep", "fresh", "cowatch")


def _source(item: np.ndarray) -> list[str]:
    """A made-up candidate source per item (a function of the id, so serving can redo it)."""
    return [SOURCES[i % 3] for i in np.asarray(item).tolist()]


def _score(item: np.ndarray) -> np.ndarray:
    return np.asarray(item, dtype=np.float64) * 0.01


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Dataset, Features]]:
    """Features of one small world: "sim" as simulated (the impressions carry the logging
    policy's source and score, which become ranking features), "plain" without those two
    columns, "cand" with made-up ones in their place; "off" and "off_given" with
    `candidate_columns=false`, of the simulated impressions and of the "cand" ones given."""
    root = tmp_path_factory.mktemp("serving_features")
    generate(
        preset_config("tiny", ["n_users=200", "days=14"]), seed=3, out=root / "data", progress=False
    )
    ds = Dataset.open(root / "data")
    cfg = FeaturesConfig(n_quantiles=100)
    build_features(ds, root / "sim", split="time", config=cfg, progress=False)
    imp = ds.table("impressions").drop_columns(["cand_source", "cand_score"])
    build_features(ds, root / "plain", split="time", config=cfg, progress=False, impressions=imp)
    item = np.asarray(imp["item_id"].to_numpy())
    imp = imp.append_column("cand_score", pa.array(_score(item)))
    imp = imp.append_column("cand_source", pa.array(_source(item)))
    build_features(ds, root / "cand", split="time", config=cfg, progress=False, impressions=imp)
    off = replace(cfg, candidate_columns=False)
    build_features(ds, root / "off", split="time", config=off, progress=False)
    build_features(
        ds, root / "off_given", split="time", config=off, progress=False, impressions=imp
    )
    return {
        kind: (ds, Features.open(root / kind))
        for kind in ("plain", "cand", "sim", "off", "off_given")
    }


def _logged(ds: Dataset, rows: pa.Table) -> tuple[list[str], np.ndarray]:
    """The simulator's logged source and score of each example row (by request and item)."""
    imp = ds.table("impressions", ["request_id", "item_id", "cand_source", "cand_score"])
    row_of = {
        (r, i): n
        for n, (r, i) in enumerate(
            zip(imp["request_id"].to_pylist(), imp["item_id"].to_pylist(), strict=True)
        )
    }
    at = [
        row_of[key]
        for key in zip(rows["request_id"].to_pylist(), rows["item_id"].to_pylist(), strict=True)
    ]
    source = imp["cand_source"].take(pa.array(at, pa.int64())).to_pylist()
    return source, np.asarray(imp["cand_score"].take(pa.array(at, pa.int64())).to_numpy())


def _before(table: pa.Table, user: int, ts: int) -> pa.Table:
    mask = pc.and_(pc.equal(table["user_id"], user), pc.less(table["ts"], ts))
    return table.filter(mask)


@pytest.mark.parametrize(
    ("kind", "split"),
    [("plain", "valid"), ("plain", "test"), ("cand", "test"), ("sim", "test"), ("off", "test")],
)
def test_features_of_a_request_equal_the_training_examples(
    world: dict[str, tuple[Dataset, Features]], kind: str, split: str
) -> None:
    ds, feats = world[kind]
    watches = ds.table("watches", ["user_id", "item_id", "ts"])
    searches = ds.table("searches", ["user_id", "ts", "query"])
    impressions = ds.table("impressions", ["user_id", "item_id", "ts"])
    users = ds.table("users")
    examples = read_examples(feats, "ranking", split)
    requests = read_requests(feats, split)
    w_item = np.asarray(watches["item_id"].to_numpy())
    w_ts = np.asarray(watches["ts"].to_numpy())
    items = ServingItems.from_table(ds.table("items"))
    featurizer = RankingFeaturizer(feats, items)
    region, device = feats.vocab("region"), feats.vocab("device")
    checked = 0
    for r in range(0, requests.num_rows, max(1, requests.num_rows // 25)):
        req = requests.slice(r, 1).to_pylist()[0]
        user, ts = req["user_id"], req["ts"]
        rows = examples.filter(pc.equal(examples["request_index"], r))
        w = _before(watches, user, ts)
        w = w.take(pa.array(np.argsort(w["ts"].to_numpy(), kind="stable")))
        s = _before(searches, user, ts)
        s = s.take(pa.array(np.argsort(s["ts"].to_numpy(), kind="stable")))
        shown = (
            _before(impressions, user, ts)
            .group_by("item_id")
            .aggregate([("ts", "count"), ("ts", "max")])
        )
        shown_items = shown["item_id"].to_pylist()
        # "the item's watches by everyone so far": at this request, those before ts
        featurizer.items.watches = np.bincount(w_item[w_ts < ts], minlength=len(items.known))
        events = UserEvents(
            history=w["item_id"].to_pylist(),
            history_ts=w["ts"].to_pylist(),
            queries=s["query"].to_pylist(),
            queries_ts=s["ts"].to_pylist(),
            shown=dict(zip(shown_items, shown["ts_count"].to_pylist(), strict=True)),
            shown_ts=dict(zip(shown_items, shown["ts_max"].to_pylist(), strict=True)),
        )
        me = users.filter(pc.equal(users["user_id"], user))
        cand = np.asarray(rows["item_id"].to_numpy())
        logged = kind in ("sim", "off")  # "off": passed, and ignored
        sources, scores = _logged(ds, rows) if logged else (_source(cand), _score(cand))
        batch = featurizer.batch(
            events,
            cand,
            ts,
            region=int(region.lookup(me["region"])[0]),
            device=int(device.lookup(me["device"])[0]),
            sources=sources,
            scores=scores,
        )
        for name in featurizer.categorical:
            assert batch.categorical[name].tolist() == rows[name].to_pylist(), name
        raw = {n: np.asarray(rows[n].to_numpy(), dtype=np.float64) for n in featurizer.raw}
        want = feats.normalizer("ranking").transform(raw)
        np.testing.assert_array_equal(batch.dense.numpy(), want)
        for name in featurizer.bags:
            ids, offsets = batch.bags[name]
            assert offsets.tolist() == [len(req[name]) * i for i in range(rows.num_rows)]
            assert ids[: len(req[name])].tolist() == req[name], name
        checked += 1
    assert checked >= 20
    if kind in ("cand", "sim"):  # the candidate source and score are ranking features here
        assert "source" in featurizer.categorical and "cand_score" in featurizer.raw
        names = set(SOURCES) if kind == "cand" else set(POLICY_SOURCES)
        assert set(feats.vocab("source").values.tolist()) == names
        assert "cand_score" in feats.manifest["ranking"]["raw_continuous"]
    else:
        assert "source" not in featurizer.categorical and "cand_score" not in featurizer.raw
    # the churn feature is exercised: some impressions had been shown before
    assert (np.asarray(examples["item_shown_before"].to_numpy()) > 0).any()


@pytest.mark.parametrize("kind", ["off", "off_given"])
def test_candidate_columns_off_builds_the_features_of_impressions_without_them(
    world: dict[str, tuple[Dataset, Features]], kind: str
) -> None:
    """`candidate_columns=false` ignores the impressions' cand_source / cand_score, from
    the dataset or given: the features are those of impressions without the two columns
    ("plain"), and the manifest records the setting."""
    feats, plain, sim = world[kind][1], world["plain"][1], world["sim"][1]
    assert feats.config.candidate_columns is False and sim.config.candidate_columns is True
    assert feats.manifest["config"]["candidate_columns"] is False
    assert "source" in sim.manifest["vocabularies"]
    assert "source" not in feats.manifest["vocabularies"]
    assert "cand_score" not in feats.manifest["ranking"]["raw_continuous"]
    spec = RankingFeatureSpec.from_dict(feats.ranking_spec)
    assert "source" not in {f for f, _ in spec.categorical}
    assert "source" not in {s.name for s in spec.id_spaces}
    assert not [c for c in spec.dense_columns if "cand_score" in c]
    assert feats.ranking_spec == plain.ranking_spec
    for key in ("counts", "vocabularies", "ranking"):
        # "ranking" says where the impressions came from: the dataset or given
        a, b = (
            {k: v for k, v in f.manifest[key].items() if k != "impressions"} for f in (feats, plain)
        )
        assert a == b, key
    for split in ("train", "valid", "test"):
        examples = read_examples(feats, "ranking", split)
        assert not {"source", "cand_score"} & set(examples.column_names)
        want = read_examples(plain, "ranking", split)
        assert examples.column_names == want.column_names and examples.num_rows > 0
        for name in examples.column_names:  # NaN (missing) equal to NaN
            a, b = examples[name].to_numpy(), want[name].to_numpy()
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (split, name)
        assert read_requests(feats, split).equals(read_requests(plain, split)), split


def test_featurizer_of_features_without_candidate_columns_ignores_sources_and_scores(
    world: dict[str, tuple[Dataset, Features]],
) -> None:
    ds, feats = world["off"]
    featurizer = RankingFeaturizer(feats, ServingItems.from_table(ds.table("items")))
    assert featurizer.source is None and not featurizer.uses_score
    watches = ds.table("watches", ["user_id", "item_id", "ts"]).slice(0, 40)
    user = int(watches["user_id"][0].as_py())
    w = watches.filter(pc.equal(watches["user_id"], user))
    ts = int(pc.max(w["ts"]).as_py()) + 1
    events = UserEvents(history=w["item_id"].to_pylist(), history_ts=w["ts"].to_pylist())
    cand = np.arange(1, 21)
    batches = [
        featurizer.batch(events, cand, ts, sources=sources, scores=scores)
        for sources, scores in [
            (None, None),
            (_source(cand), _score(cand)),
            (list(POLICY_SOURCES[:1]) * len(cand), np.full(len(cand), 0.5)),
            ([None] * len(cand), np.full(len(cand), np.nan)),
        ]
    ]
    first = batches[0]
    assert set(first.categorical) == set(featurizer.categorical)
    assert "source" not in first.categorical
    assert first.dense.shape[1] == len(feats.ranking_spec["dense_columns"])
    for batch in batches[1:]:
        assert set(batch.categorical) == set(first.categorical)
        for name, ids in first.categorical.items():
            assert torch.equal(batch.categorical[name], ids), name
        assert torch.equal(batch.dense, first.dense)
        for name, (ids, offsets) in first.bags.items():
            assert torch.equal(batch.bags[name][0], ids) and torch.equal(
                batch.bags[name][1], offsets
            ), name


def test_items_from_table_index_by_item_id(tmp_path: Path) -> None:
    table = pa.table(
        {
            "item_id": [3, 1],
            "upload_ts": [100, None],
            "channel_id": [7, None],
            "topic": ["cats", "news"],
            "watches": [4, 2],
        }
    )
    items = ServingItems.from_table(table)
    assert items.num_items == 3 and items.known.tolist() == [False, True, False, True]
    assert items.watches.tolist() == [0, 2, 0, 4]
    assert items.channel is not None and items.channel.tolist() == [0, 0, 0, 7]
    assert items.upload_ts is not None and np.isnan(items.upload_ts[1])
    assert items.topic is not None and items.topic.to_pylist() == [None, "news", None, "cats"]
    local = items.local(np.array([3]))
    assert local.n == 1 and local.channel is not None and local.channel.tolist() == [0, 7]


def _nan_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    assert a is not None and b is not None
    return bool(np.array_equal(a, b, equal_nan=True))


def test_extended_items_equal_the_items_of_the_whole_table() -> None:
    whole = pa.table(
        {
            "item_id": [1, 2, 3, 5, 6, 8],
            "upload_ts": [10, None, 30, 50, 60, 80],
            "duration_s": [1.5, 2.5, None, 5.5, 6.5, 8.5],
            "channel_id": [7, 7, None, 9, 7, 11],
            "topic": ["cats", None, "news", "news", "sport", "cars"],
        }
    )
    base = ServingItems.from_table(whole.slice(0, 3))
    once = base.extended(whole.slice(3, 2))  # item 4 is a gap
    twice = once.extended(whole.slice(5))  # a new topic and a new channel
    expected = ServingItems.from_table(whole)
    for got in (twice, twice.extended(whole.slice(0, 0))):
        assert got.num_items == 8 and got.known.tolist() == expected.known.tolist()
        assert got.watches.tolist() == expected.watches.tolist()
        for name in ("upload_ts", "duration", "channel", "topic_code"):
            assert _nan_equal(getattr(got, name), getattr(expected, name)), name
        assert got.topic is not None and expected.topic is not None
        assert got.topic.to_pylist() == expected.topic.to_pylist()
    local = twice.local(np.array([2, 6, 8]))
    assert local.topic is not None and local.topic.to_pylist() == [None, None, "sport", "cars"]
    # An older view extended again copies: what the newer view holds never changes.
    other = once.extended(pa.table({"item_id": [7], "channel_id": [99], "topic": ["x"]}))
    assert other.channel is not None and other.channel.tolist()[-1] == 99
    assert twice.channel is not None and twice.channel.tolist() == expected.channel.tolist()
    assert once.num_items == 6 and base.num_items == 3
    with pytest.raises(FunnelrecError, match="item id 8 is already in the corpus"):
        twice.extended(whole.slice(5))


def test_a_featurizer_over_extended_items_equals_one_over_the_whole_catalogue(
    world: dict[str, tuple[Dataset, Features]],
) -> None:
    ds, feats = world["plain"]
    table = ds.table("items").sort_by("item_id")
    n = table.num_rows
    start = RankingFeaturizer(feats, ServingItems.from_table(table.slice(0, n - 40)))
    grown = start.with_items(start.items.extended(table.slice(n - 40, 25)))
    grown = grown.with_items(grown.items.extended(table.slice(n - 15)))
    whole = RankingFeaturizer(feats, ServingItems.from_table(table))
    assert grown._columns is not None and whole._columns is not None
    for name in ("rank_id", "channel_id", "topic_id", "channel_key", "topic_key"):
        assert _nan_equal(getattr(grown._columns, name), getattr(whole._columns, name)), name
    events = UserEvents(history=[1, 2], history_ts=[100, 200], shown={n: 1}, shown_ts={n: 150})
    cands = np.array([3, n - 30, n - 1, n])
    a = grown.batch(events, candidates=cands, ts=300, region=1, device=1)
    b = whole.batch(events, candidates=cands, ts=300, region=1, device=1)
    assert a.categorical.keys() == b.categorical.keys()
    for name in a.categorical:
        assert torch.equal(a.categorical[name], b.categorical[name]), name
    assert torch.equal(a.dense, b.dense)
