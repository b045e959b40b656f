"""`funnelrec data ...`: import, fetch and describe canonical datasets.

funnelrec data import sequence beauty.txt --out /tmp/beauty
funnelrec data import kuairand kuairand_sample.tsv --out /tmp/kr
funnelrec data import movielens ml-1m/ --out /tmp/ml1m
funnelrec data import events mapping.toml --out /tmp/logs [--bad-rows skip]
funnelrec data import events mapping.toml --out /shared/logs --engine dask --cluster tcp://HOST:8786
funnelrec data append /tmp/logs day2/*.csv impressions=day2/imp.parquet [--allow-late]
funnelrec data append /tmp/logs day2/*.csv --live-items serve/state.db
funnelrec data fetch movielens-100k --out /tmp/ml100k
funnelrec data describe /tmp/ml100k
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from funnelrec.data.append import AppendResult, append_events
from funnelrec.data.describe import describe as describe_dataset
from funnelrec.data.describe import render
from funnelrec.data.fetch import fetch_movielens_100k
from funnelrec.data.loaders import (
    ImportResult,
    import_events,
    import_kuairand,
    import_movielens,
    import_sequence,
)
from funnelrec.engines import DaskEngine, Engine
from funnelrec.errors import ArtifactError
from funnelrec.serving.state import read_live_items, reserve_live_item_ids

app = typer.Typer(
    help="Import, fetch and describe datasets (canonical event tables).", no_args_is_help=True
)
console = Console()


class Format(StrEnum):
    movielens = "movielens"
    kuairand = "kuairand"
    sequence = "sequence"
    events = "events"


class BadRows(StrEnum):
    fail = "fail"
    skip = "skip"


BAD_ROWS = typer.Option(
    BadRows.fail,
    "--bad-rows",
    help="fail: stop at the first bad row, naming it; skip: leave bad rows out, write them "
    "with their reasons to DATASET/rejected/ and count them in the manifest.",
)


class EngineKind(StrEnum):
    """Where `data import events` and `features build` run their per-file or per-block work."""

    local = "local"
    dask = "dask"


CLUSTER = typer.Option(
    None,
    "--cluster",
    help="With --engine dask: the scheduler, e.g. tcp://HOST:8786 (default: "
    "$DASK_SCHEDULER_ADDRESS), or local:N to start N workers on this machine.",
)


class Fetchable(StrEnum):
    movielens_100k = "movielens-100k"


OUT = typer.Option(..., "--out", "-o", help="Dataset directory to create.")
FORCE = typer.Option(False, "--force", help="Replace an existing dataset directory.")


def _summary(result: ImportResult) -> None:
    counts = result.row_counts
    parts = [f"{counts[t]:,} {t}" for t in ("watches", "impressions", "searches") if t in counts]
    parts += [f"{counts['users']:,} users", f"{counts['items']:,} items"]
    console.print(f"[bold]{', '.join(parts)}[/] -> {result.path} ({result.seconds:.1f} s)")
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    console.print(table)
    lo, hi = result.time_range.get("min_ts"), result.time_range.get("max_ts")
    if lo is not None and hi is not None:
        if result.synthetic_timestamps:
            console.print(f"timestamps: synthetic (position in sequence, {lo}..{hi})")
        else:
            fmt = "%Y-%m-%d"
            first = dt.datetime.fromtimestamp(lo, dt.UTC).strftime(fmt)
            last = dt.datetime.fromtimestamp(hi, dt.UTC).strftime(fmt)
            console.print(f"time range: {first} .. {last} (UTC)")


@app.command("import")
def import_(
    fmt: Format = typer.Argument(
        ..., metavar="FORMAT", help="movielens, kuairand, sequence or events."
    ),
    src: Path = typer.Argument(
        ...,
        metavar="SRC",
        help="Input file or directory (movielens: a dir or zip; events: the mapping TOML).",
    ),
    out: Path = OUT,
    force: bool = FORCE,
    bad_rows: BadRows = BAD_ROWS,
    engine: EngineKind = typer.Option(
        EngineKind.local,
        "--engine",
        help="events: where the files are read and converted: local (this process) or dask "
        "(one task per file on a Dask cluster; ids, tables and manifest stay here).",
    ),
    cluster: str | None = CLUSTER,
) -> None:
    """Import raw logs into a canonical dataset directory (built aside, renamed at the end)."""
    if bad_rows is not BadRows.fail and fmt is not Format.events:
        raise typer.BadParameter("--bad-rows skip applies to the events format")
    runner: Engine | None = None
    if engine is EngineKind.dask:
        if fmt is not Format.events:
            raise typer.BadParameter("--engine dask applies to the events format")
        runner = DaskEngine(cluster)
    elif cluster is not None:
        raise typer.BadParameter("--cluster goes with --engine dask")
    with console.status(f"importing {fmt.value} from {src}"):
        if fmt is Format.movielens:
            result = import_movielens(src, out, force=force)
        elif fmt is Format.kuairand:
            result = import_kuairand(src, out, force=force)
        elif fmt is Format.events:
            result = import_events(src, out, force=force, bad_rows=bad_rows.value, engine=runner)
        else:
            result = import_sequence(src, out, force=force)
    _summary(result)


@app.command("append")
def append(
    dataset: Path = typer.Argument(..., metavar="DIR", help="Dataset directory to append to."),
    new_logs: list[str] = typer.Argument(
        None,
        metavar="[NEW_LOGS]...",
        help="Files, directories or globs of the new period: PATH (watches) or TABLE=PATH.",
    ),
    mapping: Path = typer.Option(
        None,
        "--mapping",
        "-m",
        help="Mapping TOML (default: the one the dataset was imported with).",
    ),
    bad_rows: BadRows = BAD_ROWS,
    allow_late: bool = typer.Option(
        False, "--allow-late", help="Accept (and count) events older than the dataset's end."
    ),
    live_items: Path | None = typer.Option(
        None,
        "--live-items",
        metavar="STATE_DB",
        help="A server's state database: merge the items added through POST /v1/items "
        "into the items table (alone, without logs, they are the whole period); the items "
        "it adds from then on get ids above the grown catalogue.",
    ),
) -> None:
    """Append a new period of logs: known ids keep their numbers, new ones follow."""
    with console.status(f"appending to {dataset}"):
        result = append_events(
            dataset,
            new_logs or None,
            mapping=mapping,
            bad_rows=bad_rows.value,
            allow_late=allow_late,
            live_items=read_live_items(live_items) if live_items is not None else None,
        )
    _append_summary(result)
    if live_items is not None:
        try:
            reserve_live_item_ids(live_items, result.row_counts["items"])
        except ArtifactError as e:
            # the merge is done and kept: the reservation only guards the next reload
            console.print(f"[yellow]warning:[/yellow] {escape(str(e))}")


def _append_summary(result: AppendResult) -> None:
    period = result.period
    added = ", ".join(f"{n:,} {t}" for t, n in period["rows"].items() if n) or "no rows"
    new_ids = ", ".join(f"{n:,} {s}s" for s, n in period["new_ids"].items() if n) or "none"
    console.print(
        f"[bold]period {period['period']}: {added}[/] -> {result.path} ({result.seconds:.1f} s)"
    )
    console.print(f"new ids: {new_ids}")
    if period["rejected"]:
        rejected = ", ".join(f"{n:,} {t}" for t, n in period["rejected"].items())
        console.print(f"rejected: {rejected} (in rejected/period-{period['period']}/)")
    if period["late"]:
        console.print(f"late events accepted: {period['late']:,}")
    live = period.get("live_items")
    if live:
        console.print(live_items_line(live))
    totals = ", ".join(f"{n:,} {t}" for t, n in result.row_counts.items())
    console.print(f"dataset: {totals}")


def live_items_line(live: dict[str, Any]) -> str:
    """What an append did with the live items (a period's `live_items`), in one line."""
    line = (
        f"live items: {live['new']:,} merged, {live['known']:,} known "
        f"({live['conflicting']:,} with other metadata: the dataset's kept)"
    )
    if live["conflicting_ids"]:
        line += f": {', '.join(live['conflicting_ids'])}"
    if live["renumbered"]:
        line += f"; {live['renumbered']:,} under another id than the service gave them"
    return line


@app.command("fetch")
def fetch(
    name: Fetchable = typer.Argument(..., metavar="NAME", help="Data set to fetch."),
    out: Path = OUT,
    force: bool = FORCE,
    timeout: float = typer.Option(10.0, help="Seconds to wait for the publisher's host."),
) -> None:
    """Download a public data set (checksum verified) and import it."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("download", total=None)

        def on_progress(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        def on_status(message: str) -> None:
            progress.update(task, description=message[:60])
            progress.console.print(message)

        result = fetch_movielens_100k(
            out, force=force, timeout=timeout, on_progress=on_progress, on_status=on_status
        )
    console.print(f"source: {result.source}: {result.detail}")
    _summary(result.imported)


@app.command("describe")
def describe(path: Path = typer.Argument(..., help="Dataset directory.")) -> None:
    """Counts, time range, activity and popularity percentiles, optional columns."""
    console.print(render(describe_dataset(path)))
