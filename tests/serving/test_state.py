import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import ArtifactError, DataError
from funnelrec.serving.state import ImpressionEvent, SearchEvent, UserStateStore, WatchEvent


def _dataset(tmp_path: Path) -> Dataset:
    out = tmp_path / "ds"
    with DatasetWriter(out, source="test") as w:
        w.write("users", pa.table({"user_id": [1, 2]}))
        w.write("items", pa.table({"item_id": [1, 2, 3, 4]}))
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": [1, 1, 1, 2],
                    "item_id": [1, 2, 3, 4],
                    "ts": [30, 10, 20, 5],
                    "watch_time_s": [1.0, 2.0, 3.0, 4.0],
                    "source": ["home", None, "search", "home"],
                }
            ),
        )
        w.write("searches", pa.table({"user_id": [1, 1], "ts": [15, 5], "query": ["b", "a"]}))
        w.write(
            "impressions",
            pa.table(
                {
                    "request_id": [1, 1, 2],
                    "user_id": [1, 1, 1],
                    "item_id": [3, 4, 4],
                    "ts": [1, 1, 2],
                    "position": [0, 1, 0],
                    "clicked": [False, False, True],
                    "watch_time_s": [0.0, 0.0, 9.0],
                }
            ),
        )
    return Dataset.open(out)


def test_seed_keeps_last_n_in_time_order(tmp_path: Path) -> None:
    store = UserStateStore(tmp_path / "state.db", history_length=2)
    store.seed_from_dataset(_dataset(tmp_path))
    ctx = store.context(1)
    assert ctx.history == [3, 1]  # ts 20 then 30: the last two, oldest first
    assert ctx.history_ts == [20, 30] and ctx.queries_ts == [5, 15]
    assert ctx.queries == ["a", "b"]
    assert ctx.shown == {3: 1, 4: 2} and ctx.shown_ts == {3: 1, 4: 2}
    assert ctx.last_ts == 30
    assert store.context(2).history == [4]
    assert store.context(99).history == [] and not store.known_user(99)


def test_seed_twice_same_data_is_noop_other_data_refused(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = UserStateStore(tmp_path / "state.db")
    store.seed_from_dataset(ds)
    store.seed_from_dataset(ds)
    assert store.context(1).history == [2, 3, 1]
    with pytest.raises(ArtifactError, match="seeded from data"):
        store.seed_from_dataset(ds, fingerprint="other")


def test_append_changes_context(tmp_path: Path) -> None:
    store = UserStateStore(tmp_path / "state.db")
    store.append(
        [
            WatchEvent(user_id=5, item_id=7, ts=100),
            SearchEvent(user_id=5, ts=101, query="cats"),
            ImpressionEvent(user_id=5, item_id=8, ts=102),
            ImpressionEvent(user_id=5, item_id=8, ts=103),
        ]
    )
    ctx = store.context(5)
    assert ctx.history == [7] and ctx.queries == ["cats"] and ctx.shown == {8: 2}
    assert ctx.shown_ts == {8: 103} and ctx.last_ts == 101
    assert store.known_user(5) and not store.known_user(6)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (WatchEvent(user_id=0, item_id=1, ts=1), "user_id must be >= 1"),
        (WatchEvent(user_id=1, item_id=1, ts=1, watch_time_s=-1.0), "watch_time_s must be >= 0"),
        (SearchEvent(user_id=1, ts=1, query="  "), "query is empty"),
    ],
)
def test_bad_events_rejected_and_nothing_written(tmp_path: Path, event, message: str) -> None:
    store = UserStateStore(tmp_path / "state.db")
    with pytest.raises(DataError, match=message):
        store.append([WatchEvent(user_id=1, item_id=2, ts=1), event])
    assert store.context(1).history == []


