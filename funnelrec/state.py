"""Live user state for serving: recent watches, searches and impression counts in SQLite.

Recommendations must react to what a user just did. The store is an embedded SQLite
database in WAL mode with `synchronous=FULL`: `append` returns only after its transaction
is committed to disk, so an acknowledged event survives the server being killed.

It is seeded once from a dataset's latest state (each user's last N watches and queries
and all impression counts) and then grows with the events the service receives.

    store = UserStateStore(path)
    store.seed_from_dataset(Dataset.open(DIR))
    store.append([WatchEvent(user_id=7, item_id=42, ts=1767225600)])
    ctx = store.context(7)          # ctx.history[-1] == 42
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.dataset import Dataset
from funnelrec.errors import ArtifactError, DataError

STATE_FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS watches (
    user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, ts INTEGER NOT NULL,
    watch_time_s REAL);
CREATE INDEX IF NOT EXISTS watches_user_ts ON watches (user_id, ts);
CREATE TABLE IF NOT EXISTS searches (
    user_id INTEGER NOT NULL, ts INTEGER NOT NULL, query TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS searches_user_ts ON searches (user_id, ts);
CREATE TABLE IF NOT EXISTS impressions (
    user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, shown INTEGER NOT NULL,
    last_ts INTEGER NOT NULL, PRIMARY KEY (user_id, item_id));
"""


@dataclass(frozen=True)
class WatchEvent:
    user_id: int
    item_id: int
    ts: int
    watch_time_s: float | None = None


@dataclass(frozen=True)
class SearchEvent:
    user_id: int
    ts: int
    query: str


@dataclass(frozen=True)
class ImpressionEvent:
    user_id: int
    item_id: int
    ts: int


Event = WatchEvent | SearchEvent | ImpressionEvent


@dataclass(frozen=True)
class UserContext:
    """What the store knows of a user at request time; lists are oldest first."""

    user_id: int
    history: list[int] = field(default_factory=list)
    history_ts: list[int] = field(default_factory=list)  # watch times, aligned with history
    queries: list[str] = field(default_factory=list)
    queries_ts: list[int] = field(default_factory=list)
    shown: dict[int, int] = field(default_factory=dict)  # item id -> times already shown
    last_ts: int | None = None


