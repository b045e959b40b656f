"""`funnelrec update`: day 1 trained, day 2 appended and the funnel updated in one command,
resumed, and refused without a previous stage (data: `tests/features/periods.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from funnelrec.candidates import fit_candidates, load_item_embeddings, load_training_config
from funnelrec.cli import app
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.pipeline import UPDATE_STEPS, split_update_args, update
from funnelrec.ranking.training import load_ranker_train_config, train_ranker
from funnelrec.serving.recommender import STATE_DIR, Recommender, RecommendRequest, seed_store
from funnelrec.serving.state import UserStateStore
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
    logs = [f"{t}=day-2/{t}.csv" for t in ("watches", "searches", "users", "impressions")]
    args = ["update", "--dataset", str(ds), "--previous", str(day_1), "--out", "day-2"]
    result = CliRunner().invoke(app, [*args, *logs, "--replay", "0.5", *OVERRIDES])
    assert result.exit_code == 0, result.output
    for step in UPDATE_STEPS:
        assert f"{step}: " in result.output

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
