"""benchmarks/rolling.py end to end on the tiny world: days 1-21 imported and trained, days
22 and 23 taken in by every arm through the import path, the results' structure and
ranges checked (never the timings' values)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.simulate import preset_config
from tests.scripts import load_script

rolling = load_script("rolling")

MEANS = ("recall@100_mean", "funnel_hr@10_mean", "unrepresentable_mean", "update_cpu_s_mean")
SHARES = ("recall@100", "recall@10", "funnel_hr@10", "funnel_recall@100", "unrepresentable")


def test_days_are_parsed_as_training_then_the_days_taken_in() -> None:
    assert rolling.parse_days("21:22-27") == (21, (22, 23, 24, 25, 26, 27))
    assert rolling.parse_days("7:8") == (7, (8,))
    for bad in ("21", "21:23-27", "21:22-20", "x:1-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            rolling.parse_days(bad)


def test_rolling_benchmark_on_the_tiny_world(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "rolling.json"
    rolling.main(["--world", "tiny", "--days", "21:22-23", "--work", str(work), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["machine"]["cpus"] >= 1
    assert result["settings"]["arms"] == ["frozen", "incremental", "full"]

    start = result["start"]
    assert (start["day"], start["eval_day"]) == (21, 22)
    for name, arm in result["arms"].items():
        assert all(math.isfinite(arm[key]) for key in MEANS), name
        assert [(r["day"], r["eval_day"]) for r in arm["days"]] == [(22, 23), (23, 24)]
        for row in arm["days"]:
            assert all(0.0 <= row[key] <= 1.0 for key in SHARES), (name, row)
            assert row["update_cpu_s"] >= 0 and row["update_wall_s"] >= 0
            assert 0 < row["queries"] == row["active_users"] <= row["watches"]

    # the frozen model never changes: no update cost, the same vocabulary as at the start,
    # and never more of the next day's watches representable than an updated model's
    frozen, incremental, full = (result["arms"][a]["days"] for a in rolling.ARMS)
    assert all(r["update_cpu_s"] == 0 for r in frozen)
    assert {r["vocabulary_items"] for r in frozen} == {start["vocabulary_items"]}
    for f, i, u in zip(frozen, incremental, full, strict=True):
        assert i["vocabulary_items"] > start["vocabulary_items"]
        assert f["unrepresentable"] >= max(i["unrepresentable"], u["unrepresentable"])
        assert i["update_steps_wall_s"].keys() >= {"append", "features", "candidates", "ranker"}

    for goal in ("recall@100", "update_cpu"):
        assert math.isfinite(result["goals"][goal]["ratio"])
        assert isinstance(result["goals"][goal]["met"], bool)
    assert out.with_suffix(".png").stat().st_size > 0

    # the logs came in through the import (days 1-21) and one append per day taken in
    sim = preset_config("tiny")
    base = Dataset.open(work / "base" / "data").manifest
    assert base.time_range["max_ts"] < sim.window_start + 21 * rolling.DAY
    periods = Dataset.open(work / "arms" / "incremental" / "data").manifest.extra["periods"]
    assert len(periods) == 3
