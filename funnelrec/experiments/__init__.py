"""The paper's experiments on a simulated world: `funnelrec experiment NAME`.

    from funnelrec.experiments import EXPERIMENTS, run_experiment
    from funnelrec.experiments.harness import ExperimentOptions
    run_experiment("labels", ExperimentOptions(preset="small-v2", seeds=3))

Each experiment is a module with `run(h: Harness) -> dict`: it trains what it needs
through the shared `harness.Harness` (cached, so re-runs skip what is done), writes
OUT/NAME/metrics.json (claim, protocol, tables, figure specs, verdict), its figures and
run.json (provenance), and returns the document. `paper` runs them all and writes the
report (`funnelrec.experiments.report`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console

from funnelrec.errors import FunnelrecError
from funnelrec.experiments import (
    baselines,
    depth_features,
    example_age,
    examples_per_user,
    funnel_ab,
    labels,
    negatives,
    paper,
    ranking_table,
)
from funnelrec.experiments.harness import ExperimentOptions, Harness

# Name -> run function, in the order `paper` runs them.
EXPERIMENTS: dict[str, Callable[[Harness], dict[str, Any]]] = {
    "baselines": baselines.run,
    "depth-features": depth_features.run,
    "example-age": example_age.run,
    "labels": labels.run,
    "ranking-table": ranking_table.run,
    "examples-per-user": examples_per_user.run,
    "negatives": negatives.run,
    "funnel-ab": funnel_ab.run,
}
NAMES = (*EXPERIMENTS, "paper")


def run_experiment(
    name: str, options: ExperimentOptions, console: Console | None = None
) -> dict[str, Any]:
    """Run experiment `name` (or "paper": all of them) and return its document."""
    h = Harness(options, console)
    if name == "paper":
        return paper.run(h, EXPERIMENTS)
    if name not in EXPERIMENTS:
        raise FunnelrecError(f"unknown experiment '{name}' (expected one of {', '.join(NAMES)})")
    return EXPERIMENTS[name](h)
