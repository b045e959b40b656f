"""benchmarks/live_items.py on the tiny world at toy scale: a content model served by two
workers over a grown index of 2,000 vectors, 100 items added while 2 clients ask for
recommendations. Checks the results' structure, that every worker searched the grown
index and that the sampled added items became retrievable (never a timing)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.scripts import load_script

live_items = load_script("live_items")


def test_added_items_become_retrievable_and_the_results_have_their_shape(tmp_path: Path) -> None:
    out = tmp_path / "live_items.json"
    argv = [
        "--world",
        "tiny",
        "--work",
        str(tmp_path / "work"),
        "--items",
        "100",
        "--sample-every",
        "10",
        "--streams",
        "2",
        "--clients",
        "2",
        "--workers",
        "2",
        "--index-items",
        "2000",
        "--quiet-seconds",
        "2",
        "--chunk-seconds",
        "1",
        "--warmup-seconds",
        "1",
        "--probe-users",
        "30",
        "--tune-queries",
        "50",
        "--out",
        str(out),
    ]
    assert live_items.main(argv) == 0
    res = json.loads(out.read_text())
    for key in (
        "machine",
        "code",
        "artifact",
        "settings",
        "index",
        "server",
        "quiet",
        "adding",
        "retrievable",
        "goals",
        "load_average_at_start",
        "load_average_at_end",
    ):
        assert key in res, key
    assert res["index"]["vectors"] == 2000 and res["index"]["kind"] == "ivfpq_fs"
    assert res["server"]["workers_on_grown_index"] == 2
    for name in ("quiet", "adding"):
        assert res[name]["completed"] > 0 and res[name]["errors"] == 0
        assert set(res[name]["latency_ms"]) >= {"p50_ms", "p99_ms"}
    adder = res["adding"]["adder"]
    assert adder["added"] == 100 and adder["errors"] == 0
    assert adder["streams"] == 2 and isinstance(adder["answers_not_retrievable"], int)
    ret = res["retrievable"]
    assert ret["samples"] == 10 and ret["found"] == 10
    assert all(s["ack_to_retrievable_s"] is not None for s in ret["per_sample"])
    goals = res["goals"]
    assert goals["at_goal_scale"] is False and goals["errors"] == 0
    assert isinstance(goals["p99_ratio"], float) and isinstance(goals["p99_met"], bool)
    assert 0.0 <= goals["retrievable_within_1s_share"] <= 1.0
