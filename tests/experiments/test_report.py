"""`funnelrec report`: metrics JSON -> Markdown + self-contained HTML with PNG figures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from funnelrec.cli.report import app
from funnelrec.errors import FunnelrecError
from funnelrec.experiments.report import collect, find_metrics, render_figure, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _doc() -> dict[str, Any]:
    return {
        "format_version": 1,
        "kind": "funnelrec-experiment",
        "experiment": "labels",
        "title": "Labels: next vs random",
        "claim": "Next-watch labels win.",
        "protocol": "tiny world, 300 test watches",
        "tables": [
            {
                "title": "held-out next watch",
                "columns": ["labels", "map@100"],
                "rows": [["next", 0.1234], ["random | odd", 0.0567]],
                "note": "one seed",
            }
        ],
        "figures": [
            {
                "name": "curve",
                "kind": "line",
                "title": "a curve",
                "xlabel": "K",
                "ylabel": "recall",
                "logx": True,
                "series": [{"label": "a", "x": [1, 10, 100], "y": [0.1, 0.3, None]}],
            },
            {
                "name": "bars",
                "kind": "bar",
                "categories": ["x", "y"],
                "series": [{"label": "s", "y": [1.0, 2.0], "yerr": [0.1, 0.2]}],
                "hlines": [{"y": 1.5, "label": "ref"}],
            },
            {"name": "hist", "kind": "hist", "series": [{"label": "ms", "values": [1, 2, 2, 3]}]},
        ],
        "verdict": {"holds": "yes", "text": "next beats random by 118%"},
        "results": {},
    }


def _experiment_dir(root: Path) -> Path:
    d = root / "labels"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_doc()))
    (d / "run.json").write_text(
        json.dumps(
            {
                "command": "funnelrec experiment labels --preset tiny",
                "settings": {"preset": "tiny", "seeds": 2, "world_seed": 0},
                "data": {"fingerprint": "abc123def"},
                "environment": {"funnelrec": "0.1.0", "commit": "deadbee", "torch": "2.x"},
            }
        )
    )
    return d


def test_experiment_document_becomes_markdown_and_html(tmp_path: Path) -> None:
    _experiment_dir(tmp_path)
    rep = write_report(tmp_path)
    md = rep.markdown.read_text()
    assert "## Labels: next vs random" in md
    assert "**Verdict:** **yes**: next beats random by 118%" in md
    assert "**Protocol:** tiny world, 300 test watches" in md
    assert "| next | 0.1234 |" in md
    assert "random \\| odd" in md  # a pipe inside a cell does not break the table
    assert "funnelrec experiment labels --preset tiny" in md  # provenance: the command
    assert "abc123def" in md and "deadbee" in md
    # three figures, referenced from the Markdown and present as PNG files
    refs = re.findall(r"\]\((report_figures/[^)]+\.png)\)", md)
    assert len(refs) == 3
    for ref in refs:
        assert (tmp_path / ref).read_bytes().startswith(PNG)
    # the HTML page is self-contained: every figure embedded, nothing referenced on disk
    page = rep.html.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "report_figures/" not in page
    assert "next beats random by 118%" in page
    # atomic writes leave no temporary files behind
    assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_pipeline_run_gives_retrieval_and_ranking_sections(tmp_path: Path) -> None:
    ev = tmp_path / "evaluation"
    ev.mkdir()
    deciles = [
        {"count": 10, "mean_predicted": float(i), "mean_observed": float(i) + 0.5}
        for i in range(10)
    ]
    metrics = {
        "candidates": {
            "model": {"recall@10": 0.2, "recall@50": 0.4, "ndcg@10": 0.1, "mrr": 0.05},
            "popularity": {"recall@10": 0.1, "recall@50": 0.2, "ndcg@10": 0.05, "mrr": 0.02},
        },
        "candidates_protocol": {"split": "test", "examples": 500},
        "ranking": {
            "model": {
                "weighted_per_user_loss": 0.31,
                "auc": 0.7,
                "gauc": 0.65,
                "log_loss": 0.3,
                "weighted_log_loss": 1.2,
                "calibration": {"deciles": deciles},
                "impressions": 1000,
                "clicks": 50,
                "pages": 100,
                "pairs": 400,
            },
            "random": {"weighted_per_user_loss": 0.5},
            "protocol": {"split": "test", "tower": "512", "objective": "watch_time"},
        },
    }
    (ev / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "stamps").mkdir()
    (tmp_path / "stamps" / "ranker.json").write_text(json.dumps({"key": "k", "seconds": 12.3}))
    sections = collect(tmp_path)
    assert [s.title.split(" (")[0] for s in sections] == ["Candidate generation", "Ranking"]
    cand, rank = sections
    assert cand.tables[0]["columns"][:3] == ["scorer", "recall@10", "recall@50"]
    assert cand.figures[0]["series"][0]["y"] == [0.2, 0.4]  # recall@K curve of the model
    assert "500 held-out next watches" in (cand.protocol or "")
    assert rank.tables[0]["rows"][0][:3] == ["weighted per-user loss", "0.31", "0.5"]
    assert rank.figures[0]["name"].endswith("calibration")
    assert cand.provenance["stage_seconds"] == {"ranker": 12.3}
    rep = write_report(tmp_path)
    assert len(rep.figures) == 2
    assert "stage seconds" in rep.markdown.read_text()


def test_latency_samples_become_histograms_and_other_json_a_table(tmp_path: Path) -> None:
    (tmp_path / "serve_metrics.json").write_text(
        json.dumps({"qps": 120.5, "latency_ms": {"p": [1.0, 2.0, 2.5], "q": [3.0]}})
    )
    (sec,) = collect(tmp_path)
    assert sec.tables[0]["rows"][0] == ["qps", "120.5"]
    (fig,) = sec.figures
    assert fig["kind"] == "hist"
    assert [s["label"] for s in fig["series"]] == ["p", "q"]


def test_cache_directories_are_skipped(tmp_path: Path) -> None:
    _experiment_dir(tmp_path)
    hidden = tmp_path / "_shared" / "models" / "rank-1"
    hidden.mkdir(parents=True)
    (hidden / "metrics.json").write_text("{}")
    assert find_metrics(tmp_path) == [tmp_path / "labels" / "metrics.json"]


def test_bad_input_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FunnelrecError, match="no such directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(FunnelrecError, match="no metrics JSON found"):
        write_report(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FunnelrecError, match="not a directory"):
        write_report(tmp_path / "file.txt")
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(FunnelrecError, match=r"metrics\.json: not valid JSON"):
        write_report(bad)
    (bad / "metrics.json").write_text("[1, 2]")
    with pytest.raises(FunnelrecError, match="expected a JSON object"):
        write_report(bad)


def test_unknown_figure_kind_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FunnelrecError, match="unknown kind 'pie'"):
        render_figure({"name": "x", "kind": "pie"}, tmp_path / "x.png")


def test_cli(tmp_path: Path) -> None:
    _experiment_dir(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert "1 sections, 3 figures" in result.output
    missing = CliRunner().invoke(app, [str(tmp_path / "nope")])
    assert isinstance(missing.exception, FunnelrecError)
    assert "no such directory" in str(missing.exception)


def test_a_project_document_with_its_figures_beside_it(tmp_path: Path) -> None:
    _experiment_dir(tmp_path / "run")
    doc = tmp_path / "docs" / "results.md"
    rep = write_report(tmp_path / "run", doc=doc)
    assert rep.markdown == doc and rep.html is None
    md = doc.read_text()
    assert md.startswith("# Results: the paper's experiments on the simulated world")
    assert f"funnelrec report runs/experiments --doc {doc}" in md
    refs = re.findall(r"\]\((results/[^)]+\.png)\)", md)
    assert len(refs) == 3
    for ref in refs:
        assert (doc.parent / ref).read_bytes().startswith(PNG)
    result = CliRunner().invoke(app, [str(tmp_path / "run"), "--doc", str(doc)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "report.html").exists()


def test_a_preface_says_what_the_metrics_cannot(tmp_path: Path) -> None:
    _experiment_dir(tmp_path / "run")
    doc = tmp_path / "docs" / "results.md"
    preface = tmp_path / "how.md"
    preface.write_text("## How this run was made\n\nResumed twice from its cache.\n")
    result = CliRunner().invoke(
        app, [str(tmp_path / "run"), "--doc", str(doc), "--preface", str(preface)]
    )
    assert result.exit_code == 0, result.output
    md = doc.read_text()
    said = md.index("Resumed twice from its cache.")
    assert md.index(f"--doc {doc}") < said < md.index("\n## ", md.index("## How this run"))
    write_report(tmp_path / "run", tmp_path / "rep", preface="A note.")
    assert "A note." in (tmp_path / "rep" / "report.md").read_text()
    missing = CliRunner().invoke(
        app, [str(tmp_path / "run"), "--doc", str(doc), "--preface", str(tmp_path / "no.md")]
    )
    assert isinstance(missing.exception, FunnelrecError)
    assert "no.md" in str(missing.exception)


def test_the_generation_line_names_the_checkout_as_the_report_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document's own figures, written first, must not make its commit '+dirty'."""
    import funnelrec.experiments.report as report

    _experiment_dir(tmp_path / "run")
    doc = tmp_path / "docs" / "results.md"
    figures = doc.with_suffix("")
    monkeypatch.setattr(
        report, "git_commit", lambda: "abc1234+dirty" if figures.exists() else "abc1234"
    )
    write_report(tmp_path / "run", doc=doc)
    assert "(commit abc1234);" in doc.read_text()
