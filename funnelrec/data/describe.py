"""What is in a dataset: counts, time range, activity and popularity percentiles.

    funnelrec data describe /tmp/ml100k

Tables are streamed in record batches, so describing a large dataset needs memory for
the per-user and per-item counters only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.table import Table

from funnelrec.data.dataset import Dataset


@dataclass(frozen=True)
class Spread:
    """Percentiles of a count per entity (events per user, watches per item, ...)."""

    p50: float
    p90: float
    p99: float
    max: int
    zero: int  # entities with a count of 0

    @classmethod
    def of(cls, counts: np.ndarray) -> Spread:
        if counts.size == 0:
            return cls(0.0, 0.0, 0.0, 0, 0)
        p50, p90, p99 = np.percentile(counts, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), int(counts.max()), int((counts == 0).sum()))


@dataclass(frozen=True)
class Description:
    path: Path
    source: str
    row_counts: dict[str, int]
    min_ts: int | None
    max_ts: int | None
    synthetic_timestamps: bool
    optional_columns: dict[str, list[str]]
    id_maps: list[str]
    user_activity: Spread  # watches per user, over every user of the users table
    item_popularity: Spread  # watches per item, over every item of the items table
    impressions_per_request: Spread | None  # page sizes, where impressions exist
    watch_time_known: float  # share of watches with a watch_time_s (MovieLens: 0)


def _counts_per(ds: Dataset, table: str, column: str, ids: np.ndarray) -> np.ndarray:
    """How often each of `ids` occurs in `table.column` (0 for ids that never do)."""
    size = int(ids.max()) + 1 if ids.size else 1
    counts = np.zeros(size, dtype=np.int64)
    for batch in ds.batches(table, columns=[column]):
        values = batch.column(0).to_numpy()
        if values.size and int(values.max()) >= counts.size:
            counts = np.pad(counts, (0, int(values.max()) + 1 - counts.size))
        counts += np.bincount(values, minlength=counts.size)
    return counts[ids]


def describe(path: Path | str) -> Description:
    """Summarise the dataset at `path`."""
    ds = Dataset.open(path)
    m = ds.manifest
    users = ds.table("users", columns=["user_id"]).column(0).to_numpy()
    items = ds.table("items", columns=["item_id"]).column(0).to_numpy()
    per_request = None
    if ds.has("impressions"):
        requests = ds.table("impressions", columns=["request_id"]).column(0).to_numpy()
        per_request = Spread.of(np.unique(requests, return_counts=True)[1])
    unknown = sum(b.column(0).null_count for b in ds.batches("watches", columns=["watch_time_s"]))
    n_watches = max(ds.num_rows("watches"), 1)
    return Description(
        path=Path(path),
        source=m.source,
        row_counts=dict(m.row_counts),
        min_ts=m.time_range.get("min_ts"),
        max_ts=m.time_range.get("max_ts"),
        synthetic_timestamps=m.synthetic_timestamps,
        optional_columns={k: list(v) for k, v in m.optional_columns.items()},
        id_maps=sorted(m.id_maps),
        user_activity=Spread.of(_counts_per(ds, "watches", "user_id", users)),
        item_popularity=Spread.of(_counts_per(ds, "watches", "item_id", items)),
        impressions_per_request=per_request,
        watch_time_known=1.0 - unknown / n_watches,
    )


def _when(ts: int | None, synthetic: bool) -> str:
    if ts is None:
        return "-"
    if synthetic:
        return f"{ts:,} (synthetic: position in sequence)"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(d: Description) -> Group:
    """Rich tables of a `Description`: counts and facts, then count percentiles."""
    facts = Table(title=f"{d.path} (source: {d.source})", show_header=False)
    facts.add_column("what", style="bold")
    facts.add_column("value")
    for name in ("users", "items", "watches", "searches", "impressions"):
        count = d.row_counts.get(name)
        facts.add_row(name, f"{count:,}" if count is not None else "absent")
    facts.add_row("first event", _when(d.min_ts, d.synthetic_timestamps))
    facts.add_row("last event", _when(d.max_ts, d.synthetic_timestamps))
    facts.add_row("watch time known", f"{d.watch_time_known:.0%} of watches")
    for name, cols in d.optional_columns.items():
        facts.add_row(f"{name}: optional columns", ", ".join(cols) if cols else "none")
    facts.add_row("id maps", ", ".join(d.id_maps) if d.id_maps else "none")

    spreads = Table(title="counts per entity")
    for header in ("count", "p50", "p90", "p99", "max", "zero"):
        spreads.add_column(header, justify="left" if header == "count" else "right")
    rows = [("watches per user", d.user_activity), ("watches per item", d.item_popularity)]
    if d.impressions_per_request is not None:
        rows.append(("impressions per request", d.impressions_per_request))
    for name, s in rows:
        spreads.add_row(name, f"{s.p50:g}", f"{s.p90:g}", f"{s.p99:g}", f"{s.max:,}", f"{s.zero:,}")
    return Group(facts, spreads)
