from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from funnelrec.progress import LoggedProgress, RateColumn, progress_bar


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def console(out: io.StringIO, terminal: bool) -> Console:
    return Console(file=out, width=160, force_terminal=terminal, color_system=None)


def drawn(unit: str | None, fields: str = "", terminal: bool = True, **task_fields: object) -> str:
    out = io.StringIO()
    bar = progress_bar(unit, fields=fields, console=console(out, terminal))
    with bar:
        task = bar.add_task("scoring valid", total=10, **task_fields)
        bar.advance(task, 4)
        bar.refresh()
    return out.getvalue()


def logged(steps: int, every: float = 10.0, **options: object) -> list[str]:
    """The lines of a bar on a file: `steps` seconds, 5 examples each, of 100."""
    out, clock = io.StringIO(), Clock()
    bar = progress_bar("examples", console=console(out, False), every=every, clock=clock, **options)
    with bar:
        task = bar.add_task("pages from candidates", total=100)
        for _ in range(steps):
            clock.now += 1.0
            bar.advance(task, 5)
    return out.getvalue().splitlines()


def test_the_bar_shows_what_how_far_and_the_fields() -> None:
    for terminal in (True, False):
        text = drawn(
            "examples", "{task.fields[watches]:,} watches", terminal=terminal, watches=12345
        )
        assert "scoring valid" in text and "4/10" in text and "12,345 watches" in text


def test_the_rate_names_the_task_unit_or_the_bar_default() -> None:
    bar = progress_bar("examples", enabled=False)
    column = next(c for c in bar.columns if isinstance(c, RateColumn))
    bar.add_task("a", total=100)
    bar.add_task("b", total=100, unit="events")
    plain, own = bar.tasks
    assert str(column.render(plain)) == ""  # no speed measured yet
    plain.finished_speed, own.finished_speed = 1500.0, 20.0
    assert str(column.render(plain)) == "1,500 examples/s"
    assert str(column.render(own)) == "20 events/s"


def test_no_rate_column_without_a_unit() -> None:
    assert not any(isinstance(c, RateColumn) for c in progress_bar(None).columns)


def test_a_terminal_gets_the_live_bar_a_file_plain_lines_disabled_nothing() -> None:
    assert type(progress_bar("examples", console=console(io.StringIO(), True))) is Progress
    assert isinstance(
        progress_bar("examples", console=console(io.StringIO(), False)), LoggedProgress
    )
    out = io.StringIO()
    bar = progress_bar("examples", enabled=False, console=console(out, False))
    with bar:
        bar.advance(bar.add_task("quiet", total=10), 10)
    assert out.getvalue() == ""


def test_a_file_gets_a_line_every_period_with_rate_and_eta() -> None:
    lines = logged(steps=15)
    assert lines[0] == "pages from candidates: 0/100 · started"
    assert lines[1] == (
        "pages from candidates: 50/100 · 5 examples/s · 50% · elapsed 0:00:10 · ETA 0:00:10"
    )
    # the bar stops before the task is done: where it ended
    assert lines[2] == "pages from candidates: 75/100 · 5 examples/s · 75% · ended after 0:00:15"
    assert len(lines) == 3


def test_a_finished_task_says_so_once() -> None:
    lines = logged(steps=20, every=8.0)
    assert [line.split(" · ")[-1] for line in lines] == [
        "started",
        "ETA 0:00:12",  # at 8 s
        "ETA 0:00:04",  # at 16 s
        "done in 0:00:20",
    ]
    assert lines[-1] == "pages from candidates: 100/100 · 5 examples/s · done in 0:00:20"


def test_nothing_between_periods_and_a_short_transient_task_stays_silent() -> None:
    assert len(logged(steps=9)) == 2  # started, ended: no period passed
    assert logged(steps=9, transient=True) == []
    lines = logged(steps=20, transient=True)  # it lasted: shown, and its end too
    assert lines[0].startswith("pages from candidates: 50/100") and "done in" in lines[-1]


def test_the_lines_carry_the_fields_and_a_reused_task_is_shown_only_if_it_lasts() -> None:
    out, clock = io.StringIO(), Clock()
    bar = progress_bar(
        None,
        fields="steps  loss {task.fields[loss]}",
        console=console(out, False),
        every=10.0,
        clock=clock,
    )
    with bar:
        task = bar.add_task("training", total=40, loss="-")
        for step in range(1, 21):
            clock.now += 1.0
            bar.update(task, completed=step, loss=f"{1 / step:.2f}")
        bar.reset(task, total=10, description="block 2/2: ranking examples")
        clock.now += 1.0
        bar.advance(task, 10)  # done within a period: no line of its own
    assert out.getvalue().splitlines() == [
        "training: 0/40 · started",
        "training: 10/40 steps  loss 0.10 · 25% · elapsed 0:00:10 · ETA 0:00:30",
        "training: 20/40 steps  loss 0.05 · 50% · elapsed 0:00:20 · ETA 0:00:20",
        "training: 20/40 steps  loss 0.05 · 50% · ended after 0:00:20",
    ]


def test_a_line_is_one_line_however_narrow_the_console() -> None:
    out, clock = io.StringIO(), Clock()
    narrow = Console(file=out, width=20, force_terminal=False, color_system=None)
    with progress_bar("examples", console=narrow, clock=clock) as bar:
        bar.add_task("a rather long description of the work", total=10)
    assert len(out.getvalue().splitlines()) == 2
