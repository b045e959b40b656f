import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from funnelrec.dataset import Dataset, DatasetWriter
from funnelrec.errors import ArtifactError, DataError
from funnelrec.state import ImpressionEvent, SearchEvent, UserStateStore, WatchEvent


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
    assert ctx.shown == {3: 1, 4: 2}
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
    assert ctx.last_ts == 101


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
        from funnelrec.state import UserStateStore, WatchEvent
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
