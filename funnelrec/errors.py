"""Errors that carry a one-line message meant for the person running funnelrec."""

from __future__ import annotations


class FunnelrecError(Exception):
    """Base class: the CLI prints the message alone (no traceback) and exits non-zero."""


class DataError(FunnelrecError):
    """Input data that cannot be used: names the file, column and first offending row."""

    def __init__(
        self,
        message: str,
        *,
        path: object | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        parts = []
        if path is not None:
            parts.append(str(path))
        if column is not None:
            parts.append(f"column '{column}'")
        if row is not None:
            parts.append(f"row {row}")
        prefix = ": ".join([", ".join(parts)]) if parts else ""
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.column = column
        self.row = row


class ArtifactError(FunnelrecError):
    """An artifact on disk is missing, of another format version, or does not match."""