class UserStateStore:
    """Thread-safe store of users' recent activity (one connection, one lock)."""

    def __init__(self, path: Path | str, *, history_length: int = 50) -> None:
        self.path = Path(path)
        self.history_length = history_length
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ArtifactError(f"{self.path}: not a usable state database ({e})") from None
        self._lock = threading.Lock()
        version = self.meta("format_version")
        if version is None:
            self._set_meta({"format_version": str(STATE_FORMAT_VERSION)})
        elif version != str(STATE_FORMAT_VERSION):
            raise ArtifactError(
                f"{self.path}: state format version {version}, expected {STATE_FORMAT_VERSION}"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items())
            )

    def seed_from_dataset(self, ds: Dataset, *, fingerprint: str | None = None) -> None:
        """Load each user's last N watches and queries and all impression counts.

        Seeding twice from the same data is a no-op; seeding a store that already holds
        another dataset's state is refused (it would mix two worlds).
        """
        fingerprint = fingerprint or ds.fingerprint()
        seeded = self.meta("seeded_from")
        if seeded == fingerprint:
            return
        if seeded is not None:
            raise ArtifactError(
                f"{self.path}: state was seeded from data {seeded}, not {fingerprint}"
            )
        n = self.history_length
        watches = _last_n_per_user(
            ds.table("watches", ["user_id", "item_id", "ts", "watch_time_s"]), n
        )
        rows_w = zip(
            watches["user_id"].to_pylist(),
            watches["item_id"].to_pylist(),
            watches["ts"].to_pylist(),
            watches["watch_time_s"].to_pylist(),
            strict=True,
        )
        rows_s: Iterable[tuple[int, int, str]] = ()
        if ds.has("searches"):
            searches = _last_n_per_user(ds.table("searches", ["user_id", "ts", "query"]), n)
            rows_s = zip(
                searches["user_id"].to_pylist(),
                searches["ts"].to_pylist(),
                searches["query"].to_pylist(),
                strict=True,
            )
        rows_i: Iterable[tuple[int, int, int, int]] = ()
        if ds.has("impressions"):
            imp = ds.table("impressions", ["user_id", "item_id", "ts"])
            counts = imp.group_by(["user_id", "item_id"]).aggregate(
                [("ts", "count"), ("ts", "max")]
            )
            rows_i = zip(
                counts["user_id"].to_pylist(),
                counts["item_id"].to_pylist(),
                counts["ts_count"].to_pylist(),
                counts["ts_max"].to_pylist(),
                strict=True,
            )
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO watches VALUES (?, ?, ?, ?)", rows_w)
                self._db.executemany("INSERT INTO searches VALUES (?, ?, ?)", rows_s)
                self._db.executemany("INSERT INTO impressions VALUES (?, ?, ?, ?)", rows_i)
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('seeded_from', ?)",
                    (fingerprint,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def append(self, events: Sequence[Event]) -> int:
        """Append events in one transaction; returns only once it is committed."""
        for i, ev in enumerate(events):
            _check_event(ev, i)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for ev in events:
                    if isinstance(ev, WatchEvent):
                        self._db.execute(
                            "INSERT INTO watches VALUES (?, ?, ?, ?)",
                            (ev.user_id, ev.item_id, ev.ts, ev.watch_time_s),
                        )
                    elif isinstance(ev, SearchEvent):
                        self._db.execute(
                            "INSERT INTO searches VALUES (?, ?, ?)", (ev.user_id, ev.ts, ev.query)
                        )
                    else:
                        self._db.execute(
                            "INSERT INTO impressions VALUES (?, ?, 1, ?) ON CONFLICT(user_id, "
                            "item_id) DO UPDATE SET shown = shown + 1, last_ts = max(last_ts, "
                            "excluded.last_ts)",
                            (ev.user_id, ev.item_id, ev.ts),
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(events)

    def context(self, user_id: int) -> UserContext:
        """The user's last N watches and queries (oldest first) and impression counts."""
        n = self.history_length
        with self._lock:
            w = self._db.execute(
                "SELECT item_id, ts FROM watches WHERE user_id = ? ORDER BY ts DESC, rowid DESC "
                "LIMIT ?",
                (user_id, n),
            ).fetchall()
            s = self._db.execute(
                "SELECT query, ts FROM searches WHERE user_id = ? ORDER BY ts DESC, rowid DESC "
                "LIMIT ?",
                (user_id, n),
            ).fetchall()
            i = self._db.execute(
                "SELECT item_id, shown FROM impressions WHERE user_id = ?", (user_id,)
            ).fetchall()
        last = max([r[1] for r in w] + [r[1] for r in s], default=None)
        return UserContext(
            user_id=user_id,
            history=[int(r[0]) for r in reversed(w)],
            history_ts=[int(r[1]) for r in reversed(w)],
            queries=[str(r[0]) for r in reversed(s)],
            queries_ts=[int(r[1]) for r in reversed(s)],
            shown={int(item): int(cnt) for item, cnt in i},
            last_ts=last,
        )

    def known_user(self, user_id: int) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM watches WHERE user_id = ? UNION ALL "
                "SELECT 1 FROM searches WHERE user_id = ? LIMIT 1",
                (user_id, user_id),
            ).fetchone()
        return row is not None


def _check_event(ev: Event, index: int) -> None:
    where = f"event {index}"
    if ev.user_id < 1:
        raise DataError(f"{where}: user_id must be >= 1, got {ev.user_id}")
    if isinstance(ev, WatchEvent | ImpressionEvent) and ev.item_id < 1:
        raise DataError(f"{where}: item_id must be >= 1, got {ev.item_id}")
    if isinstance(ev, WatchEvent) and ev.watch_time_s is not None and not ev.watch_time_s >= 0:
        raise DataError(f"{where}: watch_time_s must be >= 0, got {ev.watch_time_s}")
    if isinstance(ev, SearchEvent) and not ev.query.strip():
        raise DataError(f"{where}: query is empty")


def _last_n_per_user(table: pa.Table, n: int) -> pa.Table:
    """The last `n` rows of each user by ts (ties keep file order), sorted by user, ts."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        pa.table({"u": table["user_id"], "t": table["ts"], "r": np.arange(table.num_rows)}),
        sort_keys=[("u", "ascending"), ("t", "ascending"), ("r", "ascending")],
    )
    table = table.take(order)
    users = table["user_id"].to_numpy()
    # Position of each row from the end of its user's run.
    ends = np.r_[np.flatnonzero(np.diff(users)), users.size - 1]
    run_end = np.repeat(ends, np.diff(np.r_[-1, ends]))
    keep = (run_end - np.arange(users.size)) < n
    return table.filter(pa.array(keep))
