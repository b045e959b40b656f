"""`funnelrec update`: day 1 trained, day 2 appended and the funnel updated in one command,
resumed, and refused without a previous stage (data: `tests/features/periods.py`); the
items a server added live merged into the next artifact (data: the tiny simulated world)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from funnelrec.candidates import fit_candidates, load_item_embeddings, load_training_config
from funnelrec.cli import app
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.pipeline import (
    UPDATE_CANDIDATES,
    UPDATE_STEPS,
    load_update_config,
    split_update_args,
    update,
)
from funnelrec.ranking import training as ranking_training
from funnelrec.ranking.training import load_ranker_train_config, train_ranker
from funnelrec.serving.http import create_app
from funnelrec.serving.package import package
from funnelrec.serving.recommender import (
    STATE_DIR,
    Recommender,
    RecommendRequest,
    ServingConfig,
    seed_store,
)
from funnelrec.serving.state import UserStateStore
from funnelrec.simulate import generate, preset_config
from funnelrec.training import loop as training_loop
from tests.features.periods import write_periods

# training settings, for day 1 and the update alike (a warm start keeps the model's config)
CANDIDATES = ["batch_size=16", "threads=1", "epochs=1", "patience=0"]
RANKER = ["train.epochs=1", "train.batch_size=64", "train.threads=1"]
OVERRIDES = [
    f"candidates.overrides={','.join(CANDIDATES)}",
    f"ranker.overrides={','.join(RANKER)}",
    "index.kind=exact",
    "progress=false",
]


def _day_1(root: Path) -> tuple[Path, Path]:
    """Day 1's dataset and a run directory of it: features, candidates, ranker."""
    ds, _ = write_periods(root)
    run = root / "day-1"
    build_features(
        ds,
        run / "features",
        split="time",
        config=FeaturesConfig(history_n=5, n_quantiles=20),
        progress=False,
    )
    cand = load_training_config(None, ["dim=8", "num_negatives=16", *CANDIDATES])
    fit_candidates(run / "features", run / "candidates", cand, progress=False)
    rank = load_ranker_train_config(None, ["model.tower=16", *RANKER])
    train_ranker(run / "features", run / "ranker", rank, progress=False)
    return ds, run


def _raw_id(ds: Path, space: str, raw: str) -> int:
    ids = Dataset.open(ds).id_map(space).to_pydict()
    return int(ids["id"][ids["raw_id"].index(raw)])


