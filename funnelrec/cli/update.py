"""`funnelrec update`: the daily update of a served funnel in one command.

funnelrec update --dataset DS --previous runs/day-1 --out runs/day-2 logs/day-2/*.csv
funnelrec update --dataset DS --previous runs/day-1 --out runs/day-2 \\
    watches=day2/w.csv impressions=day2/i.csv candidates.overrides=epochs=2
funnelrec update ... --serve-url http://127.0.0.1:8000     # then reload the server
funnelrec update ... --live-items serve/state.db           # + the items added live
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from funnelrec.cli.data import live_items_line
from funnelrec.pipeline import UpdateResult, load_update_config, reload_server, split_update_args
from funnelrec.pipeline import update as run_update

console = Console()


def update_command(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="Dataset directory to append to."),
    previous: Path = typer.Option(
        ...,
        "--previous",
        "-p",
        help="The previous day's `funnelrec run` or `funnelrec update` directory "
        "(features/, candidates/, ranker/).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The new day's directory."),
    args: list[str] | None = typer.Argument(
        None,
        metavar="[NEW_LOGS]... [KEY=VALUE]...",
        help="The new period's logs (PATH for watches, or TABLE=PATH; none: the dataset "
        "was appended already), and UpdateConfig overrides (e.g. "
        "candidates.overrides=epochs=2 index.kind=exact).",
    ),
    mapping: Path | None = typer.Option(
        None, "--mapping", "-m", help="Mapping TOML for the logs (default: the dataset's)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help=escape("UpdateConfig TOML ([candidates], [ranker], [index]).")
    ),
    replay: float | None = typer.Option(
        None, "--replay", help="Share of older training examples kept [0.01]."
    ),
    since: int | None = typer.Option(
        None, "--since", help="Training examples from this ts on are new (default: last period)."
    ),
    refit_normalizers: bool = typer.Option(
        False, "--refit-normalizers", help="Refit the quantile normalisers."
    ),
    allow_late: bool = typer.Option(
        False, "--allow-late", help="Accept (and count) events older than the dataset's end."
    ),
    live_items: Path | None = typer.Option(
        None,
        "--live-items",
        metavar="STATE_DB",
        help="The server's state database: the items added through POST /v1/items are "
        "merged into the dataset's catalogue by the append.",
    ),
    serve_url: str | None = typer.Option(
        None, "--serve-url", help="Reload the server there onto the new artifact at the end."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="FUNNELREC_ADMIN_TOKEN",
        help="The server's admin token (default: $FUNNELREC_ADMIN_TOKEN).",
    ),
) -> None:
    """append -> features update -> warm-start both stages -> index -> package.

    Each step is skipped when its output is up to date, so an interrupted update resumes."""
    logs, overrides = split_update_args(args or [])
    flags = [
        *([f"replay={replay}"] if replay is not None else []),
        *([f"since={since}"] if since is not None else []),
        *(["refit_normalizers=true"] if refit_normalizers else []),
        *(["allow_late=true"] if allow_late else []),
    ]
    cfg = load_update_config(config, [*overrides, *flags])
    result = run_update(
        dataset,
        previous,
        out,
        logs,
        mapping=mapping,
        config=cfg,
        console=console,
        live_items=live_items,
    )
    _summary(result)
    if serve_url:
        answer = reload_server(serve_url, result.artifact, token=token)
        console.print(
            f"reloaded {serve_url}: model {answer.get('model')}, "
            f"generation {answer.get('generation')}"
        )


def _summary(result: UpdateResult) -> None:
    steps = Table(title="update", show_header=True)
    for col in ("step", "status", "seconds"):
        steps.add_column(col, justify="right" if col == "seconds" else "left")
    for step in result.report["steps"]:
        steps.add_row(step["name"], step["status"], f"{step['seconds']:.1f}")
    console.print(steps)
    counts = result.report["counts"]
    added = ", ".join(f"{n:,} {t}" for t, n in counts["new_rows"].items() if n)
    new_ids = ", ".join(f"{n:,} {s}s" for s, n in counts["new_ids"].items() if n)
    if added:
        console.print(f"appended: {added}; new ids: {new_ids or 'none'}")
    if counts.get("live_items"):
        console.print(live_items_line(counts["live_items"]))
    growth = ", ".join(
        f"{name} {g['old']:,} -> {g['new']:,}"
        for name, g in counts["vocab_growth"].items()
        if g["new"] != g["old"]
    )
    console.print(f"vocabularies: {growth or 'unchanged'}")
    drifting = [
        f"{stage}.{column} KS {d['ks']:.3f}"
        for stage, columns in result.report["drift"].items()
        for column, d in columns.items()
        if d.get("ks") == d.get("ks")  # not NaN
    ]
    if drifting:
        console.print(f"normaliser drift: {', '.join(drifting)}")
    console.print(f"artifact: {result.artifact}  (report: {result.out / 'update.json'})")
