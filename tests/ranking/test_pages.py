"""Impressions synthesised from candidate retrievals, for data without impressions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    features_meta,
    load_candidate_model,
    load_item_embeddings,
    save_candidate_artifact,
)
from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import candidate_loader
from funnelrec.ranking import training as rank
from funnelrec.ranking.model import RankingFeatureSpec
from funnelrec.ranking.pages import impressions_from_candidates
from funnelrec.simulate import generate, preset_config
from funnelrec.training.loop import TrainConfig, loader_epochs, train

K = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rfc")
    generate(
        preset_config("tiny", ["n_users=120", "n_items=200", "days=6"]),
        seed=2,
        out=root / "sim",
        progress=False,
    )
    # the same world without impressions, like a MovieLens or sequence-file import
    sim = Dataset.open(root / "sim")
    with DatasetWriter(root / "data", source="test") as w:
        for name in ("users", "items", "watches", "searches"):
            w.write(name, sim.table(name))
        for space in sim.manifest.id_maps:
            w.add_id_map(space, sim.id_map(space).sort_by("id").column("raw_id"))
    cfg = FeaturesConfig(n_quantiles=50, history_n=10, cap=10)
    build_features(root / "data", root / "feat", split="last", config=cfg, progress=False)
    feats = Features.open(root / "feat")
    torch.manual_seed(0)
    model = CandidateModel(
        CandidateConfig(dim=16, depth=1, loss="full"),
        CandidateInputs.from_features(feats),
        label_counts=torch.from_numpy(np.array(feats.item_label_counts())),
    )
    loader = candidate_loader(feats, "train", batch_size=128, shuffle=True)
    train(model, loader_epochs(loader), TrainConfig(epochs=3, lr=0.01), progress=False)
    (root / "cand").mkdir()
    save_candidate_artifact(
        model.eval(),
        root / "cand",
        item_ids=np.asarray(feats.vocab("item").values, dtype=np.int64),
        meta=features_meta(feats),
    )
    impressions_from_candidates(
        root / "data", root / "feat", root / "cand", root / "data2", k=K, progress=False
    )
    build_features(root / "data2", root / "feat2", split="last", config=cfg, progress=False)
    return {
        "data": root / "data",
        "feat": root / "feat",
        "cand": root / "cand",
        "data2": root / "data2",
        "feat2": root / "feat2",
        "root": root,
    }


def test_every_page_has_k_impressions_and_the_watched_item_as_its_one_click(
    setup: dict[str, Path],
) -> None:
    ds = Dataset.open(setup["data2"])
    imp = ds.table("impressions")
    feats = Features.open(setup["feat"])
    n_examples = sum(feats.num_examples("candidates", s) for s in ("train", "valid", "test"))
    meta = ds.manifest.extra["impressions_from_candidates"]
    assert meta["examples"] == n_examples
    assert 0 < meta["pages"] < n_examples  # moments whose watch was not retrieved have none
    assert imp.num_rows == meta["pages"] * K
    req = imp.column("request_id").to_numpy()
    assert np.array_equal(np.unique(req), np.arange(1, meta["pages"] + 1))
    clicks = np.bincount(req, weights=imp.column("clicked").to_numpy(zero_copy_only=False))
    assert set(clicks[1:].tolist()) == {1.0}
    # the click is a real watch of that user at that moment, with its watch time
    clicked = imp.filter(imp.column("clicked"))
    watches = ds.table("watches", ["user_id", "ts", "item_id", "watch_time_s"])
    joined = clicked.join(watches, ["user_id", "ts", "item_id"], right_suffix="_w")
    assert joined.num_rows >= clicked.num_rows
    assert pc.all(pc.greater(clicked.column("watch_time_s"), 0)).as_py()
    unclicked = imp.filter(pc.invert(imp.column("clicked")))
    assert pc.max(unclicked.column("watch_time_s")).as_py() == 0
    # the source tables are carried over unchanged
    src = Dataset.open(setup["data"])
    assert ds.table("watches").equals(src.table("watches"))
    assert ds.manifest.extra["impressions_from_candidates"]["k"] == K


def test_ranking_examples_build_and_train_from_the_synthetic_impressions(
    setup: dict[str, Path],
) -> None:
    feat2 = setup["feat2"]
    f2 = Features.open(feat2)
    assert f2.has_ranking and f2.num_examples("ranking", "train") > 0
    cfg = rank.load_ranker_train_config(
        None, ["model.tower=16", "train.batch_size=256", "train.max_steps=5"]
    )
    summary = rank.train_ranker(feat2, setup["root"] / "ranker", cfg, progress=False)
    assert summary["steps"] == 5


def test_data_that_has_impressions_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FunnelrecError, match="already has impressions"):
        impressions_from_candidates(
            setup["data2"], setup["feat"], setup["root"] / "cand", tmp_path / "x", progress=False
        )


def test_the_click_is_one_of_the_retrieved_items_not_an_inserted_odd_one_out(
    setup: dict[str, Path],
) -> None:
    # A click is an item the candidate model retrieved for that user at that moment, like
    # its page's non-clicks: retrieve every candidate example's top K again to check.
    model = load_candidate_model(setup["cand"])
    emb, ids = load_item_embeddings(setup["cand"])
    index = ItemIndex.build(emb.numpy(), ids.numpy())
    feats = Features.open(setup["feat"])
    vocab = feats.vocab("item")
    top: dict[tuple[int, int], set[int]] = {}
    with torch.no_grad():
        for split in ("train", "valid", "test"):
            for batch in candidate_loader(feats, split, batch_size=4096):
                got, _ = index.search(model(batch).float().numpy(), K)
                for u, t, row in zip(
                    batch.user_id.tolist(), batch.ts.tolist(), got.tolist(), strict=True
                ):
                    top.setdefault((u, t), set()).update(row)
    imp = Dataset.open(setup["data2"]).table("impressions")
    clicked = imp.filter(imp.column("clicked"))
    cols = [clicked.column(c).to_pylist() for c in ("user_id", "ts", "item_id")]
    for u, t, i in zip(*cols, strict=True):
        assert i in top[(u, t)]
    assert vocab.lookup(clicked.column("item_id").to_numpy()).min() > 0


def _within_page_auc(request: np.ndarray, label: np.ndarray, value: np.ndarray) -> float:
    """P(click's value > a non-click's on the same page), ties half; NaN lowest."""
    v = np.where(np.isnan(value), -np.inf, value)
    num = den = 0.0
    for r in np.unique(request):
        m = request == r
        pos, neg = v[m & label][:, None], v[m & ~label][None, :]
        num += (pos > neg).sum() + 0.5 * (pos == neg).sum()
        den += pos.size * neg.size
    return num / den


# What the ranking features know of past pages: in synthetic impressions these carry no
# real exposure, so a page must not differ in them between its click and its non-clicks.
EXPOSURE = ("item_shown_before", "item_last_shown_ago_s")


@pytest.mark.parametrize("split", ["train", "test"])
def test_exposure_features_do_not_give_the_click_away(setup: dict[str, Path], split: str) -> None:
    shards = Features.open(setup["feat2"]).shards("ranking", split)
    rows = pa.concat_tables([pq.read_table(p) for p in shards])
    label = rows.column("label").to_numpy() > 0
    request = rows.column("request_id").to_numpy()
    for name in EXPOSURE:
        auc = _within_page_auc(request, label, rows.column(name).to_numpy(zero_copy_only=False))
        # a click inserted where retrieval missed it was rarely shown before, its
        # neighbours on the page (the same top K as on earlier pages) nearly always
        assert 0.3 < auc < 0.7, (name, auc)


def test_pages_leave_out_a_missed_watch() -> None:
    from funnelrec.ranking.pages import _pages, _retrieved

    retrieved = np.array([[5, 6, 7], [8, 9, -1], [1, 2, 3]])
    item = np.array([6, 9, 4])
    assert _retrieved(retrieved, item).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="not among"):
        _pages(retrieved, item, np.ones(3), np.arange(3), np.arange(3), first_request=1)
    t = _pages(retrieved[:2], item[:2], np.array([30.0, np.nan]), np.array([1, 2]),
               np.array([100, 200]), first_request=7)  # fmt: skip
    assert t.column("request_id").to_pylist() == [7, 7, 7, 8, 8]
    assert t.column("item_id").to_pylist() == [5, 6, 7, 8, 9]
    assert t.column("position").to_pylist() == [0, 1, 2, 0, 1]
    assert t.column("clicked").to_pylist() == [False, True, False, False, True]
    # no watch time in the data: the click weighs 1 second
    assert t.column("watch_time_s").to_pylist() == [0, 30, 0, 0, 1]
    assert pa.types.is_int32(t.schema.field("position").type)


def test_the_command_writes_the_pages_and_says_how_many(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from funnelrec.cli import app

    out = tmp_path / "data3"
    args = ["features", "impressions", "--data", str(setup["data"]), "--features"]
    args += [str(setup["feat"]), "--candidates", str(setup["cand"]), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "-k", str(K)])
    assert res.exit_code == 0, res.output
    made = Dataset.open(out).manifest.extra["impressions_from_candidates"]
    assert 0 < made["pages"] <= made["examples"]
    assert f"{made['pages']:,} pages of {K}" in " ".join(res.output.split())
    assert Dataset.open(out).table("impressions").num_rows == made["pages"] * K


def test_pages_log_the_source_and_score_and_the_ranker_reads_them(
    setup: dict[str, Path],
) -> None:
    imp = Dataset.open(setup["data2"]).table("impressions")
    assert set(imp.column("cand_source").to_pylist()) == {"deep"}
    score = imp.column("cand_score").to_numpy()
    req = imp.column("request_id").to_numpy()
    pos = imp.column("position").to_numpy()
    order = np.lexsort((pos, req))
    same_page = req[order][1:] == req[order][:-1]
    assert np.all(np.diff(score[order])[same_page] <= 1e-6)  # retrieval order: best first
    # the retrieval's own scores: the user vector against the clicked item's embedding
    model = load_candidate_model(setup["cand"])
    emb, ids = load_item_embeddings(setup["cand"])
    feats = Features.open(setup["feat"])
    clicked = imp.filter(imp.column("clicked"))
    by_moment = {
        (u, t): s
        for u, t, s in zip(
            clicked.column("user_id").to_pylist(),
            clicked.column("ts").to_pylist(),
            clicked.column("cand_score").to_pylist(),
            strict=True,
        )
    }
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    checked = 0
    with torch.no_grad():
        for batch in candidate_loader(feats, "train", batch_size=4096):
            u = model(batch).float()
            items = feats.vocab("item").decode(np.maximum(batch.label.numpy(), 1))
            for row, key in enumerate(zip(batch.user_id.tolist(), batch.ts.tolist(), strict=True)):
                if key in by_moment and batch.label[row] > 0:
                    want = float(u[row] @ emb[row_of[int(items[row])]])
                    assert by_moment[key] == pytest.approx(want, rel=1e-4, abs=1e-4)
                    checked += 1
    assert checked > 0
    # both become ranking features, and the ranker trained on them has their inputs
    spec = RankingFeatureSpec.from_dict(Features.open(setup["feat2"]).ranking_spec)
    assert "source" in dict(spec.categorical) and "cand_score" in spec.dense_columns
    cfg = rank.load_ranker_train_config(None, ["model.tower=8", "train.max_steps=2"])
    rank.train_ranker(setup["feat2"], setup["root"] / "ranker-src", cfg, progress=False)
    trained = json.loads((setup["root"] / "ranker-src" / "config.json").read_text())
    assert RankingFeatureSpec.from_dict(trained["spec"]) == spec
