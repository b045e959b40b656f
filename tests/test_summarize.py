"""benchmarks/summarize.py: the benchmarks index and the README section from result JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script

README = """# proj

Intro.

<!-- performance:start -->
old text
<!-- performance:end -->

## Documentation

- docs.
"""


summarize = load_script("summarize")


def ann() -> dict[str, Any]:
    row = {"kind": "hnsw", "setting": "efSearch=400", "recall": 0.95097, "p50_ms": 2.6071}
    return {
        "items": 1_000_000,
        "dim": 128,
        "k": 100,
        "queries": 1000,
        "commit": "abc1234",
        "date": "2026-01-02T03:04:05+00:00",
        "machine": {"cpus": 2, "faiss": "1.15.1"},
        "build": {"hnsw": {"seconds": 2755.4, "rss_mib": 744.5, "params": {"hnsw_m": 32}}},
        "rows": [
            {"kind": "exact", "setting": "-", "recall": 1.0, "p50_ms": 52.06, "p99_ms": 59.67},
            {**row, "p99_ms": 4.1827},
        ],
        "best": {**row, "p99_ms": 4.1827, "goal": "p99 <= 1.0 ms at recall@k >= 0.95",
                 "goal_met": False},
    }  # fmt: skip


def real_data() -> dict[str, Any]:
    figs = {"hr@10": 0.25, "ndcg@10": 0.12, "hr@50": 0.5}
    return {
        "benchmark": "real_data",
        "machine": {"python": "3.11.7"},
        "datasets": {
            "ml-100k": {
                "stats": {"users": 943, "items": 1682, "interactions": 100000},
                "models": {
                    "als": {"name": "als", "fit_s": 2.6, "train": {"hr@10": 0.1336}},
                    "funnelrec": {"name": "funnelrec candidates", "fit_s": 20.0, "+val": figs},
                    "recent-popular": {"skipped": "no time window"},
                },
                "peers": {
                    "als": {"train hr@10": 0.1262, "+val hr@10": 0.1421},
                    "youtubednn tuned": {"train hr@10": 0.2, "+val ndcg@10": 0.0891},
                },
            },
            "beauty": {"skipped": "not found"},
        },
    }


def serving() -> dict[str, Any]:
    def pct(p50: float, p99: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99, "mean_ms": p50, "max_ms": p99}

    lat = {
        "requests": 300,
        "k": 10,
        "ranked_p50": 310.0,
        "stages_ms": {"ranking": pct(9.0, 15.0), "total": pct(20.0, 31.0),
                      "http_total": pct(21.5, 33.25)},
        "goal_p99_ms": 50.0,
        "goal_met": True,
        "server_cpu_ms_per_request": 19.0,
        "load_average_before": [1.5, 1.0, 1.0],
    }  # fmt: skip
    return {
        "index": {"kind": "hnsw", "count": 100000},
        "world": {"users": 200000, "items": 100000},
        "ranker_tower": "1024-512-256",
        "latency": lat,
        "load": {"concurrency": 8, "seconds": 60.0, "completed": 3000, "errors": 0,
                 "throughput_rps": 50.0, "latency_ms": pct(150.0, 260.0)},
    }  # fmt: skip


def ranking_table() -> dict[str, Any]:
    def row(loss: float, objective: str = "watch_time") -> dict[str, Any]:
        return {
            "tower": "t",
            "objective": objective,
            "power_features": True,
            "weighted_per_user_loss": loss,
            "auc": 0.7,
            "gauc": 0.6,
            "clickbait_top10_share": 0.1,
            "ratio_calibrated": 1.01,
            "train_wall_s": 30.0,
        }

    return {
        "benchmark": "ranking_table",
        "protocol": {"steps": 300, "batch_size": 1024},
        "rows": {"none": row(0.42), "1024-512-256": row(0.35), "ctr": row(0.39, "ctr")},
        "goals": {"deeper_is_better": True, "ctr_worse_loss": True,
                  "calibrated_within_10pct": {"none": True, "1024-512-256": False}},
    }  # fmt: skip


def setup(tmp_path: Path, results: dict[str, Any]) -> tuple[Path, list[str]]:
    """Results, scripts and a README with markers under tmp_path; the CLI arguments."""
    res, scripts = tmp_path / "bench" / "results", tmp_path / "bench"
    res.mkdir(parents=True)
    for name, data in results.items():
        text = data if isinstance(data, str) else json.dumps(data)
        (res / f"{name}.json").write_text(text)
    # the second command is continued with a backslash, as serving.py's docstring does
    (scripts / "ann.py").write_text(
        '"""ANN: recall and latency.\n\n'
        "    .venv/bin/python benchmarks/ann.py --items 10  # quick\n"
        "    .venv/bin/python benchmarks/ann.py --cache C \\\n        --wait-load 1.5\n"
        '\nMore."""\n'
    )
    (scripts / "ranking_table.py").write_text(
        '"""Table 1."""\n\nROWS: dict[str, float | None] = {"none": 41.6, "1024-512-256": 34.6}\n'
    )
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--results", str(res), "--out", str(scripts / "README.md"), "--readme", str(readme)]
    return tmp_path, [*args, "--scripts", str(scripts)]


