"""`funnelrec train ranker`, `funnelrec evaluate ranker` and `funnelrec features
impressions`: the ranking stage's commands (the work is in `funnelrec.ranking`).

    funnelrec train ranker --features FEAT --out ART [--config configs/ranker-scale.toml]
                           [--resume] [--force] [model.tower=1024-512-256 train.epochs=3 ...]
    funnelrec evaluate ranker ART --features FEAT [--split test] [--out ART/metrics.json]
    funnelrec features impressions --data DATA --features FEAT --candidates CAND --out DATA2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.data.dataset import Dataset
from funnelrec.ranking.model import tower_name
from funnelrec.ranking.pages import impressions_from_candidates
from funnelrec.ranking.training import evaluate_ranker, load_ranker_train_config, train_ranker
from funnelrec.training import distributed

console = Console()


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def print_metrics(result: Mapping[str, Any]) -> None:
    """A Rich table of what `evaluate_ranker` returned."""
    m, pr = result["model"], result["protocol"]
    table = Table(title=f"ranker {pr['tower']} ({pr['objective']}) on {pr['split']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("random", justify="right")
    table.add_column("oracle", justify="right")
    oracle = result.get("oracle", {})
    table.add_row(
        "weighted per-user loss",
        _fmt(m["weighted_per_user_loss"], pct=True),
        _fmt(result["random"]["weighted_per_user_loss"], pct=True),
        _fmt(oracle.get("weighted_per_user_loss"), pct=True),
    )
    table.add_row("AUC", _fmt(m["auc"]), "0.5", _fmt(oracle.get("auc")))
    table.add_row("GAUC (per user)", _fmt(m["gauc"]), "", "")
    table.add_row("log loss (clicks)", _fmt(m["log_loss"]), "", "")
    table.add_row("weighted log loss", _fmt(m["weighted_log_loss"]), "", "")
    cal, raw = m["calibration"], m["calibration_raw"]
    table.add_row(
        "mean predicted / observed s",
        f"{cal['mean_predicted']:.1f} / {cal['mean_observed']:.1f} (x{cal['ratio']:.3f})",
        "",
        "",
    )
    table.add_row(
        "  uncalibrated exp(logit)",
        f"{raw['mean_predicted']:.1f} / {raw['mean_observed']:.1f} (x{raw['ratio']:.3f})",
        "",
        "",
    )
    cb = result.get("clickbait")
    if cb is not None:
        table.add_row(
            f"high-clickbait share, top {cb['top_k']}",
            _fmt(cb["model_top_k_share"], pct=True),
            _fmt(cb["shown_share"], pct=True),
            _fmt(cb["oracle_top_k_share"], pct=True),
        )
    table.caption = (
        f"{m['impressions']:,} impressions, {m['clicks']:,} clicks, {m['pages']:,} pages, "
        f"{m['pairs']:,} pairs; random column for clickbait = share among all shown"
    )
    console.print(table)
    fit = pr.get("calibration_fit", {})
    how = (
        f"fitted on {fit['impressions']:,} {fit['fitted_on']} impressions"
        if fit.get("fitted_on")
        else fit.get("note", "")
    )
    deciles = Table(
        title=f"calibration by decile of predicted watch time (c = {cal['factor']:.4f}, {how})"
    )
    for col in ("decile", "impressions", "mean predicted s", "mean observed s", "ratio", "raw"):
        deciles.add_column(col, justify="right")
    for i, (row, r) in enumerate(zip(cal["deciles"], raw["deciles"], strict=True), 1):
        deciles.add_row(
            str(i),
            f"{row['count']:,}",
            f"{row['mean_predicted']:.1f}",
            f"{row['mean_observed']:.1f}",
            _fmt(row["ratio"]),
            _fmt(r["ratio"]),
        )
    console.print(deciles)


# --------------------------------------------------------------------------- Typer commands


def train_command(
    features: str = typer.Option(
        ..., "--features", "-f", help="Features directory: a path or a URI (s3://, gs://, ...)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.checkpoint.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda (the same as the override train.device=...)."
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Train data-parallel in N processes on this machine (runs torchrun); "
        "train.batch_size stays the batch of one step over all of them.",
    ),
    warm_start: Path | None = typer.Option(
        None,
        "--warm-start",
        help="Start from this ranker artifact (features built with --update-from its "
        "features): its weights, tables grown for the new ids.",
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides, e.g. model.tower=512,256 train.epochs=3"
    ),
) -> None:
    """Train the ranking network (watch-time weighted logistic regression) on FEAT."""
    overrides = [*(overrides or []), *([f"train.device={device}"] if device else [])]
    cfg = load_ranker_train_config(config, overrides)  # a bad config fails here, once
    summary = distributed.train_here_or_launch(
        "ranker",
        lambda dist: train_ranker(
            features, out, cfg, resume=resume, force=force, dist=dist, warm_start=warm_start
        ),
        device=cfg.train.device,
        features=features,
        out=out,
        config=config,
        overrides=overrides,
        nproc=nproc,
        resume=resume,
        force=force,
        warm_start=warm_start,
    )
    if summary is None:
        return
    valid = summary["valid"]
    console.print(
        f"ranker {tower_name(cfg.model.tower)} ({cfg.model.objective}) -> {out}: "
        f"{summary['steps']:,} steps, {summary['epochs']} epoch(s)"
        + (
            f" (stopped early; the best, kept: step {summary['best_step']:,})"
            if summary["stopped_early"]
            else ""
        )
        + (f" on {summary['processes']} processes" if summary["processes"] > 1 else "")
        + f", {summary['examples_per_s']:,.0f} ex/s"
        + (
            f", valid {summary['validation_metric'].replace('_', ' ')} {valid:.4f}"
            if valid is not None
            else ""
        )
    )


def evaluate_command(
    art: Path = typer.Argument(..., help="Ranker artifact directory."),
    features: Path = typer.Option(..., "--features", "-f", help="Features directory."),
    split: str = typer.Option("test", "--split", help="train, valid or test."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Default: ART/metrics.json."),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset of FEAT (default: the path FEAT recorded); truth if any."
    ),
    top_k: int = typer.Option(10, "--top-k", help="K of the clickbait top-K share."),
    limit: int | None = typer.Option(
        None, "--limit", help="Score only ~N impressions: all pages of the split's first users."
    ),
) -> None:
    """Weighted per-user loss, AUC, GAUC, log loss and calibration of a ranker."""
    result = evaluate_ranker(
        art, features, split=split, out=out, data=data, top_k=top_k, limit=limit
    )
    print_metrics(result)
    console.print(f"wrote {out or Path(art) / 'metrics.json'}")


def impressions_command(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset without impressions."),
    features: Path = typer.Option(..., "--features", "-f", help="Its features (built from DATA)."),
    candidates: Path = typer.Option(..., "--candidates", help="Candidate-model artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="New dataset: DATA + impressions."),
    k: int = typer.Option(20, "-k", help="Impressions per page (retrieved top k)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset."),
) -> None:
    """Synthesise impressions from the candidate model's retrievals (data without any)."""
    impressions_from_candidates(data, features, candidates, out, k=k, force=force)
    made = Dataset.open(out).manifest.extra["impressions_from_candidates"]
    console.print(
        f"wrote {out}: {made['pages']:,} pages of {k} (the moments whose watch the candidate "
        f"model retrieved, of {made['examples']:,})"
    )
    console.print(f"next: funnelrec features build --data {out} --out FEAT")
