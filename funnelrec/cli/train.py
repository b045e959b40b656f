"""`funnelrec train ...`: train a stage's model on a features directory.

funnelrec train candidates --features /tmp/small-feat --out /tmp/cand
funnelrec train candidates --features F --out A --config configs/candidates-small.toml dim=64
funnelrec train candidates --features F --out A --resume      # after Ctrl-C or a crash
funnelrec train candidates --features F --out A --device cuda
funnelrec train candidates --features F --out A --nproc 2     # data-parallel, via torchrun
funnelrec train candidates --features F2 --out A2 --warm-start A   # F2 extends A's features
funnelrec train ranker --features F2 --out R2 --warm-start R
funnelrec train funnel --data D --out A       # the whole funnel on a dataset of watches
torchrun --standalone --nproc-per-node 2 -m funnelrec.cli.worker candidates --features F --out A
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from funnelrec.candidates import checkpoint_path, fit_candidates, load_training_config
from funnelrec.cli import rank, sequence
from funnelrec.training import distributed

app = typer.Typer(
    help="Train a stage of the funnel: the candidate generator or the ranker.", no_args_is_help=True
)
console = Console()


@app.callback()
def _group() -> None:
    """Train a stage's model on a features directory."""


@app.command("candidates")
def candidates(
    features: str = typer.Option(
        ..., "--features", "-f", help="Features directory: a path or a URI (s3://, gs://, ...)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help=escape("TOML config ([model] and [train] sections).")
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its checkpoint."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing artifact (and any leftover checkpoint)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda (the same as the override device=...)."
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Train data-parallel in N processes on this machine (runs torchrun); "
        "batch_size stays the batch of one step over all of them.",
    ),
    warm_start: Path | None = typer.Option(
        None,
        "--warm-start",
        help="Start from this artifact (features built with --update-from its features): "
        "its weights, tables grown for the new ids.",
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. dim=64 lr=0.01 epochs=3."
    ),
) -> None:
    """Train the candidate-generation network (sampled softmax, logQ correction)."""
    overrides = [*(overrides or []), *([f"device={device}"] if device else [])]
    cfg = load_training_config(config, overrides)  # a bad config fails here, once
    result = distributed.train_here_or_launch(
        "candidates",
        lambda dist: fit_candidates(
            features, out, cfg, resume=resume, force=force, dist=dist, warm_start=warm_start
        ),
        device=cfg.train.device,
        features=features,  # a path or URI, handed on as it is to torchrun's workers
        out=out,
        config=config,
        overrides=overrides,
        nproc=nproc,
        resume=resume,
        force=force,
        warm_start=warm_start,
    )
    if result is None:
        return
    best = (
        f", best valid recall@{cfg.valid_k} {result.best_metric:.4f} at step {result.best_step}"
        if result.best_metric is not None
        else ""
    )
    ranks = f" on {result.world_size} processes" if result.world_size > 1 else ""
    console.print(
        f"trained {result.steps:,} steps{ranks} ({result.examples:,} examples, "
        f"{result.examples_per_s:,.0f}/s), loss {result.loss:.4f}{best}"
        + (" (stopped early)" if result.stopped_early else "")
    )
    console.print(f"wrote {out}  (checkpoint {checkpoint_path(out).name} removed)")


app.command("ranker")(rank.train_command)
app.command("funnel")(sequence.train_command)
