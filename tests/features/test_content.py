"""Item content (`funnelrec/features/content.py`): fitted on the items known at the end of
the training window only, encoded for every catalogue item, written by the build, carried
by serving copies and extended by updates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from funnelrec.errors import ArtifactError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.content import (
    CLIP,
    CONTENT_DENSE,
    CONTENT_FILE,
    MIN_STD,
    ContentTable,
    fit_item_content,
)
from funnelrec.features.update import FeaturesUpdate
from funnelrec.features.vocab import Vocabulary
from tests.features.content_world import NEW_ITEMS, content_world_features, write_content_world

T_END = 100
DAY = 86_400


def items() -> pa.Table:
    """Seven items; the window ends at T_END. Known then: 1, 2, 6 (watched: in the item
    vocabulary), 3 and 7 (uploaded before T_END, never watched). Not known: 4 (uploaded
    after T_END) and 5 (upload time unknown, never watched)."""
    return pa.table(
        {
            "item_id": [1, 2, 3, 4, 5, 6, 7],
            "upload_ts": [T_END - 3 * DAY, T_END - DAY, T_END - 2 * DAY, T_END + 50, None, None, 0],
            "duration_s": pa.array([60.0, 120.0, 240.0, 1e7, 30.0, None, 90.0], pa.float32()),
            "channel_id": [10, 10, 20, 30, 40, 50, None],
            "topic": ["cats", "cats", "dogs", "birds", "fish", "cows", None],
            "title": [
                "Funny Cats",
                "funny cats, again",
                "dogs run",
                "birds sing funny",
                "fish",
                "cows moo",
                "moo moo moo",
            ],
        }
    )


def item_vocab() -> Vocabulary:
    return Vocabulary.fit("item", np.array([6, 1, 1, 2, 2, 2]))  # ids: 2 -> 1, 1 -> 2, 6 -> 3


def test_the_vocabularies_hold_only_what_was_known_at_the_windows_end() -> None:
    fit = fit_item_content(items(), item_vocab(), T_END, FeaturesConfig())
    v = fit.vocabs
    assert sorted(v["content_channel"].values.tolist()) == [10, 20, 50]  # not 30, 40
    assert sorted(v["content_topic"].values.tolist()) == ["cats", "cows", "dogs"]
    # title tokens on at least two known titles, each title counted once ("moo moo" is
    # twice in item 7's title, on no other)
    assert sorted(v["title_token"].values.tolist()) == ["cats", "funny", "funny cats", "moo"]
    loose = fit_item_content(items(), item_vocab(), T_END, FeaturesConfig(title_min_count=1))
    tokens = set(loose.vocabs["title_token"].values.tolist())
    assert {"dogs", "run", "dogs run", "cows moo", "moo moo", "again"} <= tokens
    assert not {"birds", "sing", "birds sing", "sing funny", "fish"} & tokens
    assert fit.known_items == 5


def test_every_catalogue_item_is_encoded_with_the_fitted_vocabularies() -> None:
    fit = fit_item_content(items(), item_vocab(), T_END, FeaturesConfig())
    t, v = fit.table, fit.vocabs
    assert t.item_id.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert t.item.tolist() == [2, 1, 0, 0, 0, 3, 0]
    assert (
        t.channel.tolist()
        == v["content_channel"].lookup(np.array([10, 10, 20, 0, 0, 50, 0])).tolist()
    )
    assert t.channel[3] == t.channel[4] == t.topic[3] == t.topic[4] == 0
    title_of_4 = t.title[t.title_offsets[3] : t.title_offsets[4]]
    assert v["title_token"].decode(title_of_4).tolist() == ["funny"]  # the only known token
    # dense: log duration and log age in days at T_END, scaled on the known items only
    known = np.array([0, 1, 2, 6])  # rows with an upload time among the known items
    log_age = np.log1p(np.array([3.0, 1.0, 2.0, T_END / DAY]))
    mean, std = fit.table.scale["age"]
    assert mean == pytest.approx(log_age.mean()) and std == pytest.approx(
        max(log_age.std(), MIN_STD)
    )
    expect = (log_age - mean) / std
    np.testing.assert_allclose(t.dense[known, CONTENT_DENSE.index("age")], expect, rtol=1e-5)
    # a later upload is brand new (age 0); an unknown time is 0 and flagged
    age0 = np.clip((0.0 - mean) / std, -CLIP, CLIP)
    assert t.dense[3, 2] == pytest.approx(age0, rel=1e-5) and t.dense[3, 3] == 0
    assert t.dense[4, 2] == 0 and t.dense[4, 3] == 1 and t.dense[5, 3] == 1
    d_mean = np.log1p([60.0, 120.0, 240.0, 90.0]).mean()  # item 4's 1e7 s is not known
    assert fit.table.scale["duration"][0] == pytest.approx(d_mean)
    assert t.dense[3, 0] == CLIP  # clipped, far above the known range
    assert t.dense[5, 1] == 1 and t.dense[5, 0] == 0  # duration unknown


def test_a_table_round_trips_and_gives_rows_by_vocabulary_id(tmp_path: Path) -> None:
    t = fit_item_content(items(), item_vocab(), T_END, FeaturesConfig(title_min_count=1)).table
    t.save(tmp_path / CONTENT_FILE)
    back = ContentTable.load(tmp_path / CONTENT_FILE)
    for name in ("item_id", "item", "channel", "topic", "title", "title_offsets", "dense"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    assert (back.t_end, back.scale) == (t.t_end, t.scale)
    np.testing.assert_array_equal(back.upload_ts, t.upload_ts)  # NaN: unknown (item 5)
    assert back.has_upload_ts and np.isnan(t.upload_ts[4]) and not np.isnan(t.upload_ts[3])
    assert t.content().upload_ts[4] == -np.inf  # as tensors: -inf, which buffers may hold

    rows = t.vocab_rows(4)  # vocabulary ids 0..3
    everything = t.content()
    assert len(rows) == 4 and rows.channel[0] == 0 and rows.dense[0].abs().sum() == 0
    for vocab_id, row in ((1, 1), (2, 0), (3, 5)):  # item 2 is row 1, item 1 row 0, ...
        one, want = rows.take(torch.tensor([vocab_id])), everything.take(torch.tensor([row]))
        for name in ("channel", "topic", "title", "title_offsets", "dense"):
            assert torch.equal(getattr(one, name), getattr(want, name)), name
    content, ids = t.outside_vocab()
    assert ids.tolist() == [3, 4, 5, 7] and len(content) == 4
    picked = everything.take(torch.tensor([6, 0, 6]))  # repeats and any order
    # item 7: "moo" x3 and "moo moo" x2 (repeats stay in an item's bag); item 1: three
    assert picked.title_offsets.tolist() == [0, 5, 8]
    assert torch.equal(picked.title[:5], picked.title[8:])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return content_world_features(tmp_path_factory.mktemp("content"))


def test_the_build_writes_the_table_and_serving_copies_carry_it(
    world: Path, tmp_path: Path
) -> None:
    feats = Features.open(world / "f")
    spec = feats.manifest["item_content"]
    assert spec["items"] == 42 and spec["outside_vocabulary"] >= len(NEW_ITEMS)
    for name in spec["vocabularies"].values():
        assert len(feats.vocab(name)) > 1  # listed with the vocabularies
    table = feats.item_content()
    outside = set(table.outside_vocab()[1].tolist())
    assert {item for item, _, _ in NEW_ITEMS} <= outside
    assert table.t_end == feats.manifest["split"]["train_time_range"][1]
    feats.copy_serving_part(tmp_path / "serving")
    copy = Features.open(tmp_path / "serving")
    np.testing.assert_array_equal(copy.item_content().title, table.title)
    # a new upload is encoded as the build encoded the catalogue (from the copy alone)
    from funnelrec.data.dataset import Dataset

    rows = Dataset.open(world / "d").table("items").take(pa.array([41, 3]))  # ids 42, 4
    again = copy.encode_item_content(rows)
    assert again.item_id.tolist() == [4, 42]
    want = table.content(np.searchsorted(table.item_id, [4, 42]))
    got = again.content()
    for name in ("channel", "topic", "title", "title_offsets", "dense"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_a_table_without_upload_times_reads_and_the_item_age_term_asks_for_a_rebuild(
    world: Path, tmp_path: Path
) -> None:
    """Format version 1 (before upload times were kept) reads with every upload time
    unknown; the tower trains on it without the item-age term and refuses it with."""
    import pyarrow.parquet as pq

    from funnelrec.candidates.content import model_content
    from funnelrec.errors import FunnelrecError

    old = tmp_path / "old"
    shutil.copytree(world / "f", old)
    path = old / "transforms" / CONTENT_FILE
    t = pq.read_table(path)
    meta = json.loads(t.schema.metadata[b"funnelrec.item_content"])
    meta["format_version"] = 1
    t = t.drop_columns(["upload_ts"]).replace_schema_metadata(
        {b"funnelrec.item_content": json.dumps(meta)}
    )
    pq.write_table(t, path)
    feats = Features.open(old)
    table = feats.item_content()
    assert not table.has_upload_ts and bool(np.isnan(table.upload_ts).all())
    _, rows, t_end = model_content(True, feats, item_age=False)
    assert rows is not None and t_end == table.t_end
    with pytest.raises(FunnelrecError, match="rebuild the features"):
        model_content(True, feats, item_age=True)
    meta["format_version"] = 3
    pq.write_table(t.replace_schema_metadata({b"funnelrec.item_content": json.dumps(meta)}), path)
    with pytest.raises(ArtifactError, match="format version 3"):
        ContentTable.load(path)


def test_features_built_before_the_table_still_open(world: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(world / "f", old)
    manifest = json.loads((old / "features.json").read_text())
    del manifest["item_content"]
    (old / "features.json").write_text(json.dumps(manifest))
    (old / "transforms" / CONTENT_FILE).unlink()
    feats = Features.open(old)
    assert not feats.has_item_content
    with pytest.raises(ArtifactError, match="rebuild"):
        feats.item_content()
    # an update from them fits the content afresh
    build_features(world / "d", tmp_path / "new", split="last", progress=False,
                   update=FeaturesUpdate(old))  # fmt: skip
    assert Features.open(tmp_path / "new").has_item_content


def test_an_update_extends_the_content_vocabularies(world: Path, tmp_path: Path) -> None:
    """Features of an earlier version of the data, updated for the whole of it: the old
    content ids keep their values, the table covers the grown catalogue, and the dense
    scaling is kept unless the normalisers are refitted."""
    write_content_world(tmp_path / "early", until=60_000)
    build_features(tmp_path / "early", tmp_path / "f1", split="last", progress=False)
    for refit in (False, True):
        out = tmp_path / f"f2-{refit}"
        update = FeaturesUpdate(tmp_path / "f1", refit_normalizers=refit)
        build_features(world / "d", out, split="last", progress=False, update=update)
        f1, f2 = Features.open(tmp_path / "f1"), Features.open(out)
        for name in f1.manifest["item_content"]["vocabularies"].values():
            assert f2.vocab(name).extends(f1.vocab(name)), name
        grown = f2.manifest["update"]["vocab_growth"]
        assert grown["title_token"]["new"] > grown["title_token"]["old"]
        old, new = f1.item_content(), f2.item_content()
        assert len(new) == 42 > len(old)
        assert (new.scale == old.scale) is not refit
