from __future__ import annotations

import io

from rich.console import Console

from funnelrec.progress import RateColumn, progress_bar


def drawn(unit: str | None, fields: str = "", **task_fields: object) -> str:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    bar = progress_bar(unit, fields=fields, console=console)
    with bar:
        task = bar.add_task("scoring valid", total=10, **task_fields)
        bar.advance(task, 4)
        bar.refresh()
    return out.getvalue()


def test_the_bar_shows_what_how_far_and_the_fields() -> None:
    text = drawn("examples", fields="{task.fields[watches]:,} watches", watches=12345)
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
