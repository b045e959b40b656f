"""Impressions synthesised from candidate retrievals, for data without impressions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from funnelrec.candidates import (
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    features_meta,
    save_candidate_artifact,
)
from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import candidate_loader
from funnelrec.ranking import training as rank
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
    return {"data": root / "data", "feat": root / "feat", "data2": root / "data2", "root": root}


def test_every_page_has_k_impressions_and_the_watched_item_as_its_one_click(
    setup: dict[str, Path],
) -> None:
    ds = Dataset.open(setup["data2"])
    imp = ds.table("impressions")
    feats = Features.open(setup["feat"])
    n_examples = sum(feats.num_examples("candidates", s) for s in ("train", "valid", "test"))
    assert imp.num_rows == n_examples * K
    req = imp.column("request_id").to_numpy()
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
    feat2 = setup["root"] / "feat2"
    build_features(
        setup["data2"],
        feat2,
        split="last",
        config=FeaturesConfig(n_quantiles=50, history_n=10, cap=10),
        progress=False,
    )
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


def test_pages_replace_the_last_slot_with_a_missed_watch() -> None:
    from funnelrec.ranking.pages import _pages

    retrieved = np.array([[5, 6, 7], [8, 9, -1]])
    t = _pages(retrieved, np.array([6, 4]), np.array([30.0, np.nan]), np.array([1, 2]),
               np.array([100, 200]), first_request=7)  # fmt: skip
    assert t.column("request_id").to_pylist() == [7, 7, 7, 8, 8, 8]
    assert t.column("item_id").to_pylist() == [5, 6, 7, 8, 9, 4]
    assert t.column("clicked").to_pylist() == [False, True, False, False, False, True]
    # no watch time in the data: the click weighs 1 second
    assert t.column("watch_time_s").to_pylist() == [0, 30, 0, 0, 0, 1]
    assert pa.types.is_int32(t.schema.field("position").type)
