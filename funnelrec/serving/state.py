"""Live user state for serving: recent watches, searches and impression counts in SQLite.

Recommendations must react to what a user just did. The store is an embedded SQLite
database in WAL mode with `synchronous=FULL`: `append` returns only after its transaction
is committed to disk, so an acknowledged event survives the server being killed.

It is seeded once from a dataset's latest state (each user's last N watches and queries
and all impression counts) and then grows with the events the service receives.

    store = UserStateStore(path)
    store.seed_from_dataset(Dataset.open(DIR))      # or store.seed(watches, searches, ...)
    store.append([WatchEvent(user_id=7, item_id=42, ts=1767225600)])
    ctx = store.context(7)          # ctx.history[-1] == 42

Layout: one row per user (table `users`) holding the user's last N watches, last N queries
and every impression count with the time last shown. A row per user, not per event, makes
seeding cost a row per user, not a row per (user, item) impression pair (docs/scale.md,
"One machine, bounded memory"), and a request's read one primary-key lookup. `append`
reads the rows of the users it touches, adds the events and writes them back, all in one
transaction. The columns are plain data, no pickle:

    watches      BLOB  [k] records of (item_id int64, ts int64, watch_time_s float64, NaN =
                       unknown), little-endian, oldest first (equal times: arrival order)
    searches     TEXT  JSON [[ts, query], ...], oldest first
    impressions  BLOB  [m] records of (item_id int64, shown int64, last_ts int64), by item

Table `items` holds the items added while serving (POST /v1/items, `add_item`), a row
each with the item id the store gave it: the served catalogue adds them at every load,
and the daily path merges them into the dataset (`read_live_items`, then `funnelrec data
append --live-items`), after which the artifact's catalogue holds them itself.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.append import LiveItems
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, DataError

STATE_FORMAT_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY, watches BLOB NOT NULL, searches TEXT NOT NULL,
    impressions BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY, raw_id TEXT NOT NULL UNIQUE, channel_id INTEGER NOT NULL,
    topic TEXT, title TEXT NOT NULL, upload_ts INTEGER NOT NULL, duration_s REAL NOT NULL);
"""
_WATCH = np.dtype([("item", "<i8"), ("ts", "<i8"), ("watch_time", "<f8")])
_SHOWN = np.dtype([("item", "<i8"), ("shown", "<i8"), ("last_ts", "<i8")])


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
class AddedItem:
    """An item added to the catalogue while serving (POST /v1/items), as stored.

    item_id: its dataset item id, given by the store (above every catalogue id then)
    raw_id:  the external id, as text (the catalogue's `raw_id`)
    """

    item_id: int
    raw_id: str
    channel_id: int
    topic: str | None
    title: str
    upload_ts: int
    duration_s: float

    def same_content(self, other: AddedItem) -> bool:
        """Whether `other` says the same of the item (its item id aside)."""
        # The catalogue keeps durations as float32: equal to within its precision.
        return (self.raw_id, self.channel_id, self.topic, self.title, self.upload_ts) == (
            other.raw_id, other.channel_id, other.topic, other.title, other.upload_ts
        ) and math.isclose(self.duration_s, other.duration_s, rel_tol=1e-6)  # fmt: skip


@dataclass(frozen=True)
class UserContext:
    """What the store knows of a user at request time; lists are oldest first."""

    user_id: int
    history: list[int] = field(default_factory=list)
    history_ts: list[int] = field(default_factory=list)  # watch times, aligned with history
    queries: list[str] = field(default_factory=list)
    queries_ts: list[int] = field(default_factory=list)
    shown: dict[int, int] = field(default_factory=dict)  # item id -> times already shown
    shown_ts: dict[int, int] = field(default_factory=dict)  # item id -> when last shown
    last_ts: int | None = None  # the latest watch or search


