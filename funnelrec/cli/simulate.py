"""`funnelrec simulate`: write a simulated world (tables + ground truth) as a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.simulate import PRESETS, generate, preset_config


def simulate(
    preset: Annotated[
        str, typer.Option(help=f"World size: {', '.join(PRESETS)} (see docs/simulator.md).")
    ] = "small",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same data.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Dataset directory to write.", show_default=False)
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides key=value, e.g. days=7 user_model.click_bias=-3.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Simulate a YouTube-like world and write its event tables and ground truth to OUT."""
    if out is None:
        raise typer.BadParameter("--out DIR is required", param_hint="--out")
    config = preset_config(preset, overrides or [])
    result = generate(config, seed, out, preset=preset, force=force, progress=progress)
    console = Console()
    console.print(f"wrote {result.path} (preset {preset}, seed {seed}) in {result.seconds:.1f} s")
    table = Table()
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, n in result.counts.items():
        table.add_row(name, f"{n:,}")
    console.print(table)
    console.print(f"ground truth in {result.path / 'truth'} (funnelrec.simulate.truth.World.load)")
