"""The `funnelrec` command line: one Typer app, a sub-app per stage of the funnel.

Each stage's commands live in their own module (`cli/data.py`, ...); this file only
assembles them and turns `FunnelrecError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from funnelrec.cli import data, demo, features
from funnelrec.cli import simulate as simulate_cli
from funnelrec.errors import FunnelrecError

app = typer.Typer(
    name="funnelrec",
    help="YouTube's two-stage deep recommender: candidate generation, ranking, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.command("simulate")(simulate_cli.simulate)
app.command("demo")(demo.demo)


def main() -> None:
    """Entry point of the console script."""
    try:
        app()
    except FunnelrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