def run(args: list[str], *extra: str) -> int:
    return int(summarize.main([*args, *extra]))


def test_ann_settings_renders_its_rows(tmp_path: Path) -> None:
    rows = [
        {"setting": "nlist=4096 nprobe=208 rerank=6", "recall": 0.95714, "p50_ms": 1.348,
         "p99_ms": 2.222, "mean_ms": 1.379},
        {"setting": "nlist=2048 nprobe=112 rerank=6", "recall": 0.9515, "p50_ms": 1.084,
         "p99_ms": 1.659, "mean_ms": 1.114},
    ]  # fmt: skip
    data = {"kind": "ivfpq_fs", "items": 1_000_000, "dim": 128, "k": 100, "queries": 1000,
            "latency_queries": 980, "rows": rows}  # fmt: skip
    root, args = setup(tmp_path, {"ann_settings": data})
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    assert "\n## ann_settings\n" in index
    assert "each of 980 queries sent to every setting in turn" in index
    assert "| nlist=4096 nprobe=208 rerank=6 | 0.957 | 1.35 | 2.22 | 1.38 |" in index
    assert "| nlist=2048 nprobe=112 rerank=6 | 0.952 | 1.08 | 1.66 | 1.11 |" in index
    readme = (root / "README.md").read_text()
    assert "nlist=2048 nprobe=112 rerank=6: 0.952 at p50 1.08 / p99 1.66 ms" in readme


def test_known_results_render_tables_and_headlines(tmp_path: Path) -> None:
    results = {"ann": ann(), "real_data": real_data(), "serving": serving(),
               "ranking_table": ranking_table()}  # fmt: skip
    root, args = setup(tmp_path, results)
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()

    # the index: one section per result, its command from the docstring, provenance
    for name in results:
        assert f"\n## {name}\n" in index
    assert ".venv/bin/python benchmarks/ann.py --items 10  # quick" in index
    assert ".venv/bin/python benchmarks/ann.py --cache C --wait-load 1.5" in index
    assert "date 2026-01-02; commit abc1234" in index  # from the JSON
    assert "commit uncommitted" in index  # no git repository here
    assert "| hnsw | efSearch=400 | 0.951 | 2.61 | 4.18 |" in index
    # real_data of the old shape (one run per model, no funnel, no SASRec) still renders
    row = "| funnelrec candidates | - | - | - | **0.2500** | 0.1200 | 0.5000 | 1 | 20.0 |  |"
    assert row in index
    assert (
        "| peer: als | 0.1262 | - | - | 0.1421 | - | - | - | - | published (PEERS in "
        "real_data.py) |"
    ) in index
    assert "skipped: no time window" in index
    assert "Skipped: not found" in index
    assert "| http_total | 21.5 / 33.2 |" in index
    assert "| 1024-512-256 | t | watch time | yes | 35.00% | 34.6% |" in index  # paper: ROWS

    # the README: only the part between the markers changes
    head, rest = readme.split(summarize.START)
    section, tail = rest.split(summarize.END)
    assert head == README.split(summarize.START)[0]
    assert tail == README.split(summarize.END)[1]
    assert "old text" not in section
    assert "do not\nedit this section by hand" in section
    # ML-100k of the old shape: no funnel, so funnelrec's deep model against the strongest
    # other model (either history column: a peer's train figure here), and no verdict
    assert (
        "funnel: not in this result; funnelrec's deep candidate model HR@10 0.2500 / NDCG@10 "
        "0.1200 (+val, 1 seed) vs the strongest other model in the table, own baselines "
        "included: youtubednn tuned 0.2000 (train, published): 1.25x; training 20.0 s (no "
        "SASRec in this run) | funnel beats every single source it mixes (funnelrec, "
        "cowatch-last5); HR@10 ≥ SASRec's in the same run; training ≤ 1/5 of SASRec's in the "
        "same run |"
    ) in section
    assert "(bench/README.md#real_data)" in section
    assert "recall@100 0.951 at p99 4.18 ms" in section
    assert "p99 ≤ 1.0 ms at recall@k ≥ 0.95 (not met)" in section
    assert "p50 21.5 ms, p99 33.2 ms" in section
    assert "50.0 req/s with 8 clients, p99 260 ms, 0 errors" in section
    assert "p99 ≤ 50.0 ms (met)" in section
    assert "none 42.00% (paper 41.6%); 1024-512-256 35.00% (paper 34.6%)" in section
    assert "(3 of 4 checks met)" in section
    assert not list((root / "bench").glob(".*.tmp")), "temporary files left behind"