@dataclass
class _Row:
    """One user's state, unpacked (see the module docstring for the packed form)."""

    watches: np.ndarray  # [k] _WATCH, by ts
    searches: list[tuple[int, str]]  # by ts
    shown: np.ndarray  # [m] _SHOWN, by item

    @classmethod
    def empty(cls) -> _Row:
        return cls(np.zeros(0, _WATCH), [], np.zeros(0, _SHOWN))

    @classmethod
    def unpack(cls, watches: bytes, searches: str, shown: bytes) -> _Row:
        try:
            return cls(
                np.frombuffer(watches, dtype=_WATCH),
                [(int(t), str(q)) for t, q in json.loads(searches)],
                np.frombuffer(shown, dtype=_SHOWN),
            )
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"state database: a user's row is corrupt ({e})") from None

    def pack(self) -> tuple[bytes, str, bytes]:
        return (
            self.watches.astype(_WATCH, copy=False).tobytes(),
            json.dumps(self.searches, ensure_ascii=False),
            self.shown.astype(_SHOWN, copy=False).tobytes(),
        )

    def then(self, later: _Row, n: int) -> _Row:
        """This state followed by `later`'s events, keeping the last `n` watches and queries."""
        watches = np.concatenate([self.watches, later.watches])
        watches = watches[np.argsort(watches["ts"], kind="stable")][-n:]
        searches = sorted(self.searches + later.searches, key=lambda s: s[0])[-n:]
        return _Row(watches, searches, _sum_shown(np.concatenate([self.shown, later.shown])))


