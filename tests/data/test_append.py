"""`funnelrec data append`: a new period of logs added to a dataset (data written here)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data import append as append_module
from funnelrec.data.append import append_events, parse_new_logs
from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import import_events, import_movielens, import_sequence
from funnelrec.data.loaders.parquet_append import append_file
from funnelrec.errors import DataError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features

runner = CliRunner()

MAPPING = """\
[watches]
path = "day-1/watches.csv"
user = "user"
item = "video"
time = "ts"
watch_time = "secs"

[users]
path = "day-1/users.csv"
user = "id"
age = "age"

[impressions]
path = "day-1/impressions.csv"
user = "user"
item = "video"
time = "ts"
clicked = "click"
"""
DAY_1 = {
    "day-1/watches.csv": "user,video,ts,secs\nbob,v2,1000,5\nann,v1,1100,3\nbob,v1,1200,\n"
    "cid,v3,1300,8\nann,v3,1400,1\n",
    "day-1/users.csv": "id,age\nann,30\nbob,40\n",
    "day-1/impressions.csv": "user,video,ts,click\nann,v1,1100,1\nann,v2,1100,0\nbob,v2,1000,1\n",
}
DAY_2 = {
    "day-2/watches.csv": "user,video,ts,secs\nzed,v9,2000,2\nbob,v3,2100,4\nabe,v1,2200,6\n"
    "zed,v1,2300,1\n",
    "day-2/users.csv": "id,age\nzed,22\nbob,41\n",
    "day-2/impressions.csv": "user,video,ts,click\nzed,v9,2000,1\nzed,v1,2000,0\n",
}


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@pytest.fixture
def imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dataset of day 1; new logs (day 2) beside it; the working directory is theirs."""
    write(tmp_path, {**DAY_1, **DAY_2, "map.toml": MAPPING})
    import_events(tmp_path / "map.toml", tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "ds"


DAY_2_LOGS = {
    "watches": ["day-2/watches.csv"],
    "users": ["day-2/users.csv"],
    "impressions": ["day-2/impressions.csv"],
}


def raw_ids(ds: Dataset, space: str) -> list[str]:
    table = ds.id_map(space)
    assert table.column("id").to_pylist() == list(range(1, table.num_rows + 1))
    return table.column("raw_id").to_pylist()


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_known_ids_keep_their_numbers_new_ones_follow(imported: Path) -> None:
    before = Dataset.open(imported)
    old_watches = before.table("watches")
    result = append_events(imported, DAY_2_LOGS)
    ds = Dataset.open(imported)
    assert raw_ids(ds, "user") == ["ann", "bob", "cid", "abe", "zed"]  # new: sorted, after
    assert raw_ids(ds, "item") == ["v1", "v2", "v3", "v9"]
    assert result.row_counts == {"users": 5, "items": 4, "watches": 9, "impressions": 5}
    watches = ds.table("watches")
    assert watches.slice(0, 5).equals(old_watches)  # the old rows, as they were
    new = watches.slice(5).to_pylist()
    assert [(r["user_id"], r["item_id"], r["ts"]) for r in new] == [
        (5, 4, 2000),
        (2, 3, 2100),  # bob and v3 keep their numbers
        (4, 1, 2200),
        (5, 1, 2300),
    ]
    users = ds.table("users").to_pylist()
    # bob's age stays what day 1 said; zed's comes from day 2; abe has no users row.
    assert [u["age"] for u in users] == [30.0, 40.0, None, None, 22.0]
    imp = ds.table("impressions").to_pylist()
    assert [r["request_id"] for r in imp] == [1, 1, 2, 3, 3]  # day 2's requests follow
    assert ds.manifest.time_range == {"min_ts": 1000, "max_ts": 2300}

    period = ds.manifest.extra["periods"][-1]
    assert [p["period"] for p in ds.manifest.extra["periods"]] == [1, 2]
    assert period["rows"] == {"watches": 4, "impressions": 2, "users": 2, "items": 1}
    assert period["new_ids"] == {"user": 2, "item": 1, "channel": 0}
    assert period["known_metadata_rows"] == {"users": 1}
    assert period["time_range"] == {"min_ts": 2000, "max_ts": 2300}
    assert period["files"]["watches"] == [str(imported.parent / "day-2" / "watches.csv")]


def test_unchanged_files_are_linked_not_rewritten(imported: Path) -> None:
    inode = {n: os.stat(imported / n).st_ino for n in ("idmap_item.parquet", "items.parquet")}
    day = imported.parent / "day-3.csv"
    day.write_text("user,video,ts,secs\nann,v2,3000,1\n")  # nothing new but the watch
    append_events(imported, [str(day)])
    for name, ino in inode.items():
        assert os.stat(imported / name).st_ino == ino, name
    assert Dataset.open(imported).num_rows("watches") == 6


def test_append_twice_and_features_build(imported: Path, tmp_path: Path) -> None:
    append_events(imported, DAY_2_LOGS)
    (tmp_path / "day-3.csv").write_text("user,video,ts,secs\nann,v9,3000,1\nnew,v7,3100,2\n")
    append_events(imported, ["day-3.csv"])
    ds = Dataset.open(imported)
    assert raw_ids(ds, "user")[-1] == "new" and raw_ids(ds, "item")[-1] == "v7"
    assert [p["period"] for p in ds.manifest.extra["periods"]] == [1, 2, 3]
    for name in ("users", "items", "watches", "impressions"):
        ds.table(name)  # every value checked, ids against the users and items tables
    build_features(imported, tmp_path / "feat", config=FeaturesConfig(history_n=3), progress=False)
    assert Features.open(tmp_path / "feat").manifest


def test_late_events_are_refused_or_accepted_and_counted(imported: Path, tmp_path: Path) -> None:
    late = tmp_path / "late.csv"
    late.write_text("user,video,ts,secs\nann,v1,2000,1\nbob,v2,1399,1\n")
    before = snapshot(imported)
    with pytest.raises(DataError) as info:
        append_events(imported, [str(late)])
    message = str(info.value)
    assert "late.csv, line 3, column 'ts'" in message
    assert "time 1970-01-01T00:23:19Z is before the dataset's end 1970-01-01T00:23:20Z" in message
    assert snapshot(imported) == before

    skipped = append_events(imported, [str(late)], bad_rows="skip")
    assert skipped.period["rejected"] == {"watches": 1} and skipped.period["late"] == 0
    assert Dataset.open(imported).manifest.extra["rejected"] == {"watches": 1}
    rejected = pq.read_table(imported / "rejected" / "period-2" / "watches.parquet").to_pylist()
    assert rejected[0]["line"] == 3 and "before the dataset's end" in rejected[0]["reason"]

    late.write_text("user,video,ts,secs\nbob,v2,1500,1\n")
    accepted = append_events(imported, [str(late)], allow_late=True)
    assert accepted.period["late"] == 1
    assert accepted.period["rows"] == {"watches": 1, "users": 0, "items": 0}
    ds = Dataset.open(imported)
    assert ds.num_rows("watches") == 7
    assert (imported / "rejected" / "period-2" / "watches.parquet").exists()  # kept


def test_an_interrupted_append_leaves_the_dataset_as_it_was(
    imported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(imported)

    def crash(old: Path, new: Path, out: Path) -> None:
        out.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(append_module, "append_file", crash)
    with pytest.raises(KeyboardInterrupt):
        append_events(imported, DAY_2_LOGS)
    assert snapshot(imported) == before
    assert not [p.name for p in imported.parent.iterdir() if p.name.startswith(".ds")]
    assert Dataset.open(imported).num_rows("watches") == 5


def test_one_append_at_a_time(imported: Path) -> None:
    fd = os.open(imported, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another append to this dataset is running"):
            append_events(imported, DAY_2_LOGS)
    finally:
        os.close(fd)
    append_events(imported, DAY_2_LOGS)


def test_a_bad_row_in_the_new_period_fails_cleanly(imported: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("user,video,ts,secs\nann,v1,2000,1\nbob,,2001,1\n")
    before = snapshot(imported)
    with pytest.raises(DataError, match=r"bad\.csv, line 3, column 'video': missing value"):
        append_events(imported, ["bad.csv"])
    assert snapshot(imported) == before


def test_a_table_new_to_the_dataset(imported: Path, tmp_path: Path) -> None:
    mapping = MAPPING + '\n[searches]\npath = "s.csv"\nuser = "user"\ntime = "ts"\nquery = "q"\n'
    (tmp_path / "map2.toml").write_text(mapping)
    (tmp_path / "s.csv").write_text("user,ts,q\nann,2000,cats\nyan,2001,dogs\n")
    append_events(imported, {"searches": ["s.csv"]}, mapping=tmp_path / "map2.toml")
    ds = Dataset.open(imported)
    assert ds.table("searches").to_pylist() == [
        {"user_id": 1, "ts": 2000, "query": "cats"},
        {"user_id": 4, "ts": 2001, "query": "dogs"},
    ]
    assert ds.manifest.extra["mapping"]["searches"]["query"] == "q"


def test_channels_are_an_id_space_extended_like_the_others(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "w.csv": "u,i,t\na,x,100\nb,y,101\n",
            "it.csv": "i,c\nx,\ny,ch-b\n",
            "w2.csv": "u,i,t\na,z,200\na,q,201\n",
            "it2.csv": "i,c\nz,ch-b\nq,ch-a\nx,ch-c\n",
            "map.toml": '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
            '[items]\npath = "it.csv"\nitem = "i"\nchannel = "c"\n',
        },
    )
    import_events(tmp_path / "map.toml", tmp_path / "ds")
    append_events(
        tmp_path / "ds",
        {"watches": [str(tmp_path / "w2.csv")], "items": [str(tmp_path / "it2.csv")]},
    )
    ds = Dataset.open(tmp_path / "ds")
    assert raw_ids(ds, "channel") == ["ch-b", "ch-a"]  # x keeps its (empty) channel
    assert [r["channel_id"] for r in ds.table("items").to_pylist()] == [None, 1, 2, 1]
    assert raw_ids(ds, "item") == ["x", "y", "q", "z"]


def test_new_metadata_columns_are_refused(imported: Path, tmp_path: Path) -> None:
    (tmp_path / "map2.toml").write_text(MAPPING.replace('age = "age"', 'gender = "g"'))
    with pytest.raises(DataError, match="users table has no column 'gender'"):
        append_events(imported, {"users": ["day-2/users.csv"]}, mapping=tmp_path / "map2.toml")


def test_datasets_of_other_loaders(
    tmp_path: Path, ml100k_files: dict[str, bytes], sequence_file: Path
) -> None:
    import_sequence(sequence_file, tmp_path / "seq")
    with pytest.raises(DataError, match="synthetic"):
        append_events(tmp_path / "seq", ["x.csv"])

    (tmp_path / "ml").mkdir()
    for name, data in ml100k_files.items():
        (tmp_path / "ml" / name).write_bytes(data)
    import_movielens(tmp_path / "ml", tmp_path / "ml-ds")
    day = tmp_path / "ratings.csv"
    day.write_text("user,item,timestamp\n1,10,881250999\n7,99,881251000\n")
    with pytest.raises(DataError, match="no mapping"):
        append_events(tmp_path / "ml-ds", [str(day)])
    (tmp_path / "m.toml").write_text(
        '[watches]\npath = "ratings.csv"\nuser = "user"\nitem = "item"\ntime = "timestamp"\n'
    )
    result = append_events(tmp_path / "ml-ds", mapping=tmp_path / "m.toml")
    ds = Dataset.open(tmp_path / "ml-ds")
    assert raw_ids(ds, "user") == ["1", "2", "3", "4", "7"]
    assert ds.table("users").column("gender").to_pylist()[-1] is None
    assert [p["period"] for p in ds.manifest.extra["periods"]] == [1, 2]
    assert ds.manifest.extra["periods"][0]["source"] == "movielens"
    assert result.row_counts["watches"] == 7


def test_new_logs_arguments() -> None:
    assert parse_new_logs(["a.csv", "impressions=i/*.parquet", "b=c.csv"]) == {
        "watches": ["a.csv", "b=c.csv"],
        "impressions": ["i/*.parquet"],
    }
    with pytest.raises(DataError, match="no path"):
        parse_new_logs(["users="])


def test_cli_append(imported: Path) -> None:
    args = ["data", "append", str(imported), "day-2/watches.csv", "users=day-2/users.csv"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "period 2: 4 watches, 2 users, 1 items" in result.output
    assert "new ids: 2 users, 1 items" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "before the dataset's end" in str(again.exception)


# --- appending row groups to a Parquet file --------------------------------------------


@pytest.mark.parametrize("options", [{}, {"use_dictionary": False}, {"write_page_index": True}])
def test_append_file_keeps_old_row_groups_as_bytes(tmp_path: Path, options: dict) -> None:
    rng = np.random.default_rng(0)

    def table(n: int, start: int) -> pa.Table:
        return pa.table(
            {
                "a": np.arange(start, start + n, dtype=np.int64),
                "b": rng.random(n).astype(np.float32),
                "s": pa.array([None if i % 7 == 0 else f"x{i % 5}" for i in range(n)]),
                "f": rng.random(n) > 0.5,
            }
        )

    old, new = table(5000, 0), table(1200, 5000)
    pq.write_table(old, tmp_path / "old.parquet", row_group_size=2000, **options)
    pq.write_table(new, tmp_path / "new.parquet", row_group_size=1000, **options)
    append_file(tmp_path / "old.parquet", tmp_path / "new.parquet", tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.equals(pa.concat_tables([old, new]))
    meta = pq.read_metadata(tmp_path / "out.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [
        2000,
        2000,
        1000,
        1000,
        200,
    ]
    assert meta.row_group(4).column(0).statistics.min == 6000
    old_bytes = (tmp_path / "old.parquet").read_bytes()
    footer = int.from_bytes(old_bytes[-8:-4], "little")
    assert (tmp_path / "out.parquet").read_bytes().startswith(old_bytes[: -8 - footer])
    filtered = pq.read_table(tmp_path / "out.parquet", filters=[("a", ">=", 5500)])
    assert filtered.num_rows == 700


def test_append_file_refuses_another_schema(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"a": [1.0]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="schema"):
        append_file(tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet")
