"""`funnelrec run`: every stage once on the tiny world, then only what a change touches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from funnelrec.candidates import fit_candidates
from funnelrec.config import apply_overrides, load_config
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.pipeline import (
    UPDATE_CANDIDATES,
    UPDATE_RANKER,
    DataStage,
    FeatureStage,
    RunConfig,
    StageSettings,
    UpdateConfig,
    _features_overrides,
    load_run_config,
    load_update_config,
    run,
    update_candidates_config,
    update_ranker_config,
)
from funnelrec.ranking.training import train_ranker
from funnelrec.serving.recommender import Recommender

STAGES = ["data", "features", "candidates", "index", "ranker", "evaluation", "artifact"]


def _config(out: Path) -> RunConfig:
    return RunConfig(
        out=str(out),
        data=DataStage(preset="tiny", seed=1),
        candidates=StageSettings(
            overrides=("dim=16", "num_negatives=128", "batch_size=256", "max_steps=40")
        ),
        ranker=StageSettings(
            overrides=("model.tower=32", "train.max_steps=40", "train.batch_size=512")
        ),
        progress=False,
    )


def test_run_all_stages_then_skip_what_is_up_to_date(tmp_path: Path) -> None:
    quiet = Console(quiet=True)
    cfg = _config(tmp_path / "run")
    first = run(cfg, console=quiet)
    assert first.ran == STAGES and first.skipped == []
    assert {"model", "popularity"} <= set(first.metrics["candidates"])
    assert Recommender.load(first.artifact).has_item(1)
    # simulated world: the logged candidate sources are not the served ones, so not features
    feats = Features.open(first.out / "features")
    assert feats.config.candidate_columns is False
    assert "source" not in feats.manifest["vocabularies"]
    assert "cand_score" not in feats.manifest["ranking"]["raw_continuous"]

    again = run(cfg, console=quiet)
    assert again.ran == [] and again.skipped == STAGES

    # A new ranker setting redoes the ranker and what reads it, nothing upstream. (The
    # overrides are replaced whole: keep the step budget, not the default's 20 epochs.)
    changed = apply_overrides(
        cfg, ["ranker.overrides=model.tower=16,train.max_steps=40,train.batch_size=512"]
    )
    third = run(changed, console=quiet)
    assert third.ran == ["ranker", "evaluation", "artifact"]


def test_run_config_file_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('out = "x"\n[candidates]\nconfig = "cand.toml"\n')
    cfg = load_run_config(f, ["data.seed=3"])
    assert cfg.data.seed == 3 and cfg.candidates.config == str(tmp_path / "cand.toml")
    with pytest.raises(FunnelrecError, match=r"unknown config key 'data\.sed'"):
        load_run_config(f, ["data.sed=3"])
    bad = RunConfig(out=str(tmp_path / "r"), data=DataStage(source="import", format="csv"))
    with pytest.raises(FunnelrecError, match=r"data\.format 'csv'"):
        run(bad, console=Console(quiet=True))


def test_simulated_runs_build_features_without_candidate_columns() -> None:
    """The run turns `candidate_columns` off for a simulated world (its logged sources are
    the logging policy's, not the served ones), not for imported data; the stage's own
    overrides come after and win."""
    sim = RunConfig(data=DataStage(source="simulate"))
    assert _features_overrides(sim) == ["candidate_columns=false"]
    imported = RunConfig(data=DataStage(source="import", format="kuairand", src="x"))
    assert _features_overrides(imported) == []
    forced = replace(sim, features=FeatureStage(overrides=("candidate_columns=true", "cap=5")))
    cfg = load_config(FeaturesConfig, None, _features_overrides(forced))
    assert cfg.candidate_columns is True and cfg.cap == 5
    assert load_config(FeaturesConfig, None, _features_overrides(sim)).candidate_columns is False


def test_warm_starts_train_the_updates_defaults_under_a_file_and_overrides(
    tmp_path: Path,
) -> None:
    # nothing given: a short warm start, not the fresh run's train-to-convergence
    cand, rank = update_candidates_config(StageSettings()), update_ranker_config(StageSettings())
    assert cand == UPDATE_CANDIDATES and rank == UPDATE_RANKER
    assert (cand.train.epochs, cand.train.patience, cand.valid_examples) == (3, 0, 5_000)
    assert cand.train.batch_size == 1024
    assert rank.train.epochs == 1 and rank.train.grad_clip == 0.0  # the ranker's own
    assert UpdateConfig().replay == 0.01
    # overrides win key by key; what they leave out stays the update's
    cand = update_candidates_config(StageSettings(overrides=("epochs=1", "lr=0.01")))
    assert (cand.train.epochs, cand.train.lr, cand.train.patience) == (1, 0.01, 0)
    assert cand.valid_examples == 5_000
    # a TOML file setting part of [train] keeps the rest of the update's defaults
    toml = tmp_path / "update.toml"
    (tmp_path / "cand.toml").write_text("[train]\nlr = 0.002\n")
    (tmp_path / "rank.toml").write_text("[train]\nbatch_size = 256\n")
    toml.write_text('[candidates]\nconfig = "cand.toml"\n[ranker]\nconfig = "rank.toml"\n')
    cfg = load_update_config(toml, ["ranker.overrides=train.epochs=3"])
    cand, rank = update_candidates_config(cfg.candidates), update_ranker_config(cfg.ranker)
    assert (cand.train.lr, cand.train.epochs) == (0.002, 3)
    assert (rank.train.batch_size, rank.train.epochs, rank.train.patience) == (256, 3, 2)
    with pytest.raises(FunnelrecError, match="epoch"):
        update_candidates_config(StageSettings(overrides=("epoch=1",)))


def test_a_warm_start_without_checkpoints_cannot_resume(tmp_path: Path) -> None:
    with pytest.raises(FunnelrecError, match="needs checkpoints"):
        fit_candidates(tmp_path / "feat", tmp_path / "cand", resume=True, checkpoints=False)
    with pytest.raises(FunnelrecError, match="needs checkpoints"):
        train_ranker(tmp_path / "feat", tmp_path / "rank", resume=True, checkpoints=False)
