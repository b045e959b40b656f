"""One layout for every progress bar: what, bar, done/total, rate, elapsed, ETA.

    with progress_bar("examples", enabled=show) as bar:
        task = bar.add_task("evaluate valid", total=n)
        bar.advance(task, 1024)                    # rate: "8,192 examples/s"

A task can name its own unit (`bar.add_task(..., unit="events")`) when one bar shows
several kinds of work; `fields` adds a text column of the task's own fields.

A live bar is only drawn on a terminal. Where the output is a file or a pipe (a log, `tee`,
a CI job) the same tasks print plain lines instead (`LoggedProgress`): one as a task
starts, one every `every` seconds while it runs (done/total, rate, elapsed, ETA) and one
as it ends, so that a log shows what a long command is doing while it does it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Often enough that a log shows life and a fresh ETA, seldom enough that an hour's run
# stays a readable page.
EVERY_S = 15.0


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
    every: float = EVERY_S,
    clock: Callable[[], float] | None = None,
) -> Progress:
    """A Rich progress bar of tasks counted in `unit` (None: no rate column).

    fields: a Rich format string of task fields shown after the count, e.g.
        "{task.fields[watches]:,} watches". enabled=False: nothing is drawn.
    console: where it is drawn (default: Rich's console, on stdout). Not a terminal: plain
        lines, every `every` seconds (see `LoggedProgress`).
    clock: seconds, for the rate, elapsed time and ETA (default: the console's clock).
    """
    details: list[ProgressColumn] = []
    if fields:
        details.append(TextColumn(fields))
    if unit is not None:
        details.append(RateColumn(unit))
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *details,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    console = console or get_console()
    if enabled and not draws_live(console):
        return LoggedProgress(
            *columns,
            details=details,
            every=every,
            announce=not transient,
            console=console,
            get_time=clock,
        )
    return Progress(
        *columns, disable=not enabled, transient=transient, console=console, get_time=clock
    )


def draws_live(console: Console) -> bool:
    """Whether Rich draws a live display on `console`: elsewhere it shows nothing until the
    end (a file, a pipe, a dumb terminal)."""
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


class LoggedProgress(Progress):
    """A progress bar's tasks as plain lines, for a console that is not a terminal.

    A task added is announced ("training: 0/1,200 · started"), unless the bar is transient
    (a passing sub-task, shown only if it lasts). Every `every` seconds of the bar's clock,
    at an update, each running task prints a line: done/total, its fields and rate, the
    share done, elapsed and ETA. A task announced or reported prints a last line when it
    finishes, or when the bar stops before it does. Nothing is drawn live, so nothing of
    stdout is redirected either.
    """

    def __init__(
        self,
        *columns: ProgressColumn,
        details: list[ProgressColumn],
        every: float,
        announce: bool,
        console: Console,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(*columns, console=console, get_time=get_time, disable=True)
        self.details, self.every, self.announce = details, every, announce
        self._last_line = self.get_time()
        self._reported: set[TaskID] = set()  # announced or reported: a last line is due
        self._ended: set[TaskID] = set()  # that last line printed

    def __enter__(self) -> LoggedProgress:
        self._last_line = self.get_time()
        return self

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        if self.announce and visible:
            task = self._tasks[task_id]
            self._print([f"{self._what(task)}: {self._count(task)} · started"])
            self._reported.add(task_id)
        return task_id

    def reset(self, task_id: TaskID, **kwargs: Any) -> None:
        """A reused task starts over: announced no more (a block's stage of many is shown
        only if it lasts)."""
        self._end(task_id, "ended")
        super().reset(task_id, **kwargs)
        self._reported.discard(task_id)
        self._ended.discard(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._after_progress(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._after_progress(task_id)

    def remove_task(self, task_id: TaskID) -> None:
        super().remove_task(task_id)
        self._reported.discard(task_id)
        self._ended.discard(task_id)

    def stop(self) -> None:
        for task_id in list(self._tasks):
            self._end(task_id, "ended")

    # ---- the lines

    def _after_progress(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.finished:
            self._end(task_id, "done")
        now = self.get_time()
        if now - self._last_line < self.every:
            return
        running = [
            t
            for t in self.tasks
            if t.visible and t.started and not t.finished and t.id not in self._ended
        ]
        self._print([self._line(t) for t in running])
        self._reported.update(t.id for t in running)

    def _end(self, task_id: TaskID, how: str) -> None:
        """The last line of a task that was announced or reported, once."""
        if task_id not in self._reported or task_id in self._ended:
            return
        self._ended.add(task_id)
        task = self._tasks[task_id]
        if task.finished:
            self._print([self._line(task, end="done in")])
        else:
            self._print([self._line(task, end=f"{how} after")])

    def _line(self, task: Task, end: str = "") -> str:
        parts = [f"{self._what(task)}: {self._count(task)}"]
        for column in self.details:
            text = column.render(task)
            plain = text.plain if isinstance(text, Text) else str(text)
            if plain.strip():
                if isinstance(column, RateColumn):
                    parts.append(f"· {plain}")
                else:
                    parts[-1] += f" {plain}"
        if task.total and not task.finished:
            parts.append(f"· {100 * task.completed / task.total:.0f}%")
        elapsed = task.finished_time if task.finished_time is not None else task.elapsed
        if end:
            parts.append(f"· {end} {_clock(elapsed)}")
        else:
            parts.append(f"· elapsed {_clock(elapsed)}")
            remaining = task.time_remaining
            parts.append(f"· ETA {_clock(remaining) if remaining is not None else '-'}")
        return " ".join(parts)

    @staticmethod
    def _what(task: Task) -> str:
        return Text.from_markup(task.description).plain.rstrip(": ")

    @staticmethod
    def _count(task: Task) -> str:
        done = f"{int(task.completed):,}"
        return f"{done}/{int(task.total):,}" if task.total is not None else done

    def _print(self, lines: list[str]) -> None:
        if not lines:
            return
        self._last_line = self.get_time()
        for line in lines:
            # soft_wrap: one line however long, for the log's reader and for grep
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float | None) -> str:
    return str(timedelta(seconds=int(seconds or 0)))