def test_unknown_or_changed_structures_get_a_generic_section(tmp_path: Path) -> None:
    results = {
        "mystery": {"benchmark": "mystery", "date": "2026-02-03", "speed": 12.5, "nested": {}},
        "ann": {"items": 10, "rows": "not a list"},  # a known name in a shape it no longer has
        "broken": "{not json",
        "listy": [1, 2, 3],
        "mystery.partial": {"benchmark": "mystery", "speed": 1.0},  # a run's interim file
    }
    root, args = setup(tmp_path, results)
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    assert "partial" not in index and "partial" not in readme
    assert "## mystery" in index and "| speed | 12.5 |" in index
    assert "date 2026-02-03" in index and "Other fields: `nested`." in index
    assert "structure is not one `summarize.py` knows" in index
    assert "| items | 10 |" in index
    assert "Could not be read: JSONDecodeError" in index
    assert "A JSON list, not an object." in index
    assert "[mystery](bench/README.md#mystery)" in readme


def test_readme_without_markers_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup(tmp_path, {"ann": ann()})
    text = "# proj\n\n<!-- performance:end -->\n<!-- performance:start -->\n"
    (root / "README.md").write_text(text)
    assert run(args) == 2
    assert "<!-- performance:start -->" in capsys.readouterr().err
    assert (root / "README.md").read_text() == text
    (root / "README.md").write_text("# proj\n")
    assert run(args) == 2
    assert not (root / "bench" / "README.md").exists()


def test_check_detects_drift_and_writes_nothing(tmp_path: Path) -> None:
    root, args = setup(tmp_path, {"ann": ann()})
    assert run(args, "--check") == 1  # nothing generated yet
    assert not (root / "bench" / "README.md").exists()
    assert run(args) == 0
    assert run(args, "--check") == 0
    before = (root / "bench" / "README.md").read_text(), (root / "README.md").read_text()

    changed = ann()
    changed["rows"][1]["recall"] = 0.97
    (root / "bench" / "results" / "ann.json").write_text(json.dumps(changed))
    assert run(args, "--check") == 1
    assert ((root / "bench" / "README.md").read_text(), (root / "README.md").read_text()) == before
    assert run(args) == 0
    assert "0.970" in (root / "bench" / "README.md").read_text()
    assert run(args, "--check") == 0

    # a hand edit inside the section is drift too
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("## Performance", "## Speed"))
    assert run(args, "--check") == 1


def test_no_results_still_writes_both(tmp_path: Path) -> None:
    root, args = setup(tmp_path, {})
    assert run(args) == 0
    assert "No results yet." in (root / "bench" / "README.md").read_text()
    assert "No benchmark results yet." in (root / "README.md").read_text()


def test_quality_goal_says_which_example_age_meets_it() -> None:
    verdict = summarize._quality_met
    assert verdict(0.81, 0.9) == " (met)"
    assert "met with the target's time" in verdict(0.77, 0.85)
    assert "not with serving's age 0" in verdict(0.77, 0.85)
    assert verdict(0.7, 0.75) == " (not met)"
    assert verdict(0.7, None) == " (not met)"
    assert verdict(None, None) == ""


def test_scale_renders_stages_exponents_and_the_memory_bound(tmp_path: Path) -> None:
    def stage(wall: float, peak: float, tree: float | None = None) -> dict[str, Any]:
        return {"wall_s": wall, "cpu_s": wall, "peak_rss_gib": peak, "peak_tree_rss_gib": tree}

    stages = ("simulate", "features", "candidates", "index", "ranker")
    scale = {
        "benchmark": "scale",
        "memory_bound_gib": 16.0,
        "presets": {
            "small": {"counts": {"events": 1_000_000},
                      "stages": {s: stage(10.0, 0.5) for s in stages}},
            "large": {"counts": {"events": 100_000_000},
                      "stages": {"simulate": stage(1000.0, 1.5),
                                 "features": stage(1000.0, 5.0, 10.5)}},
        },
        "growth_exponent_wall_vs_events": {"simulate": 1.0},
        "growth_exponent_cpu_vs_events": {"simulate": 0.9},
    }  # fmt: skip
    root, args = setup(tmp_path, {"scale": scale})
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    assert "| large | 100M | 1,000 / 1,000 / 1.50 | 1,000 / 1,000 / 10.50 | - | - | - |" in index
    assert "| growth exponent (wall) |  | 1.00 | - | - | - | - |" in index
    assert "stages done: simulate, features (not yet: candidates, index, ranker)" in readme
    assert "peak memory 10.5 GiB" in readme and "every stage ≤ 16.0 GiB: so far" in readme


