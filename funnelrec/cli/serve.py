"""`funnelrec serve ART` and `funnelrec recommend ART --user ID`: the packaged funnel in use."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()

ART = typer.Argument(..., help="Artifact directory written by `funnelrec package` or `run`.")
STATE = typer.Option(
    None, "--state", help="Live user-state database (SQLite; default ART/state.db)."
)


def serve(
    art: Path = ART,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    state: Path | None = STATE,
    artifacts_root: Path | None = typer.Option(
        None,
        "--artifacts-root",
        help="The only directory /admin/reload may load artifacts from (default: ART's).",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Worker processes on the port, each on its own core (default 1: one process).",
    ),
) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn); SIGHUP reloads the artifact.

    With --workers N, N processes share the port, the state database and reloads: SIGHUP
    to the main process or POST /admin/reload to any worker reaches all of them, and
    /metrics sums over them.
    """
    from funnelrec.errors import FunnelrecError

    if workers < 1:
        raise FunnelrecError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        from funnelrec.serving.http import run_server

        run_server(art, host=host, port=port, state_path=state, artifacts_root=artifacts_root)
        return
    from funnelrec.serving.workers import run_workers

    run_workers(
        art,
        workers=workers,
        host=host,
        port=port,
        state_path=state,
        artifacts_root=artifacts_root,
    )


def recommend(
    art: Path = ART,
    user: int | None = typer.Option(None, "--user", help="Dataset user id (dense, from 1)."),
    history: str | None = typer.Option(
        None, "--history", help="Explicit watch history instead of a user: item ids, a,b,c."
    ),
    query: list[str] | None = typer.Option(None, "--query", help="A past search (repeatable)."),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="How many to show."),
    include_watched: bool = typer.Option(
        False, "--include-watched", help="Keep items the user already watched."
    ),
    state: Path | None = STATE,
) -> None:
    """Print a user's top-k recommendations as a table (titles where known)."""
    from funnelrec.errors import FunnelrecError
    from funnelrec.serving.recommender import Recommender, RecommendRequest
    from funnelrec.serving.state import UserStateStore

    rec = Recommender.load(art)
    ctx = None
    hist = None
    if history:
        try:
            hist = [int(x) for x in history.split(",") if x.strip()]
        except ValueError:
            raise FunnelrecError(f"--history '{history}': expected item ids like 3,17,42") from None
    if user is not None:
        store = UserStateStore(state or Path(art) / "state.db")
        rec.seed_state(store)
        ctx = store.context(user)
    req = RecommendRequest(
        user_id=user, history=hist, queries=query, k=k, exclude_watched=not include_watched
    )
    show_response(rec, rec.recommend(req, ctx), title=f"user {user}" if user else "context")


def show_response(rec: object, resp: object, *, title: str) -> None:
    """A Rich table of a Response: rank, item, title, topic, expected watch time, sources."""
    from funnelrec.serving.recommender import Recommender, Response

    assert isinstance(rec, Recommender) and isinstance(resp, Response)
    table = Table(title=f"recommendations for {title}")
    for col in ("#", "item", "title", "topic", "E[watch s]", "sources"):
        table.add_column(col, justify="right" if col in ("#", "item", "E[watch s]") else "left")
    for i, item in enumerate(resp.items, 1):
        meta = rec.item_metadata(item.item_id) or {}
        sources = ", ".join(f"{s} {v:.2f}" for s, v in item.sources.items())
        table.add_row(
            str(i),
            str(item.item_id),
            str(meta.get("title") or ""),
            str(meta.get("topic") or ""),
            f"{item.expected_watch_time:.0f}",
            sources,
        )
    console.print(table)
    stages = ", ".join(f"{s} {ms:.1f}" for s, ms in resp.timings_ms.items())
    console.print(f"[dim]ms per stage: {stages}[/dim]")
