"""Training examples for both stages: every rule of docs/features.md on a hand-made world,
plus the no-leak properties on a simulated one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from funnelrec import features as ex
from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import ArtifactError, DataError
from funnelrec.features import Demographics, Features, FeaturesConfig
from funnelrec.features import write as build_write
from funnelrec.features.build import build_features
from funnelrec.features.loader import candidate_loader, read_examples, read_requests, seen_items
from funnelrec.features.tokenize import tokenize, tokenize_array

# ------------------------------------------------------- a world small enough to do by hand
#
# user 1: watches items 1,2,3,4,5 at ts 100..500 -> leave-last-out: train 1,2,3; valid 4; test 5
# user 2: watches 2,3 (fewer than 3 watches: all training)
# user 3: watches 6,1,2,7 at 110..410 -> train 6,1; valid 2 (ts 310); test 7 (ts 410)
# user 4: no watches (age 90, region jp: must not reach any vocabulary or quantile)
# item vocabulary (training watches): 1 x2, 2 x2, 3 x2, 6 x1 -> ids 1, 2, 3, 4; 4, 5, 7 OOV
# searches: user 1 "Funny Cats"@150, "dogs"@350, "futureword"@450 (held out); user 3 "cats"@50
# token vocabulary: cats x2, then dogs, funny, "funny cats" -> ids 1, 2, 3, 4


def write_hand_world(path: Path, *, impressions: bool = True) -> Path:
    with DatasetWriter(path, source="test") as w:
        w.write(
            "users",
            pa.table(
                {
                    "user_id": [1, 2, 3, 4],
                    "age": pa.array([30.0, 50.0, None, 90.0], pa.float32()),
                    "gender": ["f", "m", None, "f"],
                    "region": ["de", "fr", "de", "jp"],
                    "device": ["mobile", None, "tv", "tv"],
                    "logged_in": [True, False, None, True],
                }
            ),
        )
        w.write(
            "items",
            pa.table(
                {
                    "item_id": list(range(1, 9)),
                    "upload_ts": [0, 0, 0, 0, 0, 0, 0, None],
                    "duration_s": pa.array([60.0 * i for i in range(1, 8)] + [1e6], pa.float32()),
                    "channel_id": [10, 10, 20, 20, 10, 30, None, 30],
                    "topic": ["a", "a", "b", "b", "a", "c", "c", None],
                }
            ),
        )
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3],
                    "item_id": [1, 2, 3, 4, 5, 2, 3, 6, 1, 2, 7],
                    "ts": [100, 200, 300, 400, 500, 150, 250, 110, 210, 310, 410],
                    "watch_time_s": pa.nulls(11, pa.float32()),
                    "source": pa.nulls(11, pa.string()),
                }
            ),
        )
        w.write(
            "searches",
            pa.table(
                {
                    "user_id": [1, 1, 1, 3],
                    "ts": [150, 350, 450, 50],
                    "query": ["Funny Cats", "dogs", "futureword", "cats"],
                }
            ),
        )
        if impressions:
            # request: (user, ts, [(item, clicked, watch_time)])
            requests = [
                (1, 250, [(3, True, 30.0), (4, False, 0.0), (6, False, 0.0)]),
                (1, 350, [(4, True, 12.0), (6, False, 0.0), (1, False, 0.0)]),
                (3, 300, [(2, True, 20.0), (1, False, 0.0)]),
                (1, 450, [(5, True, 40.0), (8, False, 0.0)]),  # user 1's validation period
                (1, 600, [(8, False, 0.0)]),  # test period
            ]
            rows = [
                (r + 1, u, item, ts, pos, c, wt)
                for r, (u, ts, shown) in enumerate(requests)
                for pos, (item, c, wt) in enumerate(shown)
            ]
            cols = list(zip(*rows, strict=True))
            w.write(
                "impressions",
                pa.table(
                    {
                        "request_id": cols[0],
                        "user_id": cols[1],
                        "item_id": cols[2],
                        "ts": cols[3],
                        "position": pa.array(cols[4], pa.int32()),
                        "clicked": cols[5],
                        "watch_time_s": pa.array(cols[6], pa.float32()),
                    }
                ),
            )
    return path


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> tuple[Path, Features]:
    root = tmp_path_factory.mktemp("hand")
    data = write_hand_world(root / "data")
    build_features(
        data, root / "feat", split="last", config=FeaturesConfig(history_n=3), progress=False
    )
    return data, Features.open(root / "feat")


def _rows(feat: Features, stage: str, split: str) -> list[dict]:
    rows = read_examples(feat, stage, split).to_pylist()
    return sorted(rows, key=lambda r: (r["user_id"], r["ts"], r.get("position", 0)))


def test_vocabularies_fitted_on_training_part_only(hand) -> None:
    _, f = hand
    item = f.vocab("item")
    assert item.values.tolist() == [1, 2, 3, 6]  # 4, 5, 7 are only ever held-out watches
    assert item.counts.tolist() == [0, 2, 2, 2, 1]  # training watch counts (sampler's base)
    assert f.vocab("token").values.tolist() == ["cats", "dogs", "funny", "funny cats"]
    assert f.vocab("region").values.tolist() == ["de", "fr"]  # user 4 (jp) has no training
    assert f.vocab("device").values.tolist() == ["mobile", "tv"]
    # rank_item: clicked training impressions only (items 3, 4, 2; item 5's click is held out)
    assert f.vocab("rank_item").values.tolist() == [2, 3, 4]
    assert f.vocab("channel").values.tolist() == [10, 20, 30]  # 3 x 10, 3 x 20, 2 x 30
    age = f.normalizer("candidates").column("age")
    assert age.knots.min() == 30.0 and age.knots.max() == 50.0  # not user 4's 90
    # The 1e6 s item is shown only in held-out impressions: no ranking quantile sees it.
    assert f.normalizer("ranking").column("duration_s").knots.max() == 360.0


def test_candidate_examples_by_hand(hand) -> None:
    _, f = hand
    tok = {t: i + 1 for i, t in enumerate(f.vocab("token").values)}
    funny_cats = sorted(tok[t] for t in tokenize("Funny Cats"))
    train = _rows(f, "candidates", "train")
    u1 = [r for r in train if r["user_id"] == 1]
    # next-watch labels with the history strictly before each (item ids -> vocab ids 1..3)
    assert [(r["ts"], r["label"], r["history"]) for r in u1] == [
        (100, 1, []),
        (200, 2, [1]),
        (300, 3, [1, 2]),
    ]
    assert [sorted(r["search"]) for r in u1] == [[], funny_cats, funny_cats]
    # example age: (t_max - t) / (t_max - t_min) over training watches (100 .. 300)
    assert [r["example_age"] for r in u1] == pytest.approx([1.0, 0.5, 0.0])
    assert all(r["example_age"] >= 0 for r in train)
    u3 = [r for r in train if r["user_id"] == 3]
    assert [(r["ts"], r["label"], r["history"], r["search"]) for r in u3] == [
        (110, 4, [], [tok["cats"]]),
        (210, 1, [4], [tok["cats"]]),
    ]
    assert sum(r["user_id"] == 2 for r in train) == 2  # a light user: all watches train


def test_held_out_examples_by_hand(hand) -> None:
    _, f = hand
    valid = _rows(f, "candidates", "valid")
    test = _rows(f, "candidates", "test")
    assert [(r["user_id"], r["ts"], r["item_id"]) for r in valid] == [(1, 400, 4), (3, 310, 2)]
    assert [(r["user_id"], r["ts"], r["item_id"]) for r in test] == [(1, 500, 5), (3, 410, 7)]
    v1, t1 = valid[0], test[0]
    assert v1["label"] == 0 and t1["label"] == 0  # items 4 and 5 were never watched in training
    assert v1["history"] == [1, 2, 3]
    # The test history includes the validation watch (item 4 is OOV: left out of the bag),
    # and is capped at history_n = 3 most recent.
    assert t1["history"] == [2, 3]
    assert sorted(t1["search"]) == sorted(
        [f.vocab("token").lookup(pa.array([t]))[0] for t in ["funny", "cats", "funny cats", "dogs"]]
    )  # "futureword" is OOV and dropped
    assert all(r["example_age"] == 0.0 for r in valid + test)
    assert valid[1]["label"] == 2 and valid[1]["history"] == [4, 1]
    assert test[1]["seen"] == [1, 2, 4]  # distinct items watched before the target
    flat, offsets = seen_items(f, "test")
    shard = read_examples(f, "candidates", "test", ["seen"]).column("seen").to_pylist()
    assert [flat[a:b].tolist() for a, b in itertools.pairwise(offsets)] == shard
    assert f.manifest["oov"]["candidates"]["test"]["label"] == 1.0  # items 5 and 7


def test_demographic_columns(hand) -> None:
    _, f = hand
    cols = f.candidate_spec["dense_columns"]
    assert cols == [
        "age", "age_missing", "logged_in", "logged_in_missing",
        "gender=f", "gender=m", "gender_missing",
    ]  # fmt: skip
    by_user = {r["user_id"]: r for r in _rows(f, "candidates", "train")}
    assert by_user[1]["dense"] == pytest.approx([0.0, 0, 1, 0, 1, 0, 0])
    assert by_user[2]["dense"] == pytest.approx([1000 / 1001, 0, 0, 0, 0, 1, 0])
    assert by_user[3]["dense"] == pytest.approx([0.0, 1, 0, 1, 0, 0, 1])
    assert (by_user[1]["region"], by_user[2]["region"], by_user[3]["region"]) == (1, 2, 1)
    assert (by_user[1]["device"], by_user[2]["device"], by_user[3]["device"]) == (1, 0, 2)
    assert all(0.0 <= x <= 1.0 for r in by_user.values() for x in r["dense"])


def test_ranking_examples_by_hand(hand) -> None:
    _, f = hand
    rows = {(r["request_id"], r["item_id"]): r for r in _rows(f, "ranking", "train")}
    assert sorted({k[0] for k in rows}) == [1, 2, 3]
    r = rows[(2, 4)]  # user 1 at ts 350, item 4 (channel 20, topic b), shown before at 250
    assert (r["label"], r["watch_time"], r["user_id"], r["position"]) == (1.0, 12.0, 1, 0)
    assert r["item"] == 3 and r["seed"] == 2  # seed = item 3, the last watch before 350
    requests = read_requests(f, "train").to_pylist()
    assert len(requests) == 3
    q = requests[r["request_index"]]
    assert (q["request_id"], q["user_id"], q["ts"]) == (2, 1, 350)
    assert q["history"] == [1, 2]  # items 2, 3 in rank_item ids; item 1 is OOV there
    assert sorted(q["search"]) == sorted(
        f.vocab("token").lookup(pa.array(["funny", "cats", "funny cats"])).tolist()
    )
    # every impression of a request points at the same request row
    assert {rows[(2, i)]["request_index"] for i in (4, 6, 1)} == {r["request_index"]}
    assert (r["channel_watches"], r["channel_last_watch_ago_s"]) == (1.0, 50.0)
    assert (r["topic_watches"], r["topic_last_watch_ago_s"]) == (1.0, 50.0)
    assert (r["item_shown_before"], r["item_last_shown_ago_s"]) == (1.0, 100.0)
    assert (r["item_watched_before"], r["item_prior_watches"]) == (0.0, 0.0)
    assert (r["user_prior_watches"], r["user_last_watch_ago_s"]) == (3.0, 50.0)
    assert (r["item_age_s"], r["duration_s"]) == (350.0, 240.0)
    r = rows[(2, 6)]  # item 6: channel 30 and topic c never watched by user 1
    assert r["channel_watches"] == 0.0 and np.isnan(r["channel_last_watch_ago_s"])
    assert r["topic_watches"] == 0.0 and np.isnan(r["topic_last_watch_ago_s"])
    assert r["item_prior_watches"] == 1.0  # user 3 watched it at 110
    assert r["item"] == 0
    r = rows[(2, 1)]  # item 1: channel 10 / topic a watched twice, last at 200
    assert (r["channel_watches"], r["channel_last_watch_ago_s"]) == (2.0, 150.0)
    assert (r["item_watched_before"], r["item_prior_watches"]) == (1.0, 2.0)
    assert r["item_shown_before"] == 0.0 and np.isnan(r["item_last_shown_ago_s"])
    # Impressions of one request do not count as "shown before" for each other.
    assert all(rows[(1, i)]["item_shown_before"] == 0.0 for i in (3, 4, 6))
    r = rows[(3, 2)]  # user 3 at 300 (before their validation watch at 310): training
    assert (r["user_prior_watches"], r["seed"]) == (2.0, 0)  # seed item 1 is OOV in rank_item
    valid = _rows(f, "ranking", "valid")
    test = _rows(f, "ranking", "test")
    assert [(r["request_id"], r["item_id"]) for r in valid] == [(4, 5), (4, 8)]
    assert [(r["request_id"], r["item_id"]) for r in test] == [(5, 8)]
    assert np.isnan(valid[1]["item_age_s"])  # item 8 has no upload time
    assert test[0]["item_shown_before"] == 1.0  # shown at 450


def test_ranking_spec_is_complete(hand) -> None:
    from funnelrec.ranking.model import RankingFeatureSpec

    _, f = hand
    spec = RankingFeatureSpec.from_dict(f.ranking_spec)
    assert [c for c, _ in spec.categorical] == [
        "item",
        "seed",
        "channel",
        "topic",
        "region",
        "device",
    ]
    assert dict(spec.categorical)["seed"] == dict(spec.categorical)["item"] == "rank_item"
    assert dict(spec.bags) == {"history": "rank_item", "search": "token"}
    assert spec.space("rank_item").vocab_size == len(f.vocab("rank_item"))
    assert spec.dense_columns == tuple(f.normalizer("ranking").output_columns)
    assert all(
        spec.dense_columns[i].endswith("^2") or spec.dense_columns[i].startswith("sqrt(")
        for i in spec.power_columns
    )
    assert len(spec.power_columns) == 2 * len(ex.RANKING_CONTINUOUS)


def test_cap_sampling_is_deterministic(tmp_path) -> None:
    n = 40
    with DatasetWriter(tmp_path / "d", source="test") as w:
        w.write("users", pa.table({"user_id": [1, 2]}))
        w.write("items", pa.table({"item_id": list(range(1, n + 1))}))
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": [1] * n + [2] * 5,
                    "item_id": [*list(range(1, n + 1)), 1, 2, 3, 4, 5],
                    "ts": list(range(n)) + list(range(5)),
                    "watch_time_s": pa.nulls(n + 5, pa.float32()),
                    "source": pa.nulls(n + 5, pa.string()),
                }
            ),
        )

    def labels(out: str, **kw) -> list[tuple[int, int]]:
        build_features(tmp_path / "d", tmp_path / out, config=FeaturesConfig(**kw), progress=False)
        t = read_examples(tmp_path / out, "candidates", "train", ["user_id", "ts"])
        return sorted(zip(t.column("user_id").to_pylist(), t.column("ts").to_pylist(), strict=True))

    a = labels("a", cap=5, seed=1)
    assert sum(u == 1 for u, _ in a) == 5 and sum(u == 2 for u, _ in a) == 3  # 5 - 2 held out
    assert labels("b", cap=5, seed=1) == a
    assert labels("c", cap=5, seed=2) != a
    full = labels("e", cap=None)
    assert len(full) == (n - 2) + 3
    assert Features.open(tmp_path / "a").config.cap == 5


def test_random_holdout_uses_both_sides(tmp_path) -> None:
    n = 30
    with DatasetWriter(tmp_path / "d", source="test") as w:
        w.write("users", pa.table({"user_id": [1]}))
        w.write("items", pa.table({"item_id": list(range(1, n + 1))}))
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": [1] * n,
                    "item_id": list(range(1, n + 1)),
                    "ts": [10 * i for i in range(n)],
                    "watch_time_s": pa.nulls(n, pa.float32()),
                    "source": pa.nulls(n, pa.string()),
                }
            ),
        )
    cfg = FeaturesConfig(labels="random", history_n=6, cap=None)
    build_features(tmp_path / "d", tmp_path / "f", config=cfg, progress=False)
    f = Features.open(tmp_path / "f")
    vocab = f.vocab("item")
    later = 0
    for r in read_examples(f, "candidates", "train").to_pylist():
        label_item = r["item_id"]
        hist_items = vocab.decode(np.array(r["history"], dtype=np.int64)).tolist()
        assert label_item not in hist_items and len(hist_items) == 6
        assert max(hist_items) <= n - 2  # never the held-out validation / test watches
        later += any(i > label_item for i in hist_items)
    assert later > 0  # context from after the label: the ablation's leak, on purpose
    # Held-out examples stay next-watch.
    test = read_examples(f, "candidates", "test").to_pylist()[0]
    # The last 6 watches before the test target; the validation watch (item n - 1) is OOV.
    assert test["history"] == vocab.lookup(np.arange(n - 6, n - 1)).tolist()


def test_truncated_item_vocabulary_drops_training_examples(tmp_path) -> None:
    data = write_hand_world(tmp_path / "d")
    build_features(data, tmp_path / "f", config=FeaturesConfig(max_items=2), progress=False)
    f = Features.open(tmp_path / "f")
    assert len(f.vocab("item")) == 3
    train = read_examples(f, "candidates", "train").to_pylist()
    assert all(r["label"] != 0 for r in train)
    assert f.manifest["dropped_train_examples_oov_label"] == 3  # items 3 (x2) and 6
    counts = f.item_label_counts()
    assert counts.tolist() == np.bincount([r["label"] for r in train], minlength=3).tolist()


def test_without_impressions_ranking_is_skipped(tmp_path) -> None:
    data = write_hand_world(tmp_path / "d", impressions=False)
    build_features(data, tmp_path / "f", progress=False)
    f = Features.open(tmp_path / "f")
    assert not f.has_ranking
    assert "no impressions" in f.manifest["ranking"]["reason"]
    with pytest.raises(ArtifactError, match="no impressions"):
        f.ranking_spec  # noqa: B018
    assert not (tmp_path / "f" / "ranking").exists()
    assert f.num_examples("candidates", "train") == 7


def test_given_impressions_with_candidate_scores(tmp_path) -> None:
    data = write_hand_world(tmp_path / "d", impressions=False)
    given = pa.table(
        {
            "request_id": [1, 1, 2, 2],
            "user_id": [1, 1, 1, 1],
            "item_id": [2, 3, 4, 6],
            "ts": [150, 150, 350, 350],
            "position": pa.array([0, 1, 0, 1], pa.int32()),
            "clicked": [True, False, True, False],
            "watch_time_s": pa.array([5.0, 0.0, 7.0, 0.0], pa.float32()),
            "cand_score": [0.9, 0.1, 0.5, None],
            "cand_source": ["deep", "popular", "deep", None],
        }
    )
    build_features(data, tmp_path / "f", progress=False, impressions=given)
    f = Features.open(tmp_path / "f")
    assert f.manifest["ranking"]["impressions"] == "given"
    spec = f.ranking_spec
    assert ["source", "source"] in spec["categorical"]
    assert "cand_score" in spec["dense_columns"] and "cand_score_missing" in spec["dense_columns"]
    rows = _rows(f, "ranking", "train")
    assert [r["cand_score"] for r in rows[:3]] == pytest.approx([0.9, 0.1, 0.5])
    assert np.isnan(rows[3]["cand_score"])
    source = f.vocab("source")
    assert [r["source"] for r in rows] == source.lookup(
        pa.array(["deep", "popular", "deep", None])
    ).tolist()
    assert source.values.tolist() == ["deep", "popular"]
    bad = given.set_column(2, "item_id", pa.array([0, 3, 4, 6]))
    with pytest.raises(DataError, match="item_id"):
        build_features(data, tmp_path / "g", progress=False, impressions=bad)


def test_manifest_atomicity_and_versions(tmp_path, monkeypatch) -> None:
    data = write_hand_world(tmp_path / "d")
    out = build_features(data, tmp_path / "f", progress=False)
    f = Features.open(out)
    m = f.manifest
    assert m["format_version"] == ex.FORMAT_VERSION
    assert m["data"]["fingerprint"] == Dataset.open(data).fingerprint()
    for stage in ("candidates", "ranking"):
        for part in ("train", "valid", "test"):
            n = sum(pq.read_metadata(p).num_rows for p in f.shards(stage, part))
            assert n == f.num_examples(stage, part)
    f.check_dataset(Dataset.open(data))
    other = write_hand_world(tmp_path / "d2", impressions=False)
    with pytest.raises(ArtifactError, match="fingerprint"):
        f.check_dataset(Dataset.open(other))
    with pytest.raises(DataError, match="already exists"):
        build_features(data, out, progress=False)

    def boom(*a, **k):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_write, "_write_ranking_block", boom)
    with pytest.raises(RuntimeError):
        build_features(data, tmp_path / "g", progress=False)
    assert not (tmp_path / "g").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".g")]
    with pytest.raises(RuntimeError):
        build_features(data, out, force=True, progress=False)
    assert Features.open(out).manifest == m  # the old directory is untouched

    raw = json.loads((out / "features.json").read_text())
    raw["format_version"] = 99
    (out / "features.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="format version 99"):
        Features.open(out)
    with pytest.raises(ArtifactError, match="not a features directory"):
        Features.open(tmp_path)


def test_serving_batch_matches_offline_example(hand) -> None:
    _, f = hand
    row = _rows(f, "candidates", "test")[0]  # user 1, target item 5 at ts 500
    batch = f.candidate_batch(
        [[1, 2, 3, 4]],
        [["Funny Cats", "dogs", "futureword"]],
        [Demographics(age=30, gender="f", region="de", device="mobile", logged_in=True)],
        user_ids=[1],
    )
    assert batch.history.tolist() == row["history"]
    assert sorted(batch.search.tolist()) == sorted(row["search"])
    assert batch.dense[0].tolist() == pytest.approx(row["dense"])
    assert (batch.region.item(), batch.device.item()) == (row["region"], row["device"])
    assert batch.example_age.tolist() == [0.0] and batch.history_offsets.tolist() == [0]
    unknown = f.candidate_batch([[], [99, 1]], demographics=[None, Demographics(region="zz")])
    assert unknown.history.tolist() == [1] and unknown.history_offsets.tolist() == [0, 0]
    assert unknown.region.tolist() == [0, 0] and unknown.search.numel() == 0
    assert unknown.dense[0].tolist() == pytest.approx([0, 1, 0, 1, 0, 0, 1])


def test_time_split_examples(tmp_path) -> None:
    data = write_hand_world(tmp_path / "d")
    cfg = FeaturesConfig(t1=300, t2=400, eval_cap=1)
    build_features(data, tmp_path / "f", split="time", config=cfg, progress=False)
    f = Features.open(tmp_path / "f")
    assert (f.manifest["split"]["t1"], f.manifest["split"]["t2"]) == (300, 400)
    train = read_examples(f, "candidates", "train").to_pylist()
    valid = read_examples(f, "candidates", "valid").to_pylist()
    test = read_examples(f, "candidates", "test").to_pylist()
    assert all(r["ts"] < 300 for r in train) and len(train) == 6
    assert all(300 <= r["ts"] < 400 for r in valid) and len(valid) == 2  # users 1 and 3
    assert all(r["ts"] >= 400 for r in test)
    assert sorted(r["user_id"] for r in test) == [1, 3]  # eval_cap=1 per user
    assert set(f.vocab("item").values.tolist()) == {1, 2, 3, 6}
    rank_train = read_examples(f, "ranking", "train", ["ts"]).column("ts").to_pylist()
    assert all(t < 300 for t in rank_train)


# ---------------------------------------------------------------- the simulated world: no leaks


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[Dataset, Features, Features]:
    from funnelrec.simulate import generate, preset_config

    root = tmp_path_factory.mktemp("sim")
    generate(
        preset_config("tiny", ["n_users=200", "days=10"]), seed=3, out=root / "d", progress=False
    )
    ds = Dataset.open(root / "d")
    cfg = FeaturesConfig(history_n=20, search_n=10, cap=10)
    build_features(ds, root / "last", split="last", config=cfg, progress=False)
    build_features(ds, root / "time", split="time", config=cfg, progress=False)
    return ds, Features.open(root / "last"), Features.open(root / "time")


def _sorted_watches(ds: Dataset) -> pa.Table:
    w = ds.table("watches", ["user_id", "item_id", "ts"])
    order = np.lexsort((w.column("ts").to_numpy(), w.column("user_id").to_numpy()))
    return w.take(pa.array(order))


@pytest.mark.parametrize("kind", ["last", "time"])
def test_no_training_example_sees_the_future(sim, kind) -> None:
    ds, last, time_ = sim
    f = last if kind == "last" else time_
    cfg = f.config
    w = _sorted_watches(ds)
    users = w.column("user_id").to_numpy()
    items = w.column("item_id").to_numpy()
    ts = w.column("ts").to_numpy()
    vocab = f.vocab("item")
    start = np.searchsorted(users, np.arange(users.max() + 2))
    # The split boundary of each user: the time of their first held-out watch.
    boundary = np.full(users.max() + 1, np.iinfo(np.int64).max)
    if kind == "last":
        for u in np.unique(users):
            n = start[u + 1] - start[u]
            if n >= cfg.min_watches:
                boundary[u] = ts[start[u + 1] - 2]
    else:
        boundary[:] = f.manifest["split"]["t1"]
    s = ds.table("searches")
    s_user, s_ts = s.column("user_id").to_numpy(), s.column("ts").to_numpy()
    flat, offsets = tokenize_array(s.column("query"))
    flat = flat.to_pylist()
    s_tokens = [flat[a:b] for a, b in itertools.pairwise(offsets)]
    tok_vocab = f.vocab("token")
    train = read_examples(f, "candidates", "train").to_pylist()
    assert train
    for r in train[:200]:
        u, t = r["user_id"], r["ts"]
        assert t < boundary[u] or (kind == "last" and t <= boundary[u])
        # history = the user's last N watches strictly before the label's position, in order
        lo, hi = start[u], start[u + 1]
        pos = lo + np.flatnonzero((ts[lo:hi] == t) & (items[lo:hi] == r["item_id"]))[0]
        expect = vocab.lookup(items[max(lo, pos - cfg.history_n) : pos])
        assert r["history"] == expect[expect != 0].tolist()
        assert all(ts[lo:pos] <= t)
        # search tokens come from queries strictly before t
        mine = np.flatnonzero((s_user == u) & (s_ts < t))
        mine = mine[np.argsort(s_ts[mine], kind="stable")][-cfg.search_n :]
        expect_tokens = tok_vocab.lookup(
            pa.array([x for i in mine for x in s_tokens[i]], pa.string())
        )
        assert sorted(r["search"]) == sorted(expect_tokens[expect_tokens != 0].tolist())
    # No vocabulary value comes only from events at or after the boundary.
    w_train = ts < boundary[users]
    assert set(vocab.values.tolist()) == set(items[w_train].tolist())
    train_tokens = {x for i in np.flatnonzero(s_ts < boundary[s_user]) for x in s_tokens[i]}
    assert set(tok_vocab.values.tolist()) <= train_tokens
    imp = ds.table("impressions", ["user_id", "item_id", "ts", "clicked"])
    iu, it = imp.column("user_id").to_numpy(), imp.column("ts").to_numpy()
    clicked_train = imp.filter(pa.array((it < boundary[iu]) & imp.column("clicked").to_numpy()))
    assert set(f.vocab("rank_item").values.tolist()) == set(
        clicked_train.column("item_id").to_pylist()
    )
    # Ranking rows in training are before the boundary; the ranking quantiles only saw them.
    rk = read_examples(f, "ranking", "train", ["user_id", "ts", "duration_s", "item_prior_watches"])
    assert np.all(rk.column("ts").to_numpy() < boundary[rk.column("user_id").to_numpy()])
    norm = f.normalizer("ranking")
    for col in ("duration_s", "item_prior_watches"):
        train_vals = rk.column(col).to_numpy()
        knots = norm.column(col).knots
        assert knots.min() >= np.nanmin(train_vals) and knots.max() <= np.nanmax(train_vals)


def test_ranking_features_match_brute_force(sim) -> None:
    ds, f, _ = sim
    w = _sorted_watches(ds)
    wu, wi, wt = (w.column(c).to_numpy() for c in ("user_id", "item_id", "ts"))
    items = ds.table("items")
    channel = np.zeros(int(pc.max(items.column("item_id")).as_py()) + 1, dtype=np.int64)
    channel[items.column("item_id").to_numpy()] = pc.fill_null(items.column("channel_id"), 0)
    w_channel = channel[wi]
    imp = ds.table("impressions", ["user_id", "item_id", "ts"])
    iu, ii, it = (imp.column(c).to_numpy() for c in ("user_id", "item_id", "ts"))
    rows = (
        read_examples(f, "ranking", "valid").to_pylist()
        + read_examples(f, "ranking", "train").to_pylist()[:150]
    )
    assert len(rows) > 150
    for r in rows:
        u, i, t = r["user_id"], r["item_id"], r["ts"]
        mine = (wu == u) & (wt < t)
        assert r["user_prior_watches"] == mine.sum()
        same_ch = mine & (w_channel == channel[i])
        assert r["channel_watches"] == same_ch.sum()
        if same_ch.any():
            assert r["channel_last_watch_ago_s"] == t - wt[same_ch].max()
        assert r["item_shown_before"] == ((iu == u) & (ii == i) & (it < t)).sum()
        assert r["item_prior_watches"] == ((wi == i) & (wt < t)).sum()
        assert r["item_watched_before"] == (mine & (wi == i)).sum()
        seed = wi[mine][-1] if mine.any() else None
        assert r["seed"] == (f.vocab("rank_item").lookup(np.array([seed]))[0] if seed else 0)
    # The request's history bag: the user's last N watches before it, rank_item ids.
    rank_vocab = f.vocab("rank_item")
    for q in read_requests(f, "valid").to_pylist():
        mine = (wu == q["user_id"]) & (wt < q["ts"])
        expect = rank_vocab.lookup(wi[mine][-f.config.history_n :])
        assert q["history"] == expect[expect != 0].tolist()


def test_end_to_end_batches_from_the_simulator(sim) -> None:
    from funnelrec.features.loader import ranking_loader

    _, f, _ = sim
    n = 0
    for b in candidate_loader(f, "train", batch_size=256, shuffle=True):
        assert b.history_offsets.shape == b.label.shape and int(b.label.min()) >= 1
        n += len(b)
    assert n == f.num_examples("candidates", "train")
    rb = next(iter(ranking_loader(f, "train", batch_size=256)))
    assert rb.dense.shape == (256, len(f.ranking_spec["dense_columns"]))
    assert float(rb.dense.min()) >= 0.0 and float(rb.dense.max()) <= 1.0


def test_cli_build_and_describe(tmp_path) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli.features import app

    data = write_hand_world(tmp_path / "d")
    runner = CliRunner()
    out = tmp_path / "f"
    res = runner.invoke(app, ["build", "--data", str(data), "--out", str(out), "cap=none"])
    assert res.exit_code == 0, res.output
    assert Features.open(out).config.cap is None
    res = runner.invoke(app, ["describe", str(out)])
    assert res.exit_code == 0, res.output
    for text in ("leave-last-out", "cap none", "candidates", "ranking", "rank_item", "100.00%"):
        assert text in res.output
    res = runner.invoke(app, ["build", "--data", str(data), "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in str(res.exception)
    res = runner.invoke(app, ["build", "--data", str(data), "--out", str(tmp_path / "g"), "nope=1"])
    assert res.exit_code != 0 and "unknown config key 'nope'" in str(res.exception)
    res = runner.invoke(
        app,
        [
            "build",
            "--data",
            str(data),
            "--split",
            "time",
            "--out",
            str(tmp_path / "h"),
            "t1=300",
            "t2=400",
        ],
    )
    assert res.exit_code == 0, res.output
    assert Features.open(tmp_path / "h").manifest["split"]["t1"] == 300