def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    script = textwrap.dedent(
        f"""
        import sys, time
        from funnelrec.serving.state import UserStateStore, WatchEvent
        store = UserStateStore({str(db)!r})
        for i in range(20):
            store.append([WatchEvent(user_id=1, item_id=i + 1, ts=i)])
            print(i, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = [int(proc.stdout.readline()) for _ in range(20)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    store = UserStateStore(db)
    assert store.context(1).history == [a + 1 for a in acked]


def test_seed_from_tables_sorts_trims_and_merges_earlier_events(tmp_path: Path) -> None:
    store = UserStateStore(tmp_path / "state.db", history_length=3)
    store.append([WatchEvent(user_id=2, item_id=9, ts=50), ImpressionEvent(2, 5, ts=60)])
    watches = pa.table(
        {
            "user_id": [2, 1, 2, 1, 1, 1, 2],
            "item_id": [4, 1, 3, 2, 3, 4, 5],
            "ts": [20, 5, 10, 5, 7, 1, 30],  # items 1 and 2 of user 1 tie: file order
            "watch_time_s": [1.0, None, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    )
    searches = pa.table(
        {"user_id": [3, 3, 3], "ts": [9, 8, 1], "query": ['"later" ü\n', "earlier", None]}
    )
    impressions = pa.table(
        {"user_id": [2, 1, 2], "item_id": [5, 8, 7], "shown": [2, 1, 4], "last_ts": [40, 3, 2]}
    )
    store.seed(watches, searches, impressions, fingerprint="abc")
    assert store.context(1).history == [1, 2, 3]  # the last three by time; item 4 dropped
    two = store.context(2)
    assert two.history == [4, 5, 9]  # seeded, then the event appended before seeding
    assert two.shown == {5: 3, 7: 4} and two.shown_ts == {5: 60, 7: 2}
    assert store.context(3).queries == ["earlier", '"later" ü\n']  # a null query is no search
    assert not store.known_user(4)
    store.seed(watches, searches, impressions, fingerprint="abc")  # same data: nothing
    assert store.context(1).history == [1, 2, 3]
    with pytest.raises(ArtifactError, match="seeded from data abc"):
        store.seed(watches, None, None, fingerprint="other")


def test_events_keep_time_order_and_the_last_n(tmp_path: Path) -> None:
    store = UserStateStore(tmp_path / "state.db", history_length=3)
    store.append([WatchEvent(1, 1, ts=10), WatchEvent(1, 2, ts=30), WatchEvent(1, 3, ts=20)])
    store.append([WatchEvent(1, 4, ts=20), WatchEvent(1, 5, ts=5)])  # 5 is too old to keep
    ctx = store.context(1)
    assert ctx.history == [3, 4, 2] and ctx.history_ts == [20, 20, 30]
    store.append([SearchEvent(1, ts=40, query="ü ß 日本")])
    assert store.context(1).queries == ["ü ß 日本"] and store.context(1).last_ts == 40


def test_a_format_1_store_is_upgraded_with_its_events(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "state.db"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE watches (user_id INTEGER NOT NULL, item_id INTEGER NOT NULL,
            ts INTEGER NOT NULL, watch_time_s REAL);
        CREATE TABLE searches (user_id INTEGER NOT NULL, ts INTEGER NOT NULL,
            query TEXT NOT NULL);
        CREATE TABLE impressions (user_id INTEGER NOT NULL, item_id INTEGER NOT NULL,
            shown INTEGER NOT NULL, last_ts INTEGER NOT NULL, PRIMARY KEY (user_id, item_id));
        INSERT INTO meta VALUES ('format_version', '1'), ('seeded_from', 'fp');
        INSERT INTO watches VALUES (1, 7, 5, NULL), (1, 8, 3, 2.0), (1, 9, 5, NULL);
        INSERT INTO searches VALUES (1, 4, 'cats');
        INSERT INTO impressions VALUES (1, 8, 3, 4);
        """
    )
    con.commit()
    con.close()
    store = UserStateStore(db)
    ctx = store.context(1)
    assert ctx.history == [8, 7, 9] and ctx.queries == ["cats"]
    assert ctx.shown == {8: 3} and ctx.shown_ts == {8: 4}
    assert store.meta("format_version") == "2" and store.meta("seeded_from") == "fp"
    store.close()
    assert UserStateStore(db).context(1) == ctx  # opened again: already upgraded