def test_update_appends_trains_and_packages_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, day_1 = _day_1(tmp_path)
    monkeypatch.chdir(tmp_path)  # the day-2 logs' paths are relative to it
    scored: list[str] = []
    score_split = ranking_training.score_split

    def counted(model: Any, feats: Any, split: str, *args: Any, **kwargs: Any) -> Any:
        scored.append(split)
        return score_split(model, feats, split, *args, **kwargs)

    monkeypatch.setattr(ranking_training, "score_split", counted)
    # an interrupted step reruns from its start: the warm starts write no checkpoints
    saved: list[Path] = []
    monkeypatch.setattr(training_loop, "_save_atomic", lambda state, path: saved.append(path))
    logs = [f"{t}=day-2/{t}.csv" for t in ("watches", "searches", "users", "impressions")]
    args = ["update", "--dataset", str(ds), "--previous", str(day_1), "--out", "day-2"]
    result = CliRunner().invoke(app, [*args, *logs, "--replay", "0.5", *OVERRIDES])
    assert result.exit_code == 0, result.output
    for step in UPDATE_STEPS:
        assert f"{step}: " in result.output

    # the warm starts: the overrides over the update's defaults (UPDATE_CANDIDATES)
    cand_meta = json.loads((tmp_path / "day-2" / "candidates" / "config.json").read_text())
    assert cand_meta["train"]["epochs"] == 1 and cand_meta["train"]["batch_size"] == 16
    assert cand_meta["valid_examples"] == UPDATE_CANDIDATES.valid_examples
    # one epoch: its validation scored the weights kept, and the calibration reused it
    ranker = json.loads((tmp_path / "day-2" / "ranker" / "config.json").read_text())["training"]
    assert scored == ["valid"]
    assert saved == []
    assert ranker["valid"] == ranker["history"][-1][1]

    out = tmp_path / "day-2"
    report = json.loads((out / "update.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(UPDATE_STEPS)
    assert {s["status"] for s in report["steps"]} == {"ran"}
    assert report["counts"]["new_rows"]["watches"] > 0
    assert report["counts"]["new_ids"]["user"] == 8
    growth = report["counts"]["vocab_growth"]["item"]
    assert growth["new"] > growth["old"]
    assert "candidates" in report["drift"]

    # a user and an item new on day 2: served, and in the candidate model's vocabulary
    new_user, new_item = _raw_id(ds, "user", "n00"), _raw_id(ds, "item", "w00")
    _, item_ids = load_item_embeddings(out / "candidates")
    assert new_item in set(item_ids.tolist())
    rec = Recommender.load(out / "artifact")
    store = UserStateStore(out / "artifact" / "state.db")
    rec.seed_state(store)
    response = rec.recommend(RecommendRequest(user_id=new_user, k=5), store.context(new_user))
    assert len(response.items) == 5

    # a server whose live state was seeded from day 1's data takes day 2's artifact
    day_1_data = Features.open(day_1 / "features").fingerprint
    assert rec.data_lineage == [day_1_data]
    live = UserStateStore(tmp_path / "live.db")
    state = out / "artifact" / STATE_DIR
    live.seed(
        *(pq.read_table(state / f"{t}.parquet") for t in ("watches", "searches", "impressions")),
        fingerprint=day_1_data,
    )
    rec.check_compatible_state(live)
    seed_store(out / "artifact", rec.data_fingerprint, live)  # kept, not seeded again
    assert live.meta("seeded_from") == day_1_data
    other = UserStateStore(tmp_path / "other.db")
    other.seed(
        *(pq.read_table(state / f"{t}.parquet") for t in ("watches", "searches", "impressions")),
        fingerprint="0123456789abcdef",
    )
    with pytest.raises(ArtifactError, match="seeded from data 0123456789abcdef"):
        rec.check_compatible_state(other)

    # again: every step is up to date
    again = CliRunner().invoke(app, [*args, *logs, "--replay", "0.5", *OVERRIDES])
    assert again.exit_code == 0, again.output
    report = json.loads((out / "update.json").read_text())
    assert {s["status"] for s in report["steps"]} == {"skipped"}, report["steps"]

    # no logs, and the dataset has not grown since day 2: nothing to update from
    with pytest.raises(FunnelrecError, match="has not changed since"):
        update(ds, out, tmp_path / "day-3", console=Console(quiet=True))


def test_update_refuses_a_previous_directory_without_a_stage(tmp_path: Path) -> None:
    ds, _ = write_periods(tmp_path)
    (tmp_path / "prev" / "features").mkdir(parents=True)
    (tmp_path / "prev" / "candidates").mkdir()
    with pytest.raises(FunnelrecError, match=r"prev: no ranker/"):
        update(ds, tmp_path / "prev", tmp_path / "new", console=Console(quiet=True))
    with pytest.raises(FunnelrecError, match="writes a new directory"):
        shutil.copytree(tmp_path / "prev", tmp_path / "same")
        (tmp_path / "same" / "ranker").mkdir()
        update(ds, tmp_path / "same", tmp_path / "same", console=Console(quiet=True))


def test_arguments_split_into_logs_and_overrides() -> None:
    logs, overrides = split_update_args(
        ["day2/w.csv", "impressions=day2/i.csv", "replay=0.2", "candidates.overrides=epochs=1"]
    )
    assert logs == ["day2/w.csv", "impressions=day2/i.csv"]
    assert overrides == ["replay=0.2", "candidates.overrides=epochs=1"]


def test_items_added_live_are_in_the_next_daily_artifact_and_served_from_its_index(
    tmp_path: Path,
) -> None:
    """An item added through POST /v1/items -> `update --live-items` on the served state
    database -> the new artifact holds it (a content model's index, by its content), and
    after /admin/reload the server answers it from there, once, under the same ids."""
    day_1 = tmp_path / "day-1"
    generate(preset_config("tiny", []), seed=0, out=tmp_path / "data", progress=False)
    build_features(
        tmp_path / "data",
        day_1 / "features",
        split="last",
        config=FeaturesConfig(n_quantiles=20, seed=0, candidate_columns=False),
        progress=False,
    )
    steps = ["batch_size=256", "max_steps=10", "patience=0", "threads=1"]
    cand = ["dim=8", "num_negatives=64", "valid_examples=100", "item_content=true", *steps]
    cand_cfg = load_training_config(None, cand)
    fit_candidates(day_1 / "features", day_1 / "candidates", cand_cfg, progress=False)
    rank = ["model.tower=16", "validate=false"]
    rank += ["train.batch_size=256", "train.max_steps=10", "train.threads=1"]
    rank_cfg = load_ranker_train_config(None, rank)
    train_ranker(day_1 / "features", day_1 / "ranker", rank_cfg, progress=False)
    parts = [day_1 / p for p in ("features", "candidates", "ranker", "artifact")]
    art = package(*parts, progress=False)

    state = tmp_path / "state.db"
    deep_only = ServingConfig(deep_k=1000, fresh_k=0, cowatch_k=0)
    fields = ("channel_id", "topic", "title", "upload_ts", "duration_s")
    with TestClient(create_app(art, state_path=state, serving=deep_only)) as c:
        body = {"item_id": "live-1", **{k: c.get("/v1/items/5").json()[k] for k in fields}}
        added = c.post("/v1/items", json=body).json()
    assert added["created"] and added["item_id"] == 1001  # the tiny world has 1000 items

    overrides = [
        f"candidates.overrides={','.join(steps)}",
        "ranker.overrides=train.batch_size=256,train.max_steps=10,train.threads=1",
        "index.kind=exact",
        "progress=false",
    ]
    cfg = load_update_config(None, overrides)
    out = tmp_path / "day-2"
    result = update(
        tmp_path / "data", day_1, out, config=cfg, console=Console(quiet=True), live_items=state
    )
    assert result.report["counts"]["live_items"]["new"] == 1
    assert _raw_id(tmp_path / "data", "item", "live-1") == 1001  # the id the service gave
    content = Features.open(out / "features").item_content()
    assert 1001 in set(content.item_id.tolist())
    _, exported = load_item_embeddings(out / "candidates")
    assert 1001 in set(exported.tolist())  # by its content: no one has watched it
    with TestClient(create_app(art, state_path=state, serving=deep_only)) as c:
        # added to the old model after the update: not in the new artifact
        later = c.post("/v1/items", json={**body, "item_id": "live-2"}).json()["item_id"]
    assert later == 1002

    app = create_app(art, state_path=state, serving=deep_only, artifacts_root=tmp_path)
    with TestClient(app) as c:
        assert c.post("/admin/reload", json={"path": str(out / "artifact")}).status_code == 200
        rec = app.state.service.recommender
        # only the item the artifact lacks is scanned beside its index
        assert rec.path == out / "artifact" and list(rec.added) == [1002]
        items = c.post("/v1/recommend", json={"user_id": 1, "k": 1000}).json()["items"]
        ids = [it["item_id"] for it in items]
        assert ids.count(1001) == 1 and ids.count(1002) == 1
        assert c.get("/v1/items/1001").json()["raw_id"] == "live-1"
        again = c.post("/v1/items", json=body).json()
        assert again == {"item_id": 1001, "raw_id": "live-1", "created": False,
                         "retrievable": True}  # fmt: skip
