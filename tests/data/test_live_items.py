"""`funnelrec data append --live-items`: the items a service added while serving (POST
/v1/items, kept in its state database) merged into the dataset's items table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data import append as append_module
from funnelrec.data.append import LiveItems, append_events
from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import import_events
from funnelrec.errors import ArtifactError, DataError
from funnelrec.serving.state import AddedItem, UserStateStore, read_live_items

MAPPING = """\
[watches]
path = "w.csv"
user = "u"
item = "i"
time = "t"

[items]
path = "it.csv"
item = "i"
channel = "c"
topic = "topic"
title = "title"
upload_time = "up"
duration = "dur"
"""
DAY_1 = {
    "w.csv": "u,i,t\na,x,100\nb,y,101\na,y,102\n",
    "it.csv": "i,c,topic,title,up,dur\nx,ch-a,cats,cat video,50,60\n"
    "y,ch-b,dogs,dog video,60,30.5\n",
    "map.toml": MAPPING,
}
# day 2: a watch of live item L1 (by its external id), a new item z, and an items row for
# L1 that says otherwise than the service did
DAY_2 = {
    "w2.csv": "u,i,t\na,L1,200\nb,z,201\n",
    "it2.csv": "i,c,topic,title,up,dur\nL1,ch-a,cats,another title,150,10\n",
}


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """Day 1 imported: items x (channel ch-a = 1) and y (ch-b = 2)."""
    _write(tmp_path, {**DAY_1, **DAY_2})
    import_events(tmp_path / "map.toml", tmp_path / "ds")
    return tmp_path / "ds"


def _store(ds: Path, path: Path, items: list[tuple[AddedItem, int]]) -> Path:
    """A service's state database, seeded from `ds`, with `items` added (item, first id)."""
    store = UserStateStore(path)
    store.seed(None, None, None, fingerprint=Dataset.open(ds).fingerprint())
    for item, first_id in items:
        store.add_item(item, first_id)
    store.close()
    return path


def _live(ds: Path, tmp_path: Path) -> Path:
    """The service served the 2 items of day 1 and added L2 (item 3), then L1 (item 4)."""
    return _store(
        ds,
        tmp_path / "state.db",
        [
            (AddedItem(0, "L2", 2, None, "second live", 140, 12.0), 3),
            (AddedItem(0, "L1", 1, "cats", "first live", 130, 20.0), 3),
        ],
    )


def _raw_ids(ds: Dataset) -> list[str]:
    return [str(r) for r in ds.id_map("item").sort_by("id").column("raw_id").to_pylist()]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_live_items_take_the_next_ids_before_the_logs_new_ones(ds: Path, tmp_path: Path) -> None:
    state = _live(ds, tmp_path)
    logs = {"watches": [str(tmp_path / "w2.csv")], "items": [str(tmp_path / "it2.csv")]}
    result = append_events(ds, logs, live_items=read_live_items(state))

    data = Dataset.open(ds)
    # the service's own ids (3, 4): this dataset is the one it served
    assert _raw_ids(data) == ["x", "y", "L2", "L1", "z"]
    items = {r["item_id"]: r for r in data.table("items").to_pylist()}
    assert items[3] == {
        "item_id": 3, "upload_ts": 140, "duration_s": 12.0, "channel_id": 2, "topic": None,
        "title": "second live",
    }  # fmt: skip
    # the live item's metadata, not the logs' later row of it (a known id's row is kept)
    assert items[4]["title"] == "first live" and items[4]["upload_ts"] == 130
    assert items[5]["title"] is None  # z: the logs gave it no row
    watches = data.table("watches").to_pylist()
    assert [(w["item_id"], w["ts"]) for w in watches[-2:]] == [(4, 200), (5, 201)]

    period = result.period
    assert period["rows"]["items"] == 3 and period["new_ids"]["item"] == 3
    assert period["known_metadata_rows"] == {"items": 1}
    assert period["live_items"] == {
        "from": str(state), "rows": 2, "new": 2, "known": 0, "conflicting": 0,
        "conflicting_ids": [], "renumbered": 0,
    }  # fmt: skip
    assert data.manifest.extra["periods"][-1]["live_items"]["new"] == 2
    assert result.row_counts["items"] == 5


