"""`funnelrec data ...`: import, fetch and describe canonical datasets."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Import, fetch and describe datasets (canonical event tables).", no_args_is_help=True
)