class UserStateStore:
    """Thread-safe store of users' recent activity (one connection, one lock).

    history_length: watches and queries kept per user (the last ones by time) [50]
    """

    def __init__(self, path: Path | str, *, history_length: int = 50) -> None:
        self.path = Path(path)
        self.history_length = history_length
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ArtifactError(f"{self.path}: not a usable state database ({e})") from None
        version = self.meta("format_version")
        if version is None:
            self._set_meta({"format_version": str(STATE_FORMAT_VERSION)})
        elif version == "1":
            self._migrate_v1()
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

    # ---------------------------------------------------------------- seeding

    def seed_from_dataset(self, ds: Dataset, *, fingerprint: str | None = None) -> None:
        """Load each user's last N watches and queries and all impression counts.

        Seeding twice from the same data is a no-op; seeding a store that already holds
        another dataset's state is refused (it would mix two worlds).
        """
        fingerprint = fingerprint or ds.fingerprint()
        if not self._check_seed(fingerprint):
            return
        watches = ds.table("watches", ["user_id", "item_id", "ts", "watch_time_s"])
        searches = ds.table("searches", ["user_id", "ts", "query"]) if ds.has("searches") else None
        impressions = None
        if ds.has("impressions"):
            imp = ds.table("impressions", ["user_id", "item_id", "ts"])
            agg = imp.group_by(["user_id", "item_id"]).aggregate([("ts", "count"), ("ts", "max")])
            impressions = pa.table(
                {
                    "user_id": agg["user_id"],
                    "item_id": agg["item_id"],
                    "shown": agg["ts_count"],
                    "last_ts": agg["ts_max"],
                }
            )
        self.seed(watches, searches, impressions, fingerprint=fingerprint)

    def seed(
        self,
        watches: pa.Table | None,
        searches: pa.Table | None,
        impressions: pa.Table | None,
        *,
        fingerprint: str,
    ) -> None:
        """Seed from tables: the state of data `fingerprint` (once; see `seed_from_dataset`).

        watches:     user_id, item_id, ts[, watch_time_s]  (any order, any number per user)
        searches:    user_id, ts, query
        impressions: user_id, item_id, shown, last_ts      (times shown, when last shown)
        Only the last `history_length` watches and queries of each user are kept.
        """
        if not self._check_seed(fingerprint):
            return
        rows = _rows_from_tables(watches, searches, impressions, self.history_length)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # Another process on this database may have seeded it since the check.
                cur = self._db.execute("SELECT value FROM meta WHERE key = 'seeded_from'")
                found = cur.fetchone()
                if found is None:
                    existing = self._read_rows(list(rows))
                    for user, stored in existing.items():  # events appended before the seed
                        seeded = _Row.unpack(*rows[user]).then(stored, self.history_length)
                        rows[user] = list(seeded.pack())
                    self._write_packed(rows)
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('seeded_from', ?)",
                        (fingerprint,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if found is not None and found[0] != fingerprint:
            raise ArtifactError(
                f"{self.path}: state was seeded from data {found[0]}, not {fingerprint}"
            )

    def _check_seed(self, fingerprint: str) -> bool:
        """Whether to seed with data `fingerprint` (False: already seeded with it)."""
        seeded = self.meta("seeded_from")
        if seeded == fingerprint:
            return False
        if seeded is not None:
            raise ArtifactError(
                f"{self.path}: state was seeded from data {seeded}, not {fingerprint}"
            )
        return True

    def _migrate_v1(self) -> None:
        """Repack a format-1 store (a row per event) into rows per user, events kept."""
        db = self._db

        def table(sql: str, names: list[str]) -> pa.Table:
            rows = db.execute(sql).fetchall()
            return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})

        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                watches = table(
                    "SELECT user_id, item_id, ts, watch_time_s FROM watches ORDER BY rowid",
                    ["user_id", "item_id", "ts", "watch_time_s"],
                )
                searches = table(
                    "SELECT user_id, ts, query FROM searches ORDER BY rowid",
                    ["user_id", "ts", "query"],
                )
                shown = table(
                    "SELECT user_id, item_id, shown, last_ts FROM impressions",
                    ["user_id", "item_id", "shown", "last_ts"],
                )
                rows = _rows_from_tables(watches, searches, shown, self.history_length)
                self._write_packed(rows)
                db.execute("DROP TABLE watches")
                db.execute("DROP TABLE searches")
                db.execute("DROP TABLE impressions")
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('format_version', ?)",
                    (str(STATE_FORMAT_VERSION),),
                )
                db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                db.execute("ROLLBACK")
                raise ArtifactError(
                    f"{self.path}: cannot upgrade the state database ({e})"
                ) from None
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # ---------------------------------------------------------------- events

    def append(self, events: Sequence[Event]) -> int:
        """Append events in one transaction; returns only once it is committed."""
        for i, ev in enumerate(events):
            _check_event(ev, i)
        watches: dict[int, list[tuple[int, int, float]]] = {}
        searches: dict[int, list[tuple[int, str]]] = {}
        shown: dict[int, list[tuple[int, int, int]]] = {}
        for ev in events:
            if isinstance(ev, WatchEvent):
                wt = float("nan") if ev.watch_time_s is None else ev.watch_time_s
                watches.setdefault(ev.user_id, []).append((ev.item_id, ev.ts, wt))
            elif isinstance(ev, SearchEvent):
                searches.setdefault(ev.user_id, []).append((ev.ts, ev.query))
            else:
                shown.setdefault(ev.user_id, []).append((ev.item_id, 1, ev.ts))
        later = {
            user: _Row(
                np.array(watches.get(user, []), dtype=_WATCH),
                searches.get(user, []),
                _sum_shown(np.array(shown.get(user, []), dtype=_SHOWN)),
            )
            for user in {ev.user_id for ev in events}
        }
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._read_rows(list(later))
                self._write_rows(
                    {
                        user: rows.get(user, _Row.empty()).then(row, self.history_length)
                        for user, row in later.items()
                    }
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(events)

    def _read_rows(self, users: list[int]) -> dict[int, _Row]:
        """Stored rows of `users` (those that have one); the caller holds the lock."""
        out: dict[int, _Row] = {}
        for lo in range(0, len(users), 500):  # SQLite's bound-parameter limit
            chunk = users[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            for user, w, s, i in self._db.execute(
                "SELECT user_id, watches, searches, impressions FROM users "
                f"WHERE user_id IN ({marks})",
                chunk,
            ):
                out[int(user)] = _Row.unpack(w, s, i)
        return out

    def _write_rows(self, rows: dict[int, _Row]) -> None:
        self._write_packed({user: list(row.pack()) for user, row in rows.items()})

    def _write_packed(self, rows: dict[int, _Packed]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)",
            ((user, *row) for user, row in rows.items()),
        )

    # ---------------------------------------------------------------- added items

    def add_item(self, item: AddedItem, first_id: int) -> tuple[AddedItem, bool]:
        """Store `item` under a new item id (its `item_id` is ignored): the smallest above
        `first_id - 1`, every stored one and the reserved ones (`reserve_item_ids`).
        Returns (the stored item, created); an item of the same raw id already stored is
        returned as it is, not created (the caller compares the content). Returns only
        once the transaction is committed.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE raw_id = ?", (item.raw_id,)
                ).fetchone()
                if found is not None:
                    self._db.execute("COMMIT")
                    return _added_item(found), False
                top = self._db.execute("SELECT max(item_id) FROM items").fetchone()[0]
                reserved = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'items_reserved_through'"
                ).fetchone()
                floor = int(reserved[0]) if reserved is not None else 0
                stored = replace(item, item_id=max(first_id, (top or 0) + 1, floor + 1))
                self._db.execute(
                    f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    _item_row(stored),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored, True

    def reserve_item_ids(self, through: int) -> None:
        """Give the items added from now on ids above `through` (never lowers it).

        The daily path calls it once a dataset's catalogue holds items 1..`through`, the
        live ones merged among them (`funnelrec data append --live-items`): the next
        artifact numbers its items so, and an item added before the server reloads onto
        it must not take one of those ids for another item.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'items_reserved_through'"
                ).fetchone()
                if found is None or int(found[0]) < through:
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) "
                        "VALUES ('items_reserved_through', ?)",
                        (str(int(through)),),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def added_items(self, after: int = 0) -> list[AddedItem]:
        """The added items with item id above `after`, by item id."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id > ? ORDER BY item_id", (after,)
            ).fetchall()
        return [_added_item(r) for r in rows]

    def last_added_item(self) -> int:
        """The largest added item id (0: none): a cheap check for items added since."""
        with self._lock:
            top = self._db.execute("SELECT max(item_id) FROM items").fetchone()[0]
        return int(top or 0)

    # ---------------------------------------------------------------- reads

    def context(self, user_id: int) -> UserContext:
        """The user's last N watches and queries (oldest first) and impression counts."""
        n = self.history_length
        with self._lock:
            found = self._db.execute(
                "SELECT watches, searches, impressions FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
        if found is None:
            return UserContext(user_id=user_id)
        row = _Row.unpack(*found)
        w = row.watches[-n:]
        s = row.searches[-n:]
        items = row.shown["item"].tolist()
        history_ts = w["ts"].tolist()
        queries_ts = [t for t, _ in s]
        return UserContext(
            user_id=user_id,
            history=w["item"].tolist(),
            history_ts=history_ts,
            queries=[q for _, q in s],
            queries_ts=queries_ts,
            shown=dict(zip(items, row.shown["shown"].tolist(), strict=True)),
            shown_ts=dict(zip(items, row.shown["last_ts"].tolist(), strict=True)),
            last_ts=max(history_ts + queries_ts, default=None),
        )

    def known_user(self, user_id: int) -> bool:
        """Whether the user has watched or searched anything."""
        with self._lock:
            row = self._db.execute(
                "SELECT length(watches) > 0 OR searches != '[]' FROM users WHERE user_id = ?",
                (user_id,),
            ).fetchone()
        return row is not None and bool(row[0])


_ITEM_COLUMNS = "item_id, raw_id, channel_id, topic, title, upload_ts, duration_s"


def reserve_live_item_ids(path: Path | str, through: int) -> None:
    """`UserStateStore.reserve_item_ids` on the state database at `path` (which must
    exist), after its items were merged into a dataset of `through` items."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no such state database")
    try:
        store = UserStateStore(path)
        try:
            store.reserve_item_ids(through)
        finally:
            store.close()
    except sqlite3.Error as e:
        raise ArtifactError(f"{path}: cannot reserve the item ids 1..{through} ({e})") from None


def read_live_items(path: Path | str) -> LiveItems:
    """The added items of the state database at `path`, for `data.append`'s `live_items`.

    Opened read-only (a running server may keep writing; a missing file is an error, not
    a new database). The rows are as stored, unconverted: the append checks each field.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such state database")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            rows = (
                db.execute(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY item_id").fetchall()
                if "items" in tables
                else []  # a store of format 1: no added items
            )
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise ArtifactError(f"{path}: not a usable state database ({e})") from None
    names = [c.strip() for c in _ITEM_COLUMNS.split(",")]
    seeded = meta.get("seeded_from")
    return LiveItems(
        [dict(zip(names, row, strict=True)) for row in rows],
        origin=str(path),
        seeded_from=None if seeded is None else str(seeded),
    )


def _item_row(item: AddedItem) -> tuple[Any, ...]:
    return (
        item.item_id, item.raw_id, item.channel_id, item.topic, item.title, item.upload_ts,
        float(item.duration_s),
    )  # fmt: skip


def _added_item(row: Sequence[Any]) -> AddedItem:
    i, raw, channel, topic, title, up, duration = row
    return AddedItem(int(i), str(raw), int(channel), topic, str(title), int(up), float(duration))


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


def _sum_shown(shown: np.ndarray) -> np.ndarray:
    """[m] _SHOWN records with one record per item: counts added, latest time kept."""
    if shown.size <= 1:
        return shown.astype(_SHOWN)
    shown = shown[np.argsort(shown["item"], kind="stable")]
    starts = np.flatnonzero(np.r_[True, shown["item"][1:] != shown["item"][:-1]])
    if starts.size == shown.size:
        return shown
    out = np.empty(starts.size, dtype=_SHOWN)
    out["item"] = shown["item"][starts]
    out["shown"] = np.add.reduceat(shown["shown"], starts)
    out["last_ts"] = np.maximum.reduceat(shown["last_ts"], starts)
    return out


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(table.column(name), 0).to_numpy(), dtype=np.int64)


