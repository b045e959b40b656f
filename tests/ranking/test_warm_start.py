"""Warm starts of the ranker: a ranker of day 1 continued on features updated for day 2
(data written by the tests: `tests/features/periods.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.errors import ArtifactError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.update import FeaturesUpdate
from funnelrec.ranking.model import read_ranker_config
from funnelrec.ranking.training import load_ranker_train_config, train_ranker
from tests.features.periods import append_day_2, write_periods

OVERRIDES = ["model.tower=16", "train.epochs=2", "train.batch_size=64", "train.threads=1"]


def test_a_ranker_warm_start_grows_its_tables_and_keeps_the_old_rows(tmp_path: Path) -> None:
    ds, day2 = write_periods(tmp_path)
    cfg = FeaturesConfig(history_n=5, n_quantiles=20)
    build_features(ds, tmp_path / "f1", split="time", config=cfg, progress=False)
    train_cfg = load_ranker_train_config(None, OVERRIDES)
    train_ranker(tmp_path / "f1", tmp_path / "r1", train_cfg, progress=False)
    append_day_2(tmp_path, day2)
    build_features(
        ds, tmp_path / "f2", split="time", progress=False, update=FeaturesUpdate(tmp_path / "f1")
    )
    build_features(ds, tmp_path / "fresh", split="time", config=cfg, progress=False)

    # one step at a negligible lr: the artifact holds the grown initial state, to rounding
    still = load_ranker_train_config(None, [*OVERRIDES, "train.max_steps=1", "train.lr=1e-12"])
    r1 = tmp_path / "r1"
    train_ranker(tmp_path / "f2", tmp_path / "r0", still, progress=False, warm_start=r1)
    old = load_file(str(tmp_path / "r1" / "model.safetensors"))
    grown = load_file(str(tmp_path / "r0" / "model.safetensors"))
    table = "embeddings.rank_item.weight"
    rows = old[table].shape[0]
    assert grown[table].shape[0] == len(Features.open(tmp_path / "f2").vocab("rank_item")) > rows
    assert torch.allclose(grown[table][:rows], old[table], atol=1e-6)
    assert grown[table][rows:].abs().sum() > 0
    assert read_ranker_config(tmp_path / "r0")["warm_start"]["grown"][table] == [
        rows,
        grown[table].shape[0],
    ]
    # the optimizers continued: one more step on the counts of day 1's run
    assert read_ranker_config(tmp_path / "r0")["warm_start"]["optimizer_state"] == "continued"
    before = load_file(str(tmp_path / "r1" / "optimizer.safetensors"))
    after = load_file(str(tmp_path / "r0" / "optimizer.safetensors"))
    steps = [k for k in before if k.endswith("/step")]
    assert steps and all(float(after[k]) == float(before[k]) + 1 for k in steps)
    moments = f"{table}/exp_avg_sq"
    assert after[moments].shape[0] == grown[table].shape[0] > before[moments].shape[0]

    result = CliRunner().invoke(
        app,
        ["train", "ranker", "-f", str(tmp_path / "f2"), "-o", str(tmp_path / "r2"),
         "--warm-start", str(tmp_path / "r1"), *OVERRIDES],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = read_ranker_config(tmp_path / "r2")["training"]
    assert summary["steps"] > 0 and summary["valid"] is not None

    with pytest.raises(ArtifactError, match="update-from"):
        train_ranker(
            tmp_path / "fresh", tmp_path / "x", train_cfg, progress=False,
            warm_start=tmp_path / "r1",
        )  # fmt: skip
