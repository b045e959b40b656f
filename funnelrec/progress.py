"""One layout for every progress bar: what, bar, done/total, rate, elapsed, ETA.

    with progress_bar("examples", enabled=show) as bar:
        task = bar.add_task("evaluate valid", total=n)
        bar.advance(task, 1024)                    # rate: "8,192 examples/s"

A task can name its own unit (`bar.add_task(..., unit="events")`) when one bar shows
several kinds of work; `fields` adds a text column of the task's own fields.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Units done per second (Rich's estimate over the last 30 s; the mean once done)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        return Text(f"{speed:,.0f} {task.fields.get('unit', self.unit)}/s")


def progress_bar(
    unit: str | None,
    *,
    enabled: bool = True,
    transient: bool = False,
    fields: str = "",
    console: Console | None = None,
) -> Progress:
    """A Rich progress bar of tasks counted in `unit` (None: no rate column).

    fields: a Rich format string of task fields shown after the count, e.g.
        "{task.fields[watches]:,} watches". enabled=False: nothing is drawn.
    """
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    if unit is not None:
        columns.append(RateColumn(unit))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled, transient=transient, console=console)