def test_throughput_goal_needs_both_the_whole_run_and_the_in_turns_figure(
    tmp_path: Path,
) -> None:
    def result(whole: float, turns: float) -> dict[str, Any]:
        run_ = {"threads": 1, "sparse": False, "step_ms_median": 140.0, "step_ms_best": 135.0,
                "step_cpu_ms_median": 140.0, "examples_per_s": 7300.0,
                "achieved_gflop_per_s": 63.0, "fraction_of_peak": whole,
                "fraction_of_peak_best": 0.52, "fraction_of_peak_cpu_time": whole,
                "fraction_of_peak_in_turns": turns}  # fmt: skip
        return {"setting": {"depth": 2}, "source": "synthetic", "runs": [run_],
                "matmul_peak_gflop_per_s": {"1": {"wall": {"2048": 126.0}}}}  # fmt: skip

    for whole, turns, verdict in ((0.498, 0.503, "not met"), (0.51, 0.53, "met")):
        root, args = setup(tmp_path / verdict, {"candidates_throughput": result(whole, turns)})
        assert run(args) == 0
        readme = (root / "README.md").read_text()
        assert f"; {100 * turns:.1f}% in turns)" in readme
        assert f"≥ 50% of peak, both ways ({verdict})" in readme
        index = (root / "bench" / "README.md").read_text()
        assert f"| {100 * turns:.1f}% |" in index


