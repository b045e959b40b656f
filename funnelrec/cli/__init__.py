"""The `funnelrec` command line: one Typer app, a sub-app per stage of the funnel.

Each stage's commands live in their own module (`cli/data.py`, ...); this file only
assembles them and turns `FunnelrecError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from funnelrec.cli import (
    data,
    evaluate,
    experiment,
    features,
    funnel,
    index,
    package,
    rank,
    report,
    run,
    serve,
    train,
    update,
)
from funnelrec.cli import simulate as simulate_cli
from funnelrec.errors import FunnelrecError

app = typer.Typer(
    name="funnelrec",
    help="YouTube's two-stage deep recommender: candidate generation, ranking, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
evaluate.app.command("ranker")(rank.evaluate_command)
evaluate.app.command("funnel")(funnel.evaluate_command)
features.app.command("impressions")(rank.impressions_command)

app.command("demo")(run.demo)
app.command("run")(run.run_command)
app.command("simulate")(simulate_cli.simulate)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.add_typer(train.app, name="train")
app.add_typer(index.app, name="index")
app.add_typer(evaluate.app, name="evaluate")
app.command("package")(package.package_command)
app.command("serve")(serve.serve)
app.command("recommend")(serve.recommend)
app.command("report")(report.report_command)
app.command("experiment")(experiment.experiment_command)
app.command("update")(update.update_command)


def main() -> None:
    """Entry point of the console script."""
    try:
        app()
    except FunnelrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