def test_known_items_keep_their_row_and_a_conflict_is_counted(ds: Path, tmp_path: Path) -> None:
    state = _store(
        ds,
        tmp_path / "state.db",
        [
            (AddedItem(0, "x", 1, "cats", "cat video", 50, 60.0), 1),  # as the dataset has it
            (AddedItem(0, "y", 2, "dogs", "a dog video, retitled", 60, 30.5), 1),
            (AddedItem(0, "L9", 1, None, "nine", 90, 9.0), 10),  # numbered by another catalogue
        ],
    )
    result = append_events(ds, live_items=read_live_items(state))  # no logs: live items alone
    live = result.period["live_items"]
    assert (live["new"], live["known"], live["conflicting"]) == (1, 2, 1)
    assert live["conflicting_ids"] == ["y"] and live["renumbered"] == 1
    data = Dataset.open(ds)
    assert _raw_ids(data) == ["x", "y", "L9"]
    titles = data.table("items").column("title").to_pylist()
    assert titles == ["cat video", "dog video", "nine"]  # the dataset's metadata wins
    assert result.period["time_range"] == {"min_ts": None, "max_ts": None}

    # again: every live item is in the dataset, and there are no logs
    with pytest.raises(DataError, match="nothing to append"):
        append_events(ds, live_items=read_live_items(state))


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("duration_s = -1", r"live item 'L1', field 'duration_s': -1.0 is not a duration in s"),
        ("upload_ts = 'yesterday'", r"field 'upload_ts': 'yesterday' is not a time in s"),
        (
            "channel_id = 99",
            r"'channel_id': unknown channel 99 \(the dataset's channel ids run 1\.\.2\)",
        ),
        ("title = x'00ff'", r"live item 'L1', field 'title': b'\\x00\\xff' is not text"),
        ("raw_id = '  '", r"live item 2 \(service item id 4\), field 'raw_id': missing value"),
    ],
)
def test_bad_live_rows_are_refused_naming_the_item_and_field(
    ds: Path, tmp_path: Path, sql: str, message: str
) -> None:
    state = _live(ds, tmp_path)
    with sqlite3.connect(state) as db:
        db.execute(f"UPDATE items SET {sql} WHERE raw_id = 'L1'")
    before = _snapshot(ds)
    with pytest.raises(DataError, match=message) as err:
        append_events(ds, live_items=read_live_items(state))
    assert str(err.value).startswith(f"{state}: ")
    assert _snapshot(ds) == before


def test_live_items_of_other_data_or_columns_the_dataset_lacks_are_refused(
    ds: Path, tmp_path: Path
) -> None:
    rows = [{"item_id": 3, "raw_id": "L1", "channel_id": 1, "topic": None, "title": "t",
             "upload_ts": 1, "duration_s": 1.0}]  # fmt: skip
    with pytest.raises(DataError, match="seeded from data 0123456789abcdef, not from"):
        append_events(ds, live_items=LiveItems(rows, "db", seeded_from="0123456789abcdef"))
    with pytest.raises(DataError, match="duplicate item"):
        append_events(ds, live_items=LiveItems([rows[0], {**rows[0], "item_id": 4}], "db"))

    (tmp_path / "bare.toml").write_text(
        MAPPING.replace('title = "title"\n', "").replace('topic = "topic"\n', "")
    )
    import_events(tmp_path / "bare.toml", tmp_path / "bare")
    with pytest.raises(DataError, match="items table has no column 'title': live item 'L1'"):
        append_events(tmp_path / "bare", live_items=LiveItems(rows, "db"))
    untitled = [{**rows[0], "title": None}]
    append_events(tmp_path / "bare", live_items=LiveItems(untitled, "db"))
    assert _raw_ids(Dataset.open(tmp_path / "bare")) == ["x", "y", "L1"]


def test_an_interrupted_merge_leaves_the_dataset_as_it_was(
    ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _live(ds, tmp_path)
    before = _snapshot(ds)

    def crash(old: Path, new: Path, out: Path) -> None:
        out.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(append_module, "append_file", crash)
    with pytest.raises(KeyboardInterrupt):
        append_events(ds, live_items=read_live_items(state))
    assert _snapshot(ds) == before


def test_the_state_database_is_read_read_only(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such state database"):
        read_live_items(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ArtifactError, match="not a usable state database"):
        read_live_items(tmp_path / "other.db")
    store = UserStateStore(tmp_path / "empty.db")
    store.close()
    assert read_live_items(tmp_path / "empty.db").rows == []


def test_cli_append_with_live_items(ds: Path, tmp_path: Path) -> None:
    state = _live(ds, tmp_path)
    args = ["data", "append", str(ds), str(tmp_path / "w2.csv"), "--live-items", str(state)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "period 2: 2 watches, 3 items" in result.output
    assert "live items: 2 merged, 0 known (0 with other metadata" in result.output
    # items the service adds from now on are numbered above the grown catalogue (x, y,
    # L2, L1, z): the next artifact's ids are not given to other items
    assert UserStateStore(state).meta("items_reserved_through") == "5"


def test_a_merge_is_kept_when_the_ids_cannot_be_reserved(
    ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import funnelrec.cli.data as data_cli

    def locked(path: Path, through: int) -> None:
        raise ArtifactError(f"{path}: cannot reserve the item ids 1..{through} (locked)")

    monkeypatch.setattr(data_cli, "reserve_live_item_ids", locked)
    state = _live(ds, tmp_path)
    result = CliRunner().invoke(app, ["data", "append", str(ds), "--live-items", str(state)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "warning:" in said and "cannot reserve the item ids 1..4 (locked)" in said
    assert _raw_ids(Dataset.open(ds)) == ["x", "y", "L2", "L1"]
