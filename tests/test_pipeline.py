"""`funnelrec run`: every stage once on the tiny world, then only what a change touches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from funnelrec.config import apply_overrides, load_config
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.pipeline import (
    DataStage,
    FeatureStage,
    RunConfig,
    StageSettings,
    _features_overrides,
    load_run_config,
    run,
)
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
