"""`funnelrec train ranker` / `evaluate ranker` end to end on a micro simulated world."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import ranking_loader, read_examples
from funnelrec.ranking import metrics as rank_metrics
from funnelrec.ranking import training as rank
from funnelrec.ranking.model import load_ranker
from funnelrec.simulate import POLICY_SOURCES, generate, preset_config

FAST = ["model.tower=32", "train.batch_size=256", "train.epochs=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 200-user simulated world and its features (time split: every part has clicks)."""
    root = tmp_path_factory.mktemp("rank")
    generate(
        preset_config("tiny", ["n_users=200", "n_items=300", "days=10"]),
        seed=0,
        out=root / "data",
        progress=False,
    )
    build_features(
        root / "data",
        root / "feat",
        split="time",
        config=FeaturesConfig(n_quantiles=100, history_n=20),
        progress=False,
    )
    return root / "data", root / "feat"


@pytest.fixture(scope="module")
def trained(world: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = tmp_path_factory.mktemp("art") / "ranker"
    cfg = rank.load_ranker_train_config(None, FAST)
    rank.train_ranker(world[1], art, cfg, progress=False)
    return art


def test_trained_ranker_beats_random_order_on_the_simulated_world(
    world: tuple[Path, Path], trained: Path
) -> None:
    result = rank.evaluate_ranker(trained, world[1], show=False)
    model, rand = result["model"], result["random"]
    assert rand["weighted_per_user_loss"] == pytest.approx(0.5, abs=0.06)  # mean of 10 draws
    assert model["weighted_per_user_loss"] < rand["weighted_per_user_loss"] - 0.15
    assert model["auc"] > 0.6
    # simulated data: the oracle (true expected watch time) is there and better still
    assert result["oracle"]["weighted_per_user_loss"] < model["weighted_per_user_loss"]
    assert 0 <= result["clickbait"]["model_top_k_share"] <= 1
    written = json.loads((trained / "metrics.json").read_text())
    assert written["model"]["weighted_per_user_loss"] == model["weighted_per_user_loss"]
    assert written["protocol"]["split"] == "test" and written["protocol"]["tower"] == "32"


def _item_orders(feats: Features, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores of `split`'s impressions, in shard order, by two item orders fitted on the
    training impressions: popularity (training clicks) and the item's click rate (smoothed
    toward the mean); and the impressions' user ids, to align them with `score_split`."""
    cols = ["item_id", "label", "user_id"]
    train, rows = (
        {c: np.asarray(read_examples(feats, "ranking", s, cols).column(c).to_numpy()) for c in cols}
        for s in ("train", split)
    )
    n = int(max(train["item_id"].max(), rows["item_id"].max())) + 1
    clicks = np.bincount(train["item_id"], weights=train["label"], minlength=n)
    shown = np.bincount(train["item_id"], minlength=n)
    rate = (clicks + 20 * clicks.sum() / shown.sum()) / (shown + 20)
    item = rows["item_id"]
    return {"popularity": clicks[item], "click rate": rate[item]}, rows["user_id"]


def test_the_default_config_trains_until_validation_stops_and_beats_item_orders(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    """A first run with no config, not even the model's tower: training stops because
    validation stopped improving, before the maximum of epochs, keeps the best epoch, and
    that ranks the test pages well ahead of ordering them by the items' popularity or
    click rate. (The former default, two epochs, fails the AUC margin on this world.)"""
    cfg = rank.load_ranker_train_config(None, [])
    assert cfg == rank.RankerTrainConfig() and cfg.train == rank.RANKER_TRAIN_DEFAULTS
    assert cfg.train.patience > 0 and cfg.train.restore_best
    summary = rank.train_ranker(world[1], tmp_path / "art", cfg, progress=False)
    assert summary["stopped_early"] and summary["epochs"] < cfg.train.epochs
    best_epoch = summary["best_step"] * summary["epochs"] // summary["steps"]
    assert summary["epochs"] == best_epoch + cfg.train.patience
    assert summary["valid"] == pytest.approx(min(loss for _, loss in summary["history"]))

    model = rank.evaluate_ranker(tmp_path / "art", world[1], show=False)["model"]
    orders, user_id = _item_orders(Features.open(world[1]), "test")
    p = rank.score_split(load_ranker(tmp_path / "art"), Features.open(world[1]), "test", show=False)
    assert np.array_equal(p.user_id, user_id)
    for name, score in orders.items():
        loss = rank_metrics.weighted_per_user_loss(
            score, p.label, p.watch_time, p.user_id, p.request_id
        )
        assert model["weighted_per_user_loss"] < loss - 0.15, name
        assert model["auc"] > rank_metrics.auc(score, p.label) + 0.03, name


def test_ranker_reads_the_logging_policys_candidate_source_and_score(
    world: tuple[Path, Path], trained: Path
) -> None:
    """The simulator logs which policy source nominated each impression and its score:
    the features make them the `source` vocabulary and the `cand_score` column, and the
    trained ranker takes both as inputs."""
    feats = Features.open(world[1])
    assert set(feats.vocab("source").values.tolist()) == set(POLICY_SOURCES)
    assert "cand_score" in feats.manifest["ranking"]["raw_continuous"]
    model = load_ranker(trained)
    assert ("source", "source") in model.spec.categorical
    assert {"cand_score", "cand_score^2", "sqrt(cand_score)"} <= set(model.spec.dense_columns)
    batch = next(iter(ranking_loader(world[1], "valid", batch_size=256)))
    source = batch.categorical["source"]
    assert source.min() >= 1  # every logged impression's source is in the vocabulary
    # ... and the ranker's output depends on it
    other = dict(batch.categorical, source=source % len(POLICY_SOURCES) + 1)
    with torch.no_grad():
        assert not torch.equal(model(batch), model(replace(batch, categorical=other)))


def test_artifact_reloads_to_the_same_scores(world: tuple[Path, Path], trained: Path) -> None:
    names = {p.name for p in trained.iterdir()} - {"metrics.json"}  # evaluate may have run
    assert names == {"config.json", "model.safetensors", "optimizer.safetensors"}
    assert not rank.checkpoint_path(trained).exists()  # removed after a finished run
    meta = json.loads((trained / "config.json").read_text())
    assert meta["kind"] == "ranker" and meta["config"]["tower"] == [32]
    assert meta["training"]["steps"] > 0
    model = load_ranker(trained)
    batch = next(iter(ranking_loader(world[1], "valid", batch_size=64)))
    again = load_ranker(trained)
    assert torch.equal(model(batch), again(batch))


def test_calibration_is_fitted_on_validation_and_reported_raw_and_calibrated(
    world: tuple[Path, Path], trained: Path
) -> None:
    meta = json.loads((trained / "config.json").read_text())
    cal = meta["calibration"]
    assert cal["fitted_on"] == "valid" and cal["factor"] > 0
    assert meta["training"]["calibration_factor"] == cal["factor"]
    model = load_ranker(trained)
    assert model.calibration.factor == cal["factor"]
    # on the validation split the calibrated mean is the observed mean, by construction
    p = rank.score_split(model, Features.open(world[1]), "valid", show=False)
    assert cal["impressions"] == len(p)
    assert np.mean(model.seconds_from_logits(p.logit)) == pytest.approx(p.watch_time.mean())
    # evaluate reports both; the factor scales every decile and changes no order metric
    result = rank.evaluate_ranker(trained, world[1], split="test", show=False)
    m = result["model"]
    assert m["calibration"]["factor"] == cal["factor"]
    assert m["calibration"]["ratio"] == pytest.approx(cal["factor"] * m["calibration_raw"]["ratio"])
    for a, b in zip(m["calibration"]["deciles"], m["calibration_raw"]["deciles"], strict=True):
        assert a["count"] == b["count"] and a["mean_observed"] == b["mean_observed"]
        assert a["mean_predicted"] == pytest.approx(cal["factor"] * b["mean_predicted"])
    assert result["protocol"]["calibration_fit"]["fitted_on"] == "valid"


def test_calibrate_false_keeps_factor_one(world: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = rank.load_ranker_train_config(
        None, [*FAST, "train.max_steps=2", "validate=false", "calibrate=false"]
    )
    rank.train_ranker(world[1], tmp_path / "a", cfg, progress=False)
    model = load_ranker(tmp_path / "a")
    assert model.calibration.factor == 1.0 and "calibrate = false" in model.calibration.note
    # validate=false alone still calibrates (one scoring pass over the validation split)
    cfg = rank.load_ranker_train_config(None, [*FAST, "train.max_steps=2", "validate=false"])
    summary = rank.train_ranker(world[1], tmp_path / "b", cfg, progress=False)
    assert summary["valid"] is None
    assert load_ranker(tmp_path / "b").calibration.fitted_on == "valid"


def test_limit_scores_the_first_users_whole(
    world: tuple[Path, Path], trained: Path, tmp_path: Path
) -> None:
    feats, model = Features.open(world[1]), load_ranker(trained)
    full = rank.score_split(model, feats, "test", batch_size=512, show=False)
    limit = len(full) // 3
    part = rank.score_split(model, feats, "test", batch_size=512, show=False, limit=limit)
    n = len(part)
    assert limit <= n < len(full)
    assert full.user_id[n] != full.user_id[n - 1]  # cut where a new user begins
    assert np.array_equal(part.logit, full.logit[:n]) and np.array_equal(
        part.request_id, full.request_id[:n]
    )
    result = rank.evaluate_ranker(
        trained, world[1], limit=limit, show=False, out=tmp_path / "m.json"
    )
    assert result["protocol"]["impressions_scored"] == n == result["model"]["impressions"]
    assert result["protocol"]["impressions_in_split"] == len(full)
    cfg = rank.load_ranker_train_config(
        None, [*FAST, "train.max_steps=2", f"valid_impressions={limit}"]
    )
    rank.train_ranker(world[1], tmp_path / "a", cfg, progress=False)
    assert (
        limit
        <= load_ranker(tmp_path / "a").calibration.impressions
        < feats.num_examples("ranking", "valid")
    )


def test_leave_last_out_test_split_is_refused_with_the_fix(
    world: tuple[Path, Path], trained: Path, tmp_path: Path
) -> None:
    build_features(
        world[0],
        tmp_path / "last",
        split="last",
        config=FeaturesConfig(n_quantiles=100, history_n=20),
        progress=False,
    )
    with pytest.raises(FunnelrecError, match=r"leave-last-out.*--split time"):
        rank.evaluate_ranker(trained, tmp_path / "last", show=False)


def test_training_is_deterministic(world: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = rank.load_ranker_train_config(None, [*FAST, "train.max_steps=4", "validate=false"])
    a = rank.train_ranker(world[1], tmp_path / "a", cfg, progress=False)
    b = rank.train_ranker(world[1], tmp_path / "b", cfg, progress=False)
    assert a["final_train_loss"] == b["final_train_loss"]
    batch = next(iter(ranking_loader(world[1], "test", batch_size=128)))
    assert torch.equal(load_ranker(tmp_path / "a")(batch), load_ranker(tmp_path / "b")(batch))


def test_existing_artifact_is_refused_without_force(
    world: tuple[Path, Path], trained: Path
) -> None:
    with pytest.raises(FunnelrecError, match="already exists"):
        rank.train_ranker(world[1], trained, rank.load_ranker_train_config(None, FAST))


def test_evaluate_refuses_features_of_other_data(trained: Path, tmp_path: Path) -> None:
    generate(
        preset_config("tiny", ["n_users=60", "n_items=100", "days=4"]),
        seed=1,
        out=tmp_path / "d",
        progress=False,
    )
    build_features(tmp_path / "d", tmp_path / "f", split="time", progress=False)
    with pytest.raises(ArtifactError, match="fingerprint"):
        rank.evaluate_ranker(trained, tmp_path / "f", show=False)


def test_config_file_overrides_and_presets(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text('[model]\ntower = [512, 256]\nobjective = "ctr"\n[train]\nlr = 0.01\n')
    cfg = rank.load_ranker_train_config(file, ["model.power_features=false"])
    assert cfg.model.tower == (512, 256) and cfg.model.objective == "ctr"
    assert not cfg.model.power_features
    # a [train] section keeps the ranker's defaults for what it does not set
    assert cfg.train.lr == 0.01 and cfg.train.grad_clip == 0.0
    assert rank.load_ranker_train_config(None, ["model.tower=none"]).model.tower == ()
    preset = rank.load_ranker_train_config(None, ["model.tower=1024-512-256"])
    assert preset.model.tower == (1024, 512, 256)
    assert rank.load_ranker_train_config(None, ["model.tower=256,128"]).model.tower == (256, 128)
    with pytest.raises(FunnelrecError, match="unknown config key"):
        rank.load_ranker_train_config(None, ["model.towers=1"])
    with pytest.raises(FunnelrecError, match="objective"):
        rank.load_ranker_train_config(None, ["model.objective=clicks"])


def test_shipped_configs_load_and_name_their_command() -> None:
    configs = sorted((Path(__file__).parents[2] / "configs").glob("ranker*.toml"))
    assert configs, "configs/ranker*.toml missing"
    for file in configs:
        first = file.read_text().splitlines()[0]
        assert first.startswith("# funnelrec train ranker") and file.name in first, file
        rank.load_ranker_train_config(file)


def test_typer_commands_train_and_evaluate(world: tuple[Path, Path], tmp_path: Path) -> None:
    from funnelrec.cli import rank as rank_cli

    app = typer.Typer()
    app.command("train")(rank_cli.train_command)
    app.command("evaluate")(rank_cli.evaluate_command)
    runner = CliRunner()
    art = tmp_path / "art"
    res = runner.invoke(
        app, ["train", "--features", str(world[1]), "--out", str(art), *FAST, "train.max_steps=4"]
    )
    assert res.exit_code == 0, res.output
    assert "valid weighted per user loss" in res.output
    res = runner.invoke(
        app, ["evaluate", str(art), "--features", str(world[1]), "--split", "valid"]
    )
    assert res.exit_code == 0, res.output
    assert "weighted per-user loss" in res.output
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["protocol"]["split"] == "valid"
    assert not math.isnan(metrics["model"]["weighted_per_user_loss"])


def test_train_ranker_shows_progress_and_each_validation_in_a_log(
    world: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where stdout is no terminal (CliRunner's, like a log or a pipe) `train ranker`
    prints plain lines: steps done of the most, rate and ETA while it trains, and every
    validation's loss beside the best so far. (A line at every update here: every=0.)"""
    from funnelrec import progress
    from funnelrec.cli import rank as rank_cli
    from funnelrec.training import loop

    monkeypatch.setattr(loop, "progress_bar", functools.partial(progress.progress_bar, every=0.0))
    app = typer.Typer()
    app.command("train")(rank_cli.train_command)
    app.command("evaluate")(rank_cli.evaluate_command)  # two commands: `train` is named
    out = tmp_path / "art"
    res = CliRunner().invoke(app, ["train", "--features", str(world[1]), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "ranker 32 watch_time: 0/70 · started"  # 2 epochs of 8,819 / 256
    training = [line for line in lines if re.search(r": \d+/70 steps .* ex/s .* ETA \d", line)]
    assert len(training) > 10 and any("· 50% ·" in line for line in training)
    validations = [line for line in lines if line.startswith("validation ")]
    assert len(validations) == 2
    first = r"validation 1: weighted per user loss 0\.\d{4} \(best so far\)"
    assert re.fullmatch(first, validations[0])
    assert "70 steps, 2 epoch(s)" in " ".join(res.output.split())  # the summary, unwrapped


def test_features_spec_builds_the_model(world: tuple[Path, Path]) -> None:
    from funnelrec.ranking.model import RankingConfig, RankingFeatureSpec, RankingModel

    feats = Features.open(world[1])
    spec = RankingFeatureSpec.from_dict(feats.ranking_spec)
    model = RankingModel(spec, RankingConfig(tower=(8,)))
    # impression item, seed item and history share the rank_item table
    assert {s for f, s in spec.categorical if f in ("item", "seed")} == {"rank_item"}
    assert dict(spec.bags)["history"] == "rank_item"
    batch = next(iter(ranking_loader(feats, "train", batch_size=32)))
    assert model(batch).shape == (32,)
    assert torch.isfinite(model.compute_loss(batch))