def seeded(
    name: str, fit_s: float, mean: dict[str, float], std: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """A model of real_data.py's new shape, run at seeds 0, 1, 2 ('+val' only)."""
    runs = {s: {"name": name, "fit_s": fit_s, "+val": mean} for s in ("0", "1", "2")}
    return {"name": name, "fit_s": fit_s, "+val": mean, "+val std": std,
            "+val min": mean, "+val max": mean, "seeds": runs, **extra}  # fmt: skip


def figs(hr10: float, ndcg10: float, hr50: float = 0.4) -> dict[str, float]:
    return {"hr@10": hr10, "ndcg@10": ndcg10, "hr@50": hr50}


def real_data_seeded() -> dict[str, Any]:
    """ML-100k: the funnel ahead of everything; Beauty: co-watch ahead of the funnel, SASRec
    stopped on time."""
    ml = {
        "funnel": seeded("funnelrec funnel", 60.0, figs(0.229, 0.119, 0.5),
                         figs(0.004, 0.002, 0.01), note="deep model x; sources y",
                         funnel={"valid_by_source": {"deep": 0.1}}),
        "funnelrec": seeded("funnelrec candidates", 20.0, figs(0.211, 0.107),
                            figs(0.003, 0.001, 0.004)),
        "cowatch-last5": {"name": "co-watch, last 5 watches", "fit_s": 1.0,
                          "train": figs(0.159, 0.086), "+val": figs(0.1909, 0.1019)},
        "sasrec": seeded("sasrec (full cross-entropy)", 763.0, figs(0.2238, 0.1139),
                         figs(0.005, 0.002, 0.006), note="best epoch 71 of 81",
                         stopped_on_time=False),
        "bpr": {"name": "bpr", "fit_s": 40.0, "train": figs(0.1357, 0.07),
                "earlier_run": "2026-11-22"},
    }  # fmt: skip
    beauty = {
        "funnel": seeded("funnelrec funnel", 90.0, figs(0.0552, 0.033, 0.1),
                         figs(0.0011, 0.0005, 0.002)),
        "funnelrec": seeded("funnelrec candidates", 40.0, figs(0.0342, 0.0189),
                            figs(0.0004, 0.0002, 0.0005)),
        "cowatch-last5": {"name": "co-watch, last 5 watches", "fit_s": 0.8,
                          "+val": figs(0.0600, 0.0321)},
        "sasrec": seeded("sasrec (full cross-entropy)", 300.0, figs(0.04, 0.02),
                         figs(0.002, 0.001, 0.003), note="best epoch 9 of 9, stopped on time",
                         stopped_on_time=True),
    }  # fmt: skip
    peers = {
        "ml-100k": {"youtubednn tuned": {"train hr@10": 0.1718, "+val hr@10": 0.1707}},
        "beauty": {"sasrec (published)": {"+val hr@10": 0.0533, "+val ndcg@10": 0.0327}},
    }
    stats = {"users": 943, "items": 1682, "interactions": 100000}
    return {
        "benchmark": "real_data",
        "train_seeds": [0, 1, 2],
        "datasets": {
            name: {"stats": stats, "models": models, "peers": peers[name]}
            for name, models in (("ml-100k", ml), ("beauty", beauty))
        },
    }


def test_real_data_seeded_headline_names_the_strongest_model_of_its_table(
    tmp_path: Path,
) -> None:
    root, args = setup(tmp_path, {"real_data": real_data_seeded()})
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    ml, beauty = (line for line in readme.splitlines() if "HR@10 / NDCG@10" in line)

    # the table: mean ± std and the seeds of seeded models; the strongest +val HR@10 in bold
    assert (
        "| funnelrec funnel | - | - | - | **0.2290 ± 0.0040** | 0.1190 ± 0.0020 | "
        "0.5000 ± 0.0100 | 3 | 60.0 | deep model x; sources y |"
    ) in index
    assert (
        "| co-watch, last 5 watches | 0.1590 | 0.0860 | 0.4000 | 0.1909 | 0.1019 | 0.4000 "
        "| 1 | 1.00 |  |"
    ) in index
    assert "| peer: youtubednn tuned | **0.1718** | - | - | 0.1707 | - | - | - | - |" in index
    assert "| **0.0600** | 0.0321 | 0.4000 | 1 | 0.8 |  |" in index  # Beauty's co-watch
    assert "| 3 | 300 | training cut by its time budget: did not converge; best epoch 9" in index
    assert "| peer: sasrec (published) | - | - | - | 0.0533 | 0.0327 | - |" in index
    assert "valid_by_source" not in index + readme
    assert "| 1 | 40.0 | from an earlier run (2026-11-22) |" in index  # kept by --merge

    # ML-100k: the funnel ahead of every model; the strongest other one is SASRec run here
    assert "funnel HR@10 0.2290 ± 0.0040 / NDCG@10 0.1190 ± 0.0020 (+val, 3 seeds)" in ml
    assert (
        "vs the strongest other model in the table, own baselines included: "
        "sasrec (full cross-entropy) 0.2238 ± 0.0050 (+val, run here, 3 seeds): 1.02x"
    ) in ml
    assert (
        "the best single source it mixes: funnelrec candidates 0.2110 ± 0.0030 "
        "(+val, run here, 3 seeds): 1.09x"
    ) in ml
    assert "SASRec in the same run" not in ml  # it is the strongest already
    assert "training 60.0 s vs SASRec's 763 s: 0.08x" in ml
    assert (
        "funnel beats every single source it mixes (funnelrec, cowatch-last5); HR@10 ≥ "
        "SASRec's in the same run; training ≤ 1/5 of SASRec's in the same run (met)"
    ) in ml

    # Beauty: the funnel's own co-watch baseline beats it, so the goal is not met, though the
    # funnel clears 0.055 and a fifth of SASRec's (time-cut) training
    assert (
        "funnel HR@10 0.0552 ± 0.0011 / NDCG@10 0.0330 ± 0.0005 (+val, 3 seeds) vs the "
        "strongest other model in the table, own baselines included: co-watch, last 5 "
        "watches 0.0600 (+val, run here, 1 seed): 0.92x"
    ) in beauty
    assert "0.92x; the best single source it mixes is that same model;" in beauty
    assert (
        "training 90.0 s vs SASRec's ≥ 300 s (training cut by its time budget: did not "
        "converge): ≤ 0.30x"
    ) in beauty
    assert "HR@10 ≥ 0.055; training ≤ 1/5 of SASRec's in the same run (not met)" in beauty


def headline(key: str, models: dict[str, Any], peers: dict[str, Any]) -> tuple[str, str, str]:
    label = summarize.DATASET_NAMES[key]
    return summarize._real_data_headline(key, label, {"models": models}, peers)


def test_real_data_goals_need_sasrec_in_the_same_run_and_count_published_peers() -> None:
    ml = real_data_seeded()["datasets"]["ml-100k"]["models"]
    # no SASRec in the run: no verdict on the goals that need it, none on the whole
    without = {k: m for k, m in ml.items() if k != "sasrec"}
    _, figure, goal = headline("ml-100k", without, {})
    assert "no SASRec in this run" in figure
    assert "training 60.0 s (no SASRec in this run)" in figure
    assert not goal.endswith(")")  # neither met nor not met
    # a published peer stronger than every model run here is the one named
    peers = {"sasrec (published)": {"+val hr@10": 0.25, "+val ndcg@10": 0.13}}
    _, figure, goal = headline("ml-100k", ml, peers)
    assert "own baselines included: sasrec (published) 0.2500 (+val, published): 0.92x" in figure
    # SASRec run here is then named beside it, for the goal that needs it; met (the peer is
    # not one of the goals), and SASRec stopped on time says so beside its figure
    stopped = {**ml, "sasrec": {**ml["sasrec"], "stopped_on_time": True}}
    _, figure, goal = headline("ml-100k", stopped, peers)
    assert (
        "SASRec in the same run: sasrec (full cross-entropy) 0.2238 ± 0.0050 (+val, run here, "
        "3 seeds; training cut by its time budget: did not converge): 1.02x"
    ) in figure
    assert "vs SASRec's ≥ 763 s" in figure and goal.endswith("(met)")
    # SASRec ahead of the funnel on ML-100k: not met
    ahead = {**ml, "sasrec": {**ml["sasrec"], "+val": figs(0.24, 0.12)}}
    _, figure, goal = headline("ml-100k", ahead, {})
    assert "sasrec (full cross-entropy) 0.2400 ± 0.0050 (+val, run here, 3 seeds): 0.95x" in figure
    assert goal.endswith("(not met)")
    # Beauty below 0.055 though ahead of everything: not met
    beauty = real_data_seeded()["datasets"]["beauty"]["models"]
    low = {**beauty, "cowatch-last5": {**beauty["cowatch-last5"], "+val": figs(0.05, 0.03)}}
    low["funnel"] = {**low["funnel"], "+val": figs(0.054, 0.03)}
    _, figure, goal = headline("beauty", low, {})
    assert "0.0540 ± 0.0011" in figure and "1.08x" in figure and goal.endswith("(not met)")


def test_real_data_without_the_funnel_falls_back_to_the_deep_model() -> None:
    ml = real_data_seeded()["datasets"]["ml-100k"]["models"]
    rest = {k: m for k, m in ml.items() if k != "funnel"}
    rest["funnel"] = {"skipped": "no pages"}
    _, figure, goal = headline("ml-100k", rest, {})
    assert figure.startswith(
        "funnel: not in this result; funnelrec's deep candidate model HR@10 0.2110 ± 0.0030 / "
        "NDCG@10 0.1070 ± 0.0010 (+val, 3 seeds) vs the strongest other model in the table, "
        "own baselines included: sasrec (full cross-entropy) 0.2238 ± 0.0050"
    )
    assert "training 20.0 s vs SASRec's 763 s: 0.03x" in figure
    assert goal.startswith("funnel beats every single source") and not goal.endswith(")")
    only = {"bpr": ml["bpr"]}
    _, figure, _ = headline("ml-100k", only, {})
    assert figure == (
        "the funnel and funnelrec's deep candidate model: not in this result; the strongest "
        "model in the table: bpr 0.1357 (train, run here, 1 seed)"
    )


def test_real_data_time_goal_counts_cpu_seconds_where_recorded() -> None:
    ml = real_data_seeded()["datasets"]["ml-100k"]["models"]
    ml["funnel"]["fit_cpu_s"], ml["sasrec"]["fit_cpu_s"] = 110.0, 1400.0
    _, figure, goal = headline("ml-100k", ml, {})
    assert "training 60.0 s vs SASRec's 763 s: 0.08x; CPU 110 s vs 1,400 s: 0.08x" in figure
    assert goal.endswith("(met)")
    # a fifth of SASRec's wall time but not of its CPU time: not met
    ml["funnel"]["fit_cpu_s"] = 400.0
    _, figure, goal = headline("ml-100k", ml, {})
    assert "CPU 400 s vs 1,400 s: 0.29x" in figure
    assert goal.endswith("(not met)")


def test_serving_workers_table_and_verdict(tmp_path: Path) -> None:
    def row(workers: int, clients: int, rps: float, p99: float) -> dict[str, Any]:
        return {"workers": workers, "concurrency": clients, "throughput_rps": rps,
                "latency_ms": {"p50_ms": p99 / 2, "p99_ms": p99}, "errors": 0,
                "server_cpu_ms_per_request": 9.0, "server_cores_busy": 1.0,
                "other_cores_busy": 0.0, "load_average_before": [1.0, 1.0, 1.0]}  # fmt: skip

    results = serving()
    results["workers"] = {
        "workers": [1, 2], "clients": [8], "seconds_per_run": 20,
        "runs": [row(1, 8, 100.0, 100.0), row(2, 8, 260.0, 40.0)],
        "gain": {"8": 2.6}, "goal": {"clients": 8, "throughput_rps": 250.0, "p99_ms": 50.0,
                                     "met": True},
    }  # fmt: skip
    root, args = setup(tmp_path, {"serving": results})
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    assert "| 8 | 2 | 260 | 20.0 | 40.0 | 0 |" in index
    assert "More workers over one: 2.60x at 8 clients." in index
    assert (
        "clients with p99 <= 50.0 ms and 0 errors: met (260 req/s, p99 40.0 ms, 0 errors)." in index
    )


def rolling() -> dict[str, Any]:
    def arm(recall: float, fresh: float, cold: float, cpu: float) -> dict[str, Any]:
        return {"days": [{"day": 22}, {"day": 23}], "recall@100_mean": recall,
                "fresh_recall@100_mean": fresh, "cold_recall@100_mean": cold,
                "funnel_hr@10_mean": 0.2, "update_cpu_s_mean": cpu}  # fmt: skip

    fresh = {"ratio": 1.5, "values": [0.6, 0.4], "goal": ">= 2.0", "what": "f", "met": False,
             "truth": {"values": [0.7, 0.8], "ratios": [1.75, 2.0]}}  # fmt: skip
    return {
        "benchmark": "rolling",
        "settings": {"seed": 0},
        "arms": {"incremental": arm(0.3, 0.4, 0.0, 16.0), "full": arm(0.25, 0.3, 0.0, 190.0),
                 "incremental_content": arm(0.33, 0.6, 0.04, 23.0)},
        "truth": {"recall@100_mean": 0.42, "fresh_recall@100_mean": 0.7,
                  "fresh_only_fresh_recall@100_mean": 0.8},
        "goals": {
            "recall@100": {"ratio": 1.2, "goal": ">= 0.97", "what": "r", "met": True},
            "update_cpu": {"ratio": 0.084, "goal": "<= 0.1", "what": "c", "met": True},
            "incremental_content:fresh_recall@100": fresh,
            "incremental_content:cold_recall@100": {"value": 0.04, "goal": "> 0", "met": True},
            "incremental_content:recall@100": {"ratio": 1.1, "goal": ">= 0.99", "met": True},
            "full_content:fresh_recall@100": {"ratio": 2.2, "values": [0.66, 0.3],
                                              "goal": ">= 2.0", "met": True},
            "full_content:cold_recall@100": {"value": 0.05, "goal": "> 0", "met": True},
            "full_content:recall@100": {"ratio": 1.3, "goal": ">= 0.99", "met": True},
            "frozen_decay": {"what": "not a goal", "recall@100": [0.2, 0.1]},
        },
    }  # fmt: skip


def live_items() -> dict[str, Any]:
    def phase(p99: float) -> dict[str, Any]:
        return {"seconds": 90.0, "completed": 900, "errors": 0, "throughput_rps": 10.0,
                "server_cores_busy": 1.5,
                "latency_ms": {"p50_ms": 20.0, "p99_ms": p99, "max_ms": 90.0}}  # fmt: skip

    return {
        "benchmark": "live_items",
        "settings": {"items": 10000, "workers": 2, "clients": 8, "k": 10, "adding": "4 streams"},
        "index": {"vectors": 1_000_000, "kind": "ivfpq_fs"},
        "quiet": phase(40.0),
        "adding": phase(70.0),
        "retrievable": {"samples": 100, "found": 100, "p50_s": 0.09, "p99_s": 0.2, "max_s": 0.25},
        "goals": {"at_goal_scale": True, "p99_ratio": 1.75, "p99_ratio_goal": 1.5,
                  "p99_met": False, "errors": 0, "errors_met": True,
                  "retrievable_within_1s_share": 1.0, "retrievable_goal_s": 1.0,
                  "retrievable_met": True},
    }  # fmt: skip


def cold_items() -> dict[str, Any]:
    def figs(hr: float) -> dict[str, float]:
        return {"hr@50": hr, "recall@50": hr / 2}

    def arm(cold: float) -> dict[str, Any]:
        return {"all": figs(0.85), "all std": figs(0.01), "cold": figs(cold),
                "cold std": figs(0.04), "cold_with_history": figs(cold)}  # fmt: skip

    return {
        "benchmark": "cold_items",
        "settings": {"seeds": [0, 1, 2], "data": "/x/ml-100k"},
        "arms": {"content": arm(0.44), "id-only": arm(0.0)},
        "references": {"newest_first": {"all": figs(0.55), "cold": figs(0.8),
                                        "cold_with_history": figs(0.7)}},
        "split": {"cold_items": 45, "catalogue_items": 1682,
                  "queries": {"cold": 47, "cold_with_history": 31, "all": 166},
                  "chance": {"cold": figs(0.09)}},
    }  # fmt: skip


def test_the_freshness_benchmarks_headline_their_goals_beside_the_strongest(
    tmp_path: Path,
) -> None:
    results = {"rolling": rolling(), "live_items": live_items(), "cold_items": cold_items()}
    root, args = setup(tmp_path, results)
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    assert "structure is not one" not in index
    # rolling: the best arm in bold, the truth below, every goal listed, not the decay
    row = "| incremental_content | **0.3300** | **0.6000** | **0.0400** | **0.2000** | 23.0 |"
    assert row in index  # the funnel figure ties, so every arm has it in bold
    assert "| the truth's ranking, fresh items only | - | 0.8000 | - | - | - |" in index
    assert "| incremental_content:fresh_recall@100 | f | 1.50 | >= 2.0 | no |" in index
    assert "frozen_decay" not in index
    assert (
        "recall@100 0.3000 vs 0.2500: 1.20x at 0.084x its update CPU; the strongest arm, "
        "incremental_content, 0.3300; the truth's own ranking 0.4200 | recall ≥ 0.97x (met), "
        "CPU ≤ 0.1x (met) |"
    ) in readme
    assert (
        "fresh recall@100 0.6000 vs incremental (id-only) 0.4000: 1.50x; the truth's own "
        "ranking 0.7000 (1.75x), with all 100 places on fresh items 0.8000 (2.00x); cold 0.0400 "
        "(id-only 0); recall@100 1.10x | fresh ≥ 2x (not met), cold > 0 (met), recall ≥ 0.99x "
        "(met) |"
    ) in readme
    # a pairing whose id-only arm is not the strongest one names the strongest beside it
    assert (
        "fresh recall@100 0.6600 vs full (id-only) 0.3000: 2.20x; the strongest id-only arm, "
        "incremental, 0.4000 (1.65x); cold 0.0500 (id-only 0); recall@100 1.30x | fresh ≥ 2x "
        "(met)"
    ) in readme
    # live items: both phases, and the goal not met when one of its parts is not
    assert "| adding | 90.0 | 900 | 0 | 10.0 | 20.0 | 70.0 | 90.0 | 1.50 |" in index
    assert (
        "p99 70.0 ms vs quiet 40.0 ms: 1.75x; 0 errors; retrievable within 1 s: 100% of 100 "
        "sampled (max 0.25 s) | p99 ≤ 1.5x quiet, no errors, retrievable within 1 s (not met) |"
    ) in readme
    # cold items: spread over seeds, the references, the strongest beside the headline
    assert "| content | 0.4400 ± 0.0400 | 0.2200 ± 0.0200 | 0.4400 |" in index
    assert "| reference: chance | 0.0900 | 0.0450 | - | - | - |" in index
    assert (
        "[MovieLens-100k: items first rated after the cut (cold)](bench/README.md#cold_items) | "
        "content tower HR@50 0.4400 ± 0.0400 (3 seeds) vs id-only 0.0000 (by construction); the "
        "strongest other in the table: the reference newest first 0.8000 | above 0 (met) |"
    ) in readme


def test_import_and_engines_headlines(tmp_path: Path) -> None:
    def run_(engine: str, workers: int, wall: float) -> dict[str, Any]:
        return {"engine": engine, "workers": workers, "start_s": 1.0, "build_wall_s": wall,
                "driver_cpu_s": 20.0, "load_average_before": [1.0],
                "same_as_reference": True}  # fmt: skip

    def imported(rows: int, s: float) -> dict[str, Any]:
        return {"seconds": s, "cpu_s": s, "peak_rss_mib": 600.0, "csv_mib": 270.0,
                "dataset_mib": 85.0, "row_counts": {"watches": rows}}  # fmt: skip

    engines = {
        "benchmark": "engines", "build": "features build", "world": {"events": 46_700_000},
        "runs": [run_("local", 2, 100.0), run_("dask", 1, 200.0), run_("dask", 2, 125.0)],
        "install": {"dask": {"packages": ["dask", "distributed"], "installed_mib": 16.4}},
    }  # fmt: skip
    imports = {
        "rows": 10_000_000, "rows_per_s": 1_250_000.0, "rows_per_cpu_s": 1_000_000.0,
        "peak_rss_mib": 600.0, "goal_rows_per_s": 1_000_000, "goal_met": True,
        "day_rows": 100_000, "append_large_s": 0.5, "append_small_s": 0.2, "append_ratio": 2.5,
        "dataset_ratio": 10.0, "imports": {"large": imported(10_000_000, 8.0)},
        "appends": {"large": [{}, {}, {}]},
    }  # fmt: skip
    root, args = setup(tmp_path, {"engines": engines, "import_events": imports})
    assert run(args) == 0
    index = (root / "bench" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    assert "structure is not one" not in index
    assert "| dask | 1 | 1.00 | 200 | 20.0 | yes | 1.00 |" in index
    assert "| large | 10,000,000 | 8.00 | 8.00 | 600 | 270 | 85.0 |" in index
    assert (
        "build wall: local 100 s; dask 125 s (1.25x local); every output the same as the local "
        "build's | - |"
    ) in readme
    assert (
        "1.25M rows/s (1.00M per CPU s), peak RSS 600 MiB; a day's append 2.50x the time on a "
        "10.0x larger dataset | ≥ 1M rows/s (met) |"
    ) in readme
