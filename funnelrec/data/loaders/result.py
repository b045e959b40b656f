"""The result of an import (`ImportResult`) and what every loader shares around writing:
the check of the target directory, the watches table and the users/items id tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.dataset import Dataset
from funnelrec.errors import DataError


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote: read back from the committed manifest."""

    path: Path
    source: str
    row_counts: dict[str, int]
    time_range: dict[str, int | None]
    synthetic_timestamps: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path, started: float) -> ImportResult:
        m = Dataset.open(path).manifest
        return cls(
            path=Path(path),
            source=m.source,
            row_counts=dict(m.row_counts),
            time_range=dict(m.time_range),
            synthetic_timestamps=m.synthetic_timestamps,
            seconds=time.perf_counter() - started,
            extra=dict(m.extra),
        )


def _check_target(out: Path, force: bool) -> None:
    # Fail before the (possibly long) read; DatasetWriter checks again before writing.
    if Path(out).exists() and not force:
        raise DataError(f"{out} already exists (use --force to overwrite)")


def _watches(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    watch_time: pa.Array | None,
) -> pa.Table:
    """A watches table sorted by (user_id, ts); ties keep the input order."""
    order = np.lexsort((ts, user))
    wt = (
        pa.nulls(user.size, pa.float32())
        if watch_time is None
        else pc.cast(watch_time, pa.float32()).take(pa.array(order))
    )
    return pa.table(
        {
            "user_id": user[order],
            "item_id": item[order],
            "ts": ts[order],
            "watch_time_s": wt,
            "source": pa.nulls(user.size, pa.string()),
        }
    )


def _ids_table(column: str, n: int, **cols: pa.Array) -> pa.Table:
    return pa.table({column: np.arange(1, n + 1, dtype=np.int64), **cols})
