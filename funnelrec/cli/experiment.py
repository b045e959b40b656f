"""`funnelrec experiment NAME`: the paper's experiments on a simulated world.

    funnelrec experiment paper                             # all of them on small-v2 + a report
    funnelrec experiment labels --preset small-v2 --seeds 5
    funnelrec experiment negatives --preset tiny-v2 cand_max_steps=40 eval_examples=200

NAME is one of: baselines, depth-features, example-age, labels, ranking-table,
examples-per-user, negatives, funnel-ab, paper. Results go to OUT/NAME/ (metrics.json,
figures, run.json); the world, features and models are shared under OUT/_shared/ and
reused by later runs. Every arm trains to convergence under one rule with every training
seed (`--seeds`, 3 by default), and each claim's verdict comes from a paired 95%
interval (docs/results.md). KEY=VALUE arguments override the preset's compute budget
and convergence settings (`funnelrec.experiments.harness.Budget`), e.g. workers=1.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from funnelrec.experiments import NAMES, run_experiment
from funnelrec.experiments.harness import ExperimentOptions

console = Console()


def experiment_command(
    name: str = typer.Argument(..., help=f"One of: {', '.join(NAMES)}."),
    preset: str = typer.Option(
        "small-v2", "--preset", help="Simulated world: tiny, small, medium, their -v2 twins."
    ),
    seeds: int = typer.Option(3, "--seeds", help="Training seeds per arm (paired over seeds)."),
    out: Path = typer.Option(Path("runs/experiments"), "--out", "-o", help="Output root."),
    world_seed: int = typer.Option(0, "--world-seed", help="Seed of the simulated world."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    budget: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Budget overrides, e.g. patience=5 workers=1."
    ),
) -> None:
    """Run one of the paper's experiments (or all: paper) and write metrics, figures and a
    verdict."""
    options = ExperimentOptions(
        preset=preset,
        seeds=seeds,
        out=out,
        world_seed=world_seed,
        budget=tuple(budget or ()),
        progress=progress,
    )
    doc = run_experiment(name, options, console)
    verdict = doc.get("verdict", {})
    console.print(f"[bold]{name}[/]: {verdict.get('holds', '?')}: {verdict.get('text', '')}")
    console.print(f"wrote {out / name}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("experiment")(experiment_command)