def _runs(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Users of a user-sorted column and where each one's run starts: ([U], [U + 1])."""
    if user.size == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    return user[starts], np.r_[starts, user.size]


def _last_n_order(user: np.ndarray, ts: np.ndarray, n: int) -> np.ndarray:
    """Positions of each user's last `n` rows by ts (ties: later rows are later), sorted
    by (user, ts, position)."""
    ordered = user.size < 2 or bool(
        np.all((user[1:] > user[:-1]) | ((user[1:] == user[:-1]) & (ts[1:] >= ts[:-1])))
    )
    order = (
        np.arange(user.size)
        if ordered
        else np.lexsort((np.arange(user.size), ts, user))  # last key is primary
    )
    u = user[order]
    ends = np.r_[np.flatnonzero(u[1:] != u[:-1]), u.size - 1] if u.size else np.zeros(0, int)
    run_end = np.repeat(ends, np.diff(np.r_[-1, ends]))
    return order[(run_end - np.arange(u.size)) < n]


_Packed = list[Any]  # [watches bytes, searches JSON, impressions bytes]: a packed row


def _rows_from_tables(
    watches: pa.Table | None, searches: pa.Table | None, shown: pa.Table | None, n: int
) -> dict[int, _Packed]:
    """Packed rows per user from event tables (see `UserStateStore.seed`).

    Built column by column with whole-table NumPy work and one byte slice per user, not a
    Python object per user, which was several times slower (docs/scale.md).
    """
    rows: dict[int, _Packed] = {}
    empty_w, empty_i = np.zeros(0, _WATCH).tobytes(), np.zeros(0, _SHOWN).tobytes()

    def put(users: np.ndarray, bounds: np.ndarray, col: int, packed: bytes, width: int) -> None:
        """Row `col` of each user: its byte slice of the packed records."""
        for u, lo, hi in zip(
            users.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True
        ):
            rows.setdefault(u, [empty_w, "[]", empty_i])[col] = packed[lo * width : hi * width]

    if watches is not None and watches.num_rows:
        user, ts = _ints(watches, "user_id"), _ints(watches, "ts")
        keep = _last_n_order(user, ts, n)
        rec = np.empty(keep.size, dtype=_WATCH)
        rec["item"] = _ints(watches, "item_id")[keep]
        rec["ts"] = ts[keep]
        if "watch_time_s" in watches.column_names:
            wt = pc.fill_null(watches.column("watch_time_s").cast(pa.float64()), np.nan)
            rec["watch_time"] = np.asarray(wt.to_numpy(), dtype=np.float64)[keep]
        else:
            rec["watch_time"] = np.nan
        users, bounds = _runs(user[keep])
        put(users, bounds, 0, rec.tobytes(), _WATCH.itemsize)
    if searches is not None and searches.num_rows:
        user, ts = _ints(searches, "user_id"), _ints(searches, "ts")
        keep = _last_n_order(user, ts, n)
        keep = keep[
            np.asarray(searches.column("query").is_valid().to_numpy(zero_copy_only=False))[keep]
        ]
        queries = searches.column("query").take(pa.array(keep)).to_pylist()
        # The JSON of `_Row.pack`, written a pair at a time (json.dumps per user is slower).
        pairs = [
            f"[{t},{encode_basestring(q)}]" for t, q in zip(ts[keep].tolist(), queries, strict=True)
        ]
        users, bounds = _runs(user[keep])
        texts = [
            f"[{','.join(pairs[lo:hi])}]"
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]
        for u, text in zip(users.tolist(), texts, strict=True):
            rows.setdefault(u, [empty_w, "[]", empty_i])[1] = text
    if shown is not None and shown.num_rows:
        user, item = _ints(shown, "user_id"), _ints(shown, "item_id")
        key = np.stack([user, item], axis=1)
        ordered = bool(
            np.all((user[1:] > user[:-1]) | ((user[1:] == user[:-1]) & (item[1:] > item[:-1])))
        )
        order = np.arange(user.size) if ordered else np.lexsort((item, user))
        # One record per (user, item): a table may list a pair more than once.
        starts = np.flatnonzero(np.r_[True, np.any(np.diff(key[order], axis=0) != 0, axis=1)])
        rec = np.empty(starts.size, dtype=_SHOWN)
        rec["item"] = item[order][starts]
        rec["shown"] = np.add.reduceat(_ints(shown, "shown")[order], starts)
        rec["last_ts"] = np.maximum.reduceat(_ints(shown, "last_ts")[order], starts)
        users, bounds = _runs(user[order][starts])
        put(users, bounds, 2, rec.tobytes(), _SHOWN.itemsize)
    return rows


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
