"""`funnelrec report RUN_DIR`: metrics JSON of a run or of experiments -> Markdown + HTML.

funnelrec report runs/experiments          # after `funnelrec experiment paper`
funnelrec report runs/demo --out /tmp/r    # a `funnelrec run` directory
funnelrec report runs/experiments --doc docs/results.md   # the project's results page
funnelrec report runs/experiments --doc docs/results.md --preface runs/how-it-ran.md
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from funnelrec.errors import FunnelrecError
from funnelrec.experiments.report import write_report

console = Console()


def report_command(
    run_dir: Path = typer.Argument(..., help="Run or experiment directory holding metrics JSON."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where report.md, report.html and figures go (default RUN_DIR)."
    ),
    doc: Path | None = typer.Option(
        None,
        "--doc",
        help="Write a project document instead (e.g. docs/results.md; figures in docs/results/).",
    ),
    preface: Path | None = typer.Option(
        None,
        "--preface",
        help="A Markdown file about this run that its metrics cannot say (how it was run, "
        "what shared the machine), placed before the first section.",
    ),
) -> None:
    """Metric tables with their protocol, curves and latency histograms: one Markdown file
    and one self-contained HTML page (figures embedded)."""
    text = None
    if preface is not None:
        try:
            text = preface.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FunnelrecError(f"--preface {preface}: cannot read it: {e}") from None
    report = write_report(run_dir, out, doc=doc, preface=text)
    written = f"{report.markdown}" + (f", {report.html}" if report.html else "")
    console.print(f"{report.sections} sections, {len(report.figures)} figures -> {written}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("report")(report_command)
