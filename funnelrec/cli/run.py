"""`funnelrec run CONFIG` (the whole pipeline) and `funnelrec demo` (it, on the small world)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.pipeline import DEMO, RunResult, load_run_config, run

console = Console()


def run_command(
    config: Path | None = typer.Argument(
        None, help="Run config (TOML; see configs/run-small.toml). Default: the small world."
    ),
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides, e.g. out=runs/x data.seed=3."
    ),
) -> None:
    """data -> features -> candidates -> index -> ranker -> evaluation -> artifact.

    Each stage is skipped when its output is up to date with its settings and inputs."""
    cfg = load_run_config(config, overrides or [])
    result = run(cfg, console=console)
    _summary(result)


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory."),
    users: int = typer.Option(2, "--users", help="Known users to show recommendations for."),
) -> None:
    """The whole funnel on a small simulated world, then recommendations and how to serve.

    Simulates the world, trains both stages, builds the index, evaluates and packages
    (a few minutes on two cores; re-running skips what is up to date)."""
    from funnelrec.cli.serve import show_response
    from funnelrec.serving.recommender import Demographics, Recommender, RecommendRequest
    from funnelrec.serving.state import UserStateStore

    result = run(replace(DEMO, out=str(out)), console=console)
    _summary(result)
    art = result.artifact
    rec = Recommender.load(art)
    store = UserStateStore(art / "state.db")
    rec.seed_state(store)
    for user_id in range(1, users + 1):
        show_response(
            rec,
            rec.recommend(RecommendRequest(user_id=user_id, k=10), store.context(user_id)),
            title=f"user {user_id}",
        )
    newcomer = RecommendRequest(demographics=Demographics(age=25, region=None), k=5)
    show_response(rec, rec.recommend(newcomer, None), title="a new user (age 25, no history)")
    console.print(
        "\n[bold]Serve it:[/bold]\n"
        f"  funnelrec serve {art} --port 8000\n"
        "  curl -s localhost:8000/v1/recommend -H 'content-type: application/json' "
        '-d \'{"user_id": 1, "k": 5}\'\n'
        f"  funnelrec recommend {art} --user 1 -k 10"
    )


def _summary(result: RunResult) -> None:
    ran = ", ".join(f"{n} {result.seconds[n]:.0f}s" for n in result.ran) or "nothing"
    console.print(f"ran: {ran}; up to date: {', '.join(result.skipped) or 'nothing'}")
    cand: dict[str, dict[str, float]] = result.metrics.get("candidates", {})
    n = result.metrics.get("candidates_protocol", {}).get("examples", "all")
    table = Table(title=f"held-out next watches (test split, {n} examples, seen items excluded)")
    cols = ["recall@10", "ndcg@10", "recall@100"]
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in cand.items():
        table.add_row(name, *(f"{m.get(c, float('nan')):.4f}" for c in cols))
    console.print(table)
    ranking: dict[str, Any] = result.metrics.get("ranking", {})
    model = ranking.get("model", ranking)
    wpul = model.get("weighted_per_user_loss") if isinstance(model, dict) else None
    if wpul is not None:
        console.print(f"ranker: weighted per-user loss {wpul:.4f} on the test split")
    console.print(f"artifact: {result.artifact}")
