"""`funnelrec train ...`: train a stage's model on a features directory.

funnelrec train candidates --features /tmp/small-feat --out /tmp/cand
funnelrec train candidates --features F --out A --config configs/candidates-small.toml dim=64
funnelrec train candidates --features F --out A --resume      # after Ctrl-C or a crash
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from funnelrec.candidates import checkpoint_path, fit_candidates, load_training_config

app = typer.Typer(
    help="Train a stage of the funnel: the candidate generator or the ranker.", no_args_is_help=True
)
console = Console()


@app.callback()
def _group() -> None:
    """Train a stage's model on a features directory."""


@app.command("candidates")
def candidates(
    features: Path = typer.Option(..., "--features", "-f", help="Features directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML config ([model] and [train] sections)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its checkpoint."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing artifact (and any leftover checkpoint)."
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. dim=64 lr=0.01 epochs=3."
    ),
) -> None:
    """Train the candidate-generation network (sampled softmax, logQ correction)."""
    cfg = load_training_config(config, overrides or [])
    result = fit_candidates(features, out, cfg, resume=resume, force=force)
    best = (
        f", best valid recall@{cfg.valid_k} {result.best_metric:.4f} at step {result.best_step}"
        if result.best_metric is not None
        else ""
    )
    console.print(
        f"trained {result.steps:,} steps ({result.examples:,} examples, "
        f"{result.examples_per_s:,.0f}/s), loss {result.loss:.4f}{best}"
        + (" (stopped early)" if result.stopped_early else "")
    )
    console.print(f"wrote {out}  (checkpoint {checkpoint_path(out).name} removed)")
