"""benchmarks/rolling.py end to end on the tiny world: days 1-21 imported and trained, days
22 and 23 taken in by every arm (id-only and content tower) through the import path, the
results' structure and ranges checked (never the timings' values), and a second run merged
into the first."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.serving.recommender import Recommender
from funnelrec.simulate import preset_config
from tests.scripts import load_script

rolling = load_script("rolling")

MEANS = (
    "recall@100_mean", "funnel_hr@10_mean", "unrepresentable_mean", "update_cpu_s_mean",
    "fresh_recall@100_mean",
)  # fmt: skip
SHARES = ("recall@100", "recall@10", "funnel_hr@10", "funnel_recall@100", "unrepresentable")
# what a day's row holds that does not depend on how long anything took
TIMINGS = ("score_s", "update_wall_s", "update_cpu_s", "update_steps_wall_s", "load_1m")


def figures(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """One run of the default arms: (work directory, result path, result)."""
    tmp = tmp_path_factory.mktemp("rolling")
    work, out = tmp / "work", tmp / "rolling.json"
    rolling.main(["--world", "tiny", "--days", "21:22-23", "--work", str(work), "--out", str(out)])
    return work, out, json.loads(out.read_text())


def test_days_are_parsed_as_training_then_the_days_taken_in() -> None:
    assert rolling.parse_days("21:22-27") == (21, (22, 23, 24, 25, 26, 27))
    assert rolling.parse_days("7:8") == (7, (8,))
    for bad in ("21", "21:23-27", "21:22-20", "x:1-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            rolling.parse_days(bad)


def test_rolling_benchmark_on_the_tiny_world(tiny: tuple[Path, Path, dict[str, Any]]) -> None:
    work, out, result = tiny
    assert result["complete"] is True
    assert result["machine"]["cpus"] >= 1
    assert result["settings"]["arms"] == list(rolling.DEFAULT_ARMS)
    assert list(result["arms"]) == list(rolling.DEFAULT_ARMS)

    start = result["start"]
    assert (start["day"], start["eval_day"]) == (21, 22)
    for name, arm in result["arms"].items():
        assert all(math.isfinite(arm[key]) for key in MEANS), name
        assert arm["run"]["date"] == result["date"]
        assert [(r["day"], r["eval_day"]) for r in arm["days"]] == [(22, 23), (23, 24)]
        for row in arm["days"]:
            assert all(0.0 <= row[key] <= 1.0 for key in SHARES), (name, row)
            assert row["update_cpu_s"] >= 0 and row["update_wall_s"] >= 0
            assert 0 < row["queries"] == row["active_users"] <= row["watches"]

    # the frozen model never changes: no update cost, the same vocabulary as at the start,
    # and never more of the next day's watches representable than an updated model's
    frozen, incremental, full = (result["arms"][a]["days"] for a in rolling.ID_ARMS)
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


def test_fresh_and_cold_recall_of_every_arm(tiny: tuple[Path, Path, dict[str, Any]]) -> None:
    _, _, result = tiny
    arms = result["arms"]
    # the same queries and targets for every arm, so the same fresh targets
    for key in ("queries", "targets", "fresh_targets", "fresh_queries"):
        assert len({tuple(r[key] for r in arm["days"]) for arm in arms.values()}) == 1, key
    assert all(r["fresh_targets"] > 0 for r in arms["incremental"]["days"])
    for name in rolling.ID_ARMS:  # no id embedding, no rank: zero by construction
        for r in arms[name]["days"]:
            assert r["cold_targets"] > 0
            assert (r["cold_recall@100"], r["cold_representable"]) == (0.0, 0)
            assert r["content_only_items"] == 0
    # the content tower exports the catalogue outside its vocabulary and ranks those items
    content = arms["incremental_content"]["days"]
    assert all(r["content_only_items"] > 0 and r["cold_representable"] > 0 for r in content)
    assert max(r["cold_recall@100"] for r in content) > 0
    for r, i in zip(content, arms["incremental"]["days"], strict=True):
        assert r["vocabulary_items"] == i["vocabulary_items"]  # the same features
        assert r["unrepresentable"] < i["unrepresentable"]
    assert result["start_content"]["content_only_items"] > 0

    goals = result["goals"]
    for what in ("fresh_recall@100", "cold_recall@100", "recall@100"):
        assert isinstance(goals[f"incremental_content:{what}"]["met"], bool), what
    assert not any(name.startswith("frozen_content") for name in goals)
    cold = goals["incremental_content:cold_recall@100"]
    assert cold["value"] == arms["incremental_content"]["cold_recall@100_mean"] > 0
    assert cold["met"] is True
    ratio = goals["incremental_content:recall@100"]["ratio"]
    assert ratio == pytest.approx(
        arms["incremental_content"]["recall@100_mean"] / arms["incremental"]["recall@100_mean"]
    )


def test_the_truths_ranking_is_scored_beside_the_arms(
    tiny: tuple[Path, Path, dict[str, Any]],
) -> None:
    """The simulator's own ranking of the same queries: its ids matched to the
    reference dataset's (a wrong match would score near zero), above every arm, and with
    every place given to fresh items at least the fresh targets it reaches otherwise (its
    fresh items keep their order, so its top 100 among them holds those of its top 100)."""
    _, _, result = tiny
    truth, arms = result["truth"], result["arms"]
    assert [r["day"] for r in truth["days"]] == [23, 24]
    for i, row in enumerate(truth["days"]):
        mine = arms["incremental"]["days"][i]
        assert row["day"] == mine["eval_day"] and row["queries"] == mine["queries"]
        assert 0 <= row["fresh_recall@100"] <= row["fresh_only_fresh_recall@100"] <= 1
        assert 0 < row["fresh_share_of_top"] < 1
        assert row["recall@100"] > max(arm["days"][i]["recall@100"] for arm in arms.values())
    fresh = result["goals"]["incremental_content:fresh_recall@100"]["truth"]
    assert fresh["values"] == [
        truth["fresh_recall@100_mean"],
        truth["fresh_only_fresh_recall@100_mean"],
    ]
    base = arms["incremental"]["fresh_recall@100_mean"]
    assert fresh["ratios"] == [pytest.approx(v / base) for v in fresh["values"]]


def test_age_shares_and_figure(tiny: tuple[Path, Path, dict[str, Any]]) -> None:
    _, out, result = tiny
    ages = result["age_shares"]
    assert ages["k"] == rolling.AGE_K and ages["bins_days"] == list(rolling.AGE_LABELS)
    assert set(ages["series"]) == {"data", *rolling.DEFAULT_ARMS}
    for name, series in ages["series"].items():
        assert len(series["counts"]) == len(rolling.AGE_LABELS)
        assert sum(series["shares"]) == pytest.approx(1.0), name
    data = ages["series"]["data"]
    assert sum(data["counts"]) == sum(r["targets"] for r in result["arms"]["frozen"]["days"])
    for name in rolling.DEFAULT_ARMS:
        counts = ages["series"][name]["counts"]
        # no model knows at the start of a day what is uploaded during it
        assert counts[0] == 0, name
        days = result["arms"][name]["days"]
        assert sum(counts) == sum(r["queries"] for r in days) * rolling.AGE_K
    # the frozen model knows nothing uploaded after its training window
    assert ages["series"]["frozen"]["counts"][1] == 0
    assert rolling.age_figure_path(out.with_suffix(".png")).stat().st_size > 0


def test_the_corpus_of_a_content_model_holds_the_catalogue_outside_its_vocabulary(
    tiny: tuple[Path, Path, dict[str, Any]],
) -> None:
    work, _, _ = tiny
    ids_only = rolling.Corpus.of(Recommender.load(work / "base" / "artifact"))
    rec = Recommender.load(work / "base-content" / "artifact")
    content = rolling.Corpus.of(rec)
    vocab = rec.features.vocab("item")
    assert ids_only.vocab_items == content.vocab_items == len(vocab) - 1
    assert len(ids_only.cold) == 0 and ids_only.num_columns == len(vocab)
    assert len(content.cold) > 0
    assert content.num_columns == len(vocab) + len(content.cold)
    columns = content.lookup(content.item_ids[1:])
    assert np.array_equal(columns, np.arange(1, content.num_columns))
    outside = content.item_ids[content.vocab_items + 1 :]
    assert (vocab.lookup(outside) == 0).all()
    assert (ids_only.lookup(outside) == 0).all()
    assert (content.lookup(np.array([-1, 0, 10**9])) == 0).all()


def test_a_merged_run_keeps_the_other_arms_and_reproduces_its_own(
    tiny: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    work, first, result = tiny
    out = tmp_path / "merged.json"
    rolling.main(
        ["--world", "tiny", "--days", "21:22-23", "--work", str(work), "--arms",
         "frozen,incremental", "--merge-into", str(first), "--out", str(out)]
    )  # fmt: skip
    merged = json.loads(out.read_text())
    assert merged["complete"] is True and merged["settings"]["arms"] == ["frozen", "incremental"]
    assert list(merged["arms"]) == list(rolling.DEFAULT_ARMS)
    kept = ("full", "frozen_content", "incremental_content")
    assert merged["merged"]["kept_arms"] == list(kept)
    for name in kept:  # untouched, with the date of the run that measured them
        assert merged["arms"][name] == result["arms"][name]
        assert merged["age_shares"]["series"][name] == result["age_shares"]["series"][name]
    assert merged["merged"]["previous"][0]["date"] == result["date"]
    # an id-only arm run without the content arms gives the same figures
    for name in ("frozen", "incremental"):
        assert merged["arms"][name]["run"]["date"] == merged["date"]
        for a, b in zip(merged["arms"][name]["days"], result["arms"][name]["days"], strict=True):
            assert figures(a) == figures(b), name
    assert merged["goals"].keys() == result["goals"].keys()


def test_a_merge_into_a_result_of_other_settings_is_refused(
    tiny: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    work, first, _ = tiny
    args = ["--world", "tiny", "--work", str(work), "--arms", "frozen", "--merge-into"]
    with pytest.raises(SystemExit, match="days"):
        rolling.main([*args, str(first), "--days", "21:22", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        rolling.main([*args, str(tmp_path / "missing.json"), "--days", "21:22-23"])
    assert not (tmp_path / "x.json").exists()
