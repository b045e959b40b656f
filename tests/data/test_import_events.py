"""`funnelrec data import events`: your own logs through a TOML mapping (files written here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data import dataset as dataset_module
from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import dense_ids, import_events
from funnelrec.data.loaders import sources as sources_module
from funnelrec.data.loaders.mapping import load_mapping
from funnelrec.data.loaders.sources import LineCounter, SourceFile
from funnelrec.errors import DataError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from tests.data.test_loaders import assert_clean_failure

runner = CliRunner()
DAY = 1714521600  # 2024-05-01T00:00:00Z

WATCHES = """\
uid,video,event_time,watched_ms,surface
alice,v-10,2024-05-01T08:00:00Z,30000,home
bob,v-2,2024-05-01T10:30:00+02:00,12500,search
alice,v-2,2024-05-01 09:00:00,,
carol,v-3,2024-05-01T12:00:00.750-01:00,40000,related
bob,v-10,2024-05-01T13:00:00Z,1000,external
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


MAPPING = """\
[watches]
path = "watches.csv"
user = "uid"
item = "video"
time = "event_time"
time_unit = "iso"
watch_time = "watched_ms"
watch_time_unit = "ms"
source = "surface"
"""


def logs(tmp_path: Path, mapping: str = MAPPING, **files: str) -> Path:
    folder = write(tmp_path / "logs", {"watches.csv": WATCHES, **files})
    (folder / "map.toml").write_text(mapping)
    return folder / "map.toml"


def rows(ds: Dataset, name: str) -> list[dict]:
    return ds.table(name).to_pylist()


def raw_ids(ds: Dataset, space: str) -> list[str]:
    return ds.id_map(space).column("raw_id").to_pylist()


def fails(tmp_path: Path, mapping: Path, *expected: str) -> str:
    return assert_clean_failure(tmp_path, lambda out: import_events(mapping, out), *expected)


# --- what an import gives ---------------------------------------------------------------


def test_string_ids_iso_times_with_zones_and_units(tmp_path: Path) -> None:
    result = import_events(logs(tmp_path), tmp_path / "out")
    assert result.source == "events"
    assert result.row_counts == {"users": 3, "items": 3, "watches": 5}
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["alice", "bob", "carol"]  # sorted, as the other loaders
    assert raw_ids(ds, "item") == ["v-10", "v-2", "v-3"]
    w = rows(ds, "watches")  # in file order
    assert [(r["user_id"], r["item_id"]) for r in w] == [(1, 1), (2, 2), (1, 2), (3, 3), (2, 1)]
    assert [r["ts"] - DAY for r in w] == [
        8 * 3600,
        8 * 3600 + 1800,  # 10:30+02:00
        9 * 3600,  # no offset: UTC
        13 * 3600,  # 12:00:00.750-01:00, floored to the second
        13 * 3600,
    ]
    assert [r["watch_time_s"] for r in w] == [30.0, 12.5, None, 40.0, 1.0]
    assert [r["source"] for r in w] == ["home", "search", None, "related", "external"]
    assert ds.manifest.time_range == {"min_ts": DAY + 8 * 3600, "max_ts": DAY + 13 * 3600}
    period = ds.manifest.extra["periods"][0]
    assert period["period"] == 1
    assert period["rows"] == {"watches": 5, "users": 3, "items": 3}
    assert period["new_ids"] == {"user": 3, "item": 3, "channel": 0}
    assert ds.manifest.extra["mapping"]["watches"]["time_unit"] == "iso"
    assert ds.manifest.extra["rejected"] == {}


@pytest.mark.parametrize(
    ("unit", "values"),
    [
        ("s", ["1714550400", "1714550401.9"]),
        ("ms", ["1714550400000", "1714550401999"]),
        ("us", ["1714550400000000", "1714550401999999"]),
        ("iso", ["2024-05-01T08:00:00Z", "2024-05-01T10:00:01.9+02:00"]),
    ],
)
def test_each_time_unit(tmp_path: Path, unit: str, values: list[str]) -> None:
    text = f"u,i,t\na,x,{values[0]}\nb,y,{values[1]}\n"
    mapping = (
        f'[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\ntime_unit = "{unit}"\n'
    )
    import_events(logs(tmp_path, mapping, **{"w.csv": text}), tmp_path / "out")
    ts = Dataset.open(tmp_path / "out").table("watches").column("ts").to_pylist()
    assert ts == [1714550400, 1714550401]


def test_naive_iso_times_in_the_mappings_time_zone(tmp_path: Path) -> None:
    mapping = (
        '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\ntime_unit = "iso"\n'
        'time_zone = "Europe/Paris"\n'
    )
    text = "u,i,t\na,x,2024-05-01 10:00:00\nb,y,2024-05-01T10:00:00Z\n"
    import_events(logs(tmp_path, mapping, **{"w.csv": text}), tmp_path / "out")
    ts = Dataset.open(tmp_path / "out").table("watches").column("ts").to_pylist()
    assert ts == [DAY + 8 * 3600, DAY + 10 * 3600]  # Paris is UTC+2 in May


def test_integer_ids_keep_their_value(tmp_path: Path) -> None:
    mapping = '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    text = "u,i,t\n3,10,1714550400\n1,9,1714550401\n2,100,1714550402\n"
    import_events(logs(tmp_path, mapping, **{"w.csv": text}), tmp_path / "out")
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["1", "2", "3"]
    assert raw_ids(ds, "item") == ["9", "10", "100"]  # numerically, as dense_ids orders them
    assert raw_ids(ds, "item") == dense_ids(pa.array(["10", "9", "100"]))[0].to_pylist()


ALL_TABLES = """\
[watches]
path = "watches/*.csv"
user = "uid"
item = "video"
time = "ts"

[impressions]
path = "impressions.parquet"
user = "uid"
item = "video"
time = "ts"
time_unit = "ms"
clicked = "click"
watch_time = "play"

[searches]
path = "searches.jsonl"
user = "user"
time = "when"
time_unit = "iso"
query = "q"

[users]
path = "users.tsv"
user = "id"
age = "age"
gender = "sex"
logged_in = "member"

[items]
path = "items.csv"
item = "id"
channel = "author"
title = "title"
topic = "genre"
upload_time = "uploaded"
upload_time_unit = "iso"
duration = "length_ms"
duration_unit = "ms"
"""


def all_tables(tmp_path: Path) -> Path:
    folder = write(
        tmp_path / "logs",
        {
            "watches/day-1.csv": "uid,video,ts\nu1,a,1714550400\nu2,b,1714550500\n",
            "watches/day-2.csv": "uid,video,ts\nu1,b,1714636800\nu3,c,1714636900\n",
            "watches/notes.txt": "not matched by the glob",
            "searches.jsonl": '{"user": "u1", "when": "2024-05-01T08:00:00Z", "q": "cats"}\n'
            '{"user": "u4", "when": "2024-05-01T09:00:00Z", "q": "dogs", "extra": 1}\n',
            "users.tsv": "id\tage\tsex\tmember\nu2\t31\tF\ttrue\nu1\t\tM\t0\nu9\t50\t\tyes\n",
            "items.csv": "id,author,title,genre,uploaded,length_ms\n"
            'a,ch-1,"Cats, part 1",pets,2024-01-01,61000\n'
            "c,ch-2,Dogs,pets,2024-02-01T00:00:00Z,\n",
        },
    )
    pq.write_table(
        pa.table(
            {
                "uid": ["u1", "u1", "u1", "u2", "u1"],
                "video": ["a", "b", "c", "a", "a"],
                "ts": pa.array(
                    [1714550400000, 1714550400000, 1714550400000, 1714550500000, 1714550600000]
                ),
                "click": [True, False, True, False, True],
                "play": [12.0, 99.0, None, 3.0, 7.5],
            }
        ),
        folder / "impressions.parquet",
    )
    (folder / "map.toml").write_text(ALL_TABLES)
    return folder / "map.toml"


def test_every_table_from_csv_tsv_jsonl_parquet_and_a_glob(tmp_path: Path) -> None:
    result = import_events(all_tables(tmp_path), tmp_path / "out")
    assert result.row_counts == {
        "users": 5,
        "items": 3,
        "watches": 4,
        "searches": 2,
        "impressions": 5,
    }
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["u1", "u2", "u3", "u4", "u9"]  # u9: only in users.tsv
    assert raw_ids(ds, "item") == ["a", "b", "c"]
    assert raw_ids(ds, "channel") == ["ch-1", "ch-2"]
    assert ds.manifest.extra["periods"][0]["files"]["watches"] == [
        str(tmp_path / "logs" / "watches" / "day-1.csv"),
        str(tmp_path / "logs" / "watches" / "day-2.csv"),
    ]
    assert rows(ds, "users") == [
        {"user_id": 1, "age": None, "gender": "M", "logged_in": False},
        {"user_id": 2, "age": 31.0, "gender": "F", "logged_in": True},
        {"user_id": 3, "age": None, "gender": None, "logged_in": None},
        {"user_id": 4, "age": None, "gender": None, "logged_in": None},
        {"user_id": 5, "age": 50.0, "gender": None, "logged_in": True},
    ]
    items = rows(ds, "items")
    assert items[0] == {
        "item_id": 1,
        "upload_ts": 1704067200,
        "duration_s": 61.0,
        "channel_id": 1,
        "topic": "pets",
        "title": "Cats, part 1",
    }
    assert items[1]["channel_id"] is None and items[1]["title"] is None  # b: no items row
    assert items[2]["upload_ts"] == 1706745600 and items[2]["duration_s"] is None
    assert [r["query"] for r in rows(ds, "searches")] == ["cats", "dogs"]
    imp = rows(ds, "impressions")
    # A request: the rows of one user with the same time; positions in file order.
    assert [(r["request_id"], r["position"]) for r in imp] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (3, 0),
    ]
    assert [r["ts"] for r in imp][:4] == [1714550400] * 3 + [1714550500]
    # Watch time counts only where clicked; a clicked row without one is 0.
    assert [r["watch_time_s"] for r in imp] == [12.0, 0.0, 0.0, 0.0, 7.5]


def test_impressions_with_request_and_position_columns(tmp_path: Path) -> None:
    mapping = MAPPING + (
        '\n[impressions]\npath = "imp.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
        'clicked = "c"\nrequest = "r"\nposition = "p"\n'
    )
    imp = "u,i,t,c,r,p\nalice,v-2,1714550400,1,req-b,3\nbob,v-3,1714550400,no,req-a,0\n"
    imp += "alice,v-3,1714550401,0,req-b,4\n"
    import_events(logs(tmp_path, mapping, **{"imp.csv": imp}), tmp_path / "out")
    got = rows(Dataset.open(tmp_path / "out"), "impressions")
    assert [(r["request_id"], r["position"], r["clicked"]) for r in got] == [
        (1, 3, True),
        (2, 0, False),
        (1, 4, False),
    ]


def test_many_batches_give_the_same_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    n = 3000
    users = [f"user-{u}" for u in rng.integers(0, 300, n)]
    items = [f"item-{i}" for i in rng.integers(0, 50, n)]
    ts = 1714550400 + np.sort(rng.integers(0, 86400, n))
    text = "u,i,t\n" + "".join(f"{u},{i},{t}\n" for u, i, t in zip(users, items, ts, strict=True))
    imp = "u,i,t,c\n" + "".join(
        f"{u},{i},{t // 600 * 600},{k % 2}\n"
        for k, (u, i, t) in enumerate(zip(users, items, ts, strict=True))
    )
    mapping = (
        '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
        '[impressions]\npath = "imp.csv"\nuser = "u"\nitem = "i"\ntime = "t"\nclicked = "c"\n'
    )
    src = logs(tmp_path, mapping, **{"w.csv": text, "imp.csv": imp})
    import_events(src, tmp_path / "big")
    monkeypatch.setattr(sources_module, "BLOCK", 1 << 10)
    import_events(src, tmp_path / "small")
    big, small = Dataset.open(tmp_path / "big"), Dataset.open(tmp_path / "small")
    for name in ("users", "items", "watches", "impressions"):
        assert big.table(name).equals(small.table(name)), name
    assert raw_ids(big, "user") == raw_ids(small, "user")


def test_a_value_the_fast_parse_refuses_late_in_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Times and watch times are parsed as numbers straight away; a value that is not one
    # sends the rest of the file through the text path, which names it: no row is lost
    # or read twice, and the lines named are those of the file.
    monkeypatch.setattr(sources_module, "BLOCK", 1 << 11)
    n = 2000
    lines = [f"u{k % 97},i{k % 13},{1714550400 + k},{k % 50}" for k in range(n)]
    lines[500] = "u1,i1"  # a record with too few fields
    lines[1200] = "u1,i1,1714551600,-3"  # a negative watch time
    lines[1700] = "u1,i1,soon,1"  # not a number: the fast parse gives up here
    mapping = '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\nwatch_time = "s"\n'
    src = logs(tmp_path, mapping, **{"w.csv": "u,i,t,s\n" + "\n".join(lines) + "\n"})
    fails(tmp_path, src, "w.csv, line 502", "2 field(s), expected 4")
    import_events(src, tmp_path / "out", bad_rows="skip")
    ds = Dataset.open(tmp_path / "out")
    rejected = pq.read_table(tmp_path / "out" / "rejected" / "period-1" / "watches.parquet")
    assert rejected.column("line").to_pylist() == [502, 1202, 1702]
    assert rejected.column("column").to_pylist() == [None, "s", "t"]
    ts = ds.table("watches").column("ts").to_numpy()
    expected = [1714550400 + k for k in range(n) if k not in (500, 1200, 1700)]
    assert ts.tolist() == expected


# --- bad rows ---------------------------------------------------------------------------

BAD = {
    # table: (file name, contents, the mapping's table, what the error names)
    "watches": (
        "watches.csv",
        WATCHES.replace("2024-05-01 09:00:00", "yesterday"),
        None,
        ("watches.csv, line 4", "column 'event_time'", "'yesterday' is not an ISO-8601 time"),
    ),
    "impressions": (
        "imp.tsv",
        "u\ti\tt\tc\nalice\tv-2\t1714550400\t1\n\nbob\tv-3\t1714550400\tmaybe\n",
        '[impressions]\npath = "imp.tsv"\nuser = "u"\nitem = "i"\ntime = "t"\nclicked = "c"\n',
        ("imp.tsv, line 4", "column 'c'", "'maybe' is not a flag"),
    ),
    "searches": (
        "s.jsonl",
        '{"u": "alice", "t": 1714550400, "q": "cats"}\n{"u": "bob", "t": 1714550400, "q": ""}\n',
        '[searches]\npath = "s.jsonl"\nuser = "u"\ntime = "t"\nquery = "q"\n',
        ("s.jsonl, line 2", "column 'q'", "missing value"),
    ),
    "users": (
        "users.csv",
        "id,age\nalice,30\nbob,-4\n",
        '[users]\npath = "users.csv"\nuser = "id"\nage = "age"\n',
        ("users.csv, line 3", "column 'age'", "value '-4' is below the minimum 0"),
    ),
    "items": (
        "items.csv",
        "id,len\nv-2,12\nv-3,long\n",
        '[items]\npath = "items.csv"\nitem = "id"\nduration = "len"\n',
        ("items.csv, line 3", "column 'len'", "'long' is not a duration in s"),
    ),
}


@pytest.mark.parametrize("table", list(BAD))
def test_a_bad_row_in_each_table_fails_naming_file_line_column_value(
    tmp_path: Path, table: str
) -> None:
    name, text, section, expected = BAD[table]
    mapping = MAPPING + ("\n" + section if section else "")
    fails(tmp_path, logs(tmp_path, mapping, **{name: text}), *expected)


@pytest.mark.parametrize("table", list(BAD))
def test_skip_writes_each_tables_bad_rows_with_reasons_and_counts_them(
    tmp_path: Path, table: str
) -> None:
    name, text, section, expected = BAD[table]
    mapping = MAPPING + ("\n" + section if section else "")
    result = import_events(
        logs(tmp_path, mapping, **{name: text}), tmp_path / "out", bad_rows="skip"
    )
    ds = Dataset.open(tmp_path / "out")
    assert ds.manifest.extra["rejected"] == {table: 1}
    assert ds.manifest.extra["periods"][0]["rejected"] == {table: 1}
    rejected = pq.read_table(tmp_path / "out" / "rejected" / "period-1" / f"{table}.parquet")
    [row] = rejected.to_pylist()
    line = int(expected[0].rsplit(" ", 1)[1])
    assert row["file"] == str(tmp_path / "logs" / name) and row["line"] == line
    assert f"column '{row['column']}'" == expected[1]
    assert row["reason"] == expected[2] or expected[2] in row["reason"]
    assert result.row_counts.get(table, 0) >= (0 if table in ("users", "items") else 1)


def test_skip_keeps_the_good_rows_and_the_source_values(tmp_path: Path) -> None:
    text = WATCHES + "dave,v-2,2024-05-02T00:00:00Z,-5,home\n,v-2,2024-05-02T00:00:00Z,1,home\n"
    text += "erin,v-9,2024-05-02T00:00:00Z,5,mobile\nfrank,v-9,1960-01-01,5,home\n"
    text += "gina,v-9\n"
    import_events(logs(tmp_path, **{"watches.csv": text}), tmp_path / "out", bad_rows="skip")
    ds = Dataset.open(tmp_path / "out")
    assert ds.num_rows("watches") == 5
    assert raw_ids(ds, "user") == ["alice", "bob", "carol"]  # rejected rows add no ids
    assert raw_ids(ds, "item") == ["v-10", "v-2", "v-3"]
    rejected = pq.read_table(tmp_path / "out" / "rejected" / "period-1" / "watches.parquet")
    got = [(r["line"], r["column"], r["reason"]) for r in rejected.to_pylist()]
    assert got == [
        (7, "watched_ms", "value '-5' is below the minimum 0"),
        (8, "uid", "missing value"),
        (9, "surface", "'mobile' is not one of home, search, related, external"),
        (10, "event_time", "'1960-01-01' is not between 1970 and 2200"),
        (11, None, "2 field(s), expected 5: 'gina,v-9'"),
    ]
    assert rejected.column("uid").to_pylist() == ["dave", None, "erin", "frank", None]
    assert rejected.column("row").to_pylist() == [6, 7, 8, 9, 10]
    assert ds.manifest.extra["rejected"] == {"watches": 5}


def test_times_outside_1970_2200_point_at_the_unit(tmp_path: Path) -> None:
    mapping = '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    src = logs(tmp_path, mapping, **{"w.csv": "u,i,t\na,x,1714550400000\n"})
    fails(tmp_path, src, "line 2", "column 't'", "is not between 1970 and 2200", "time_unit")


def test_a_line_with_too_few_fields_is_named(tmp_path: Path) -> None:
    src = logs(tmp_path, **{"watches.csv": WATCHES + "\n\nzoe,v-2\n"})
    fails(tmp_path, src, "watches.csv, line 9", "2 field(s), expected 5")
    # A file with no readable record at all gives the reader no batch: still named.
    mapping = '[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    src = logs(tmp_path, mapping, **{"w.csv": "u,i,t\na,x\n"})
    fails(tmp_path, src, "w.csv, line 2", "2 field(s), expected 3: 'a,x'")


def test_a_malformed_json_line_is_named(tmp_path: Path) -> None:
    mapping = '[watches]\npath = "w.jsonl"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    text = '{"u": 1, "i": "x", "t": 1714550400}\n{"u": "b", "i": "y", "t": 1714550401}\n{"u": \n'
    src = logs(tmp_path, mapping, **{"w.jsonl": text})
    fails(tmp_path, src, "w.jsonl, line 3", "not valid JSON")
    # Numbers and text in one column (a JSON quirk Arrow refuses) are read line by line.
    import_events(
        logs(tmp_path, mapping, **{"w.jsonl": text.rsplit("\n", 2)[0] + "\n"}), tmp_path / "o"
    )
    assert raw_ids(Dataset.open(tmp_path / "o"), "user") == ["1", "b"]


def test_a_bad_parquet_row_is_named_by_its_row(tmp_path: Path) -> None:
    mapping = '[watches]\npath = "w.parquet"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    src = logs(tmp_path, mapping)
    pq.write_table(
        pa.table({"u": ["a", "b", None], "i": ["x", "y", "z"], "t": [1714550400] * 3}),
        src.parent / "w.parquet",
    )
    fails(tmp_path, src, "w.parquet", "column 'u', row 3", "missing value")


def test_parquet_timestamps_and_integer_ids(tmp_path: Path) -> None:
    mapping = '[watches]\npath = "w.parquet"\nuser = "u"\nitem = "i"\ntime = "t"\n'
    src = logs(tmp_path, mapping)
    stamps = pa.array([1714550400_000, 1714550401_500], pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"u": [7, 3], "i": [1, 1], "t": stamps}), src.parent / "w.parquet")
    import_events(src, tmp_path / "out")
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["3", "7"]
    assert ds.table("watches").column("ts").to_pylist() == [1714550400, 1714550401]


def test_a_duplicate_users_row_names_the_first(tmp_path: Path) -> None:
    mapping = MAPPING + '\n[users]\npath = "users.csv"\nuser = "id"\ngender = "g"\n'
    src = logs(tmp_path, mapping, **{"users.csv": "id,g\nalice,F\nbob,M\nalice,F\n"})
    fails(
        tmp_path,
        src,
        "users.csv, line 4",
        "column 'id'",
        "duplicate user 'alice' (first on line 2)",
    )


def test_a_missing_column_lists_the_header(tmp_path: Path) -> None:
    src = logs(tmp_path, **{"watches.csv": "uid,video,event_time\nalice,v-1,2024-05-01\n"})
    fails(tmp_path, src, "watches.csv, line 1", "column 'watched_ms'", "header has uid, video")


def test_every_row_rejected_is_an_error(tmp_path: Path) -> None:
    src = logs(tmp_path, **{"watches.csv": "uid,video,event_time,watched_ms,surface\n,,,,\n"})
    with pytest.raises(DataError, match=r"no watches to import \(1 rows rejected\)"):
        import_events(src, tmp_path / "out", bad_rows="skip")


# --- the mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[watches]\npath = "w.csv"\nuser = "u"\nitem = "i"\n', "missing key(s) time"),
        (MAPPING + 'usr = "x"\n', "[watches]: unknown key 'usr'"),
        (MAPPING + '[clicks]\npath = "c.csv"\n', "unknown table [clicks]"),
        ('[users]\npath = "u.csv"\nuser = "id"\n', "no [watches] table"),
        (MAPPING.replace('"iso"', '"minutes"'), "time_unit 'minutes' is not one of s, ms, us, iso"),
        (MAPPING + 'format = "xlsx"\n', "format 'xlsx' is not one of"),
        (MAPPING + 'time_zone = "Mars/Olympus"\n', "unknown time zone 'Mars/Olympus'"),
        (MAPPING.replace('user = "uid"', "user = 3"), "'user' must be a non-empty string"),
        (MAPPING + "[watches", "not valid TOML"),
    ],
)
def test_the_mapping_is_checked_before_reading(tmp_path: Path, toml: str, expected: str) -> None:
    src = logs(tmp_path, toml)
    message = fails(tmp_path, src, expected)
    assert message.startswith(str(src))


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    src = logs(tmp_path, MAPPING.replace("watches.csv", "watches.log"), **{"watches.log": WATCHES})
    fails(tmp_path, src, "watches.log", "set format = ...")
    (src.parent / "map.toml").write_text(
        MAPPING.replace("watches.csv", "watches.log") + 'format = "csv"\n'
    )
    import_events(src, tmp_path / "out")


def test_no_files_matching_a_glob(tmp_path: Path) -> None:
    fails(
        tmp_path,
        logs(tmp_path, MAPPING.replace("watches.csv", "w/*.csv")),
        "no file matches 'w/*.csv'",
    )


def test_mapping_paths_are_relative_to_it_and_it_survives_in_the_manifest(tmp_path: Path) -> None:
    src = logs(tmp_path)
    m = load_mapping(src)
    assert m.base == src.parent and m.sources["watches"].unit("watch_time") == "ms"
    import_events(src, tmp_path / "out")
    stored = Dataset.open(tmp_path / "out").manifest.extra["mapping"]
    assert stored == {
        "watches": {
            "path": ["watches.csv"],
            "user": "uid",
            "item": "video",
            "time": "event_time",
            "watch_time": "watched_ms",
            "source": "surface",
            "time_unit": "iso",
            "watch_time_unit": "ms",
        }
    }


# --- line numbers -----------------------------------------------------------------------


def test_line_counter_skips_blank_lines_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"h\r\n1\r\n\r\n2\n\n\n3\n4")
    counter = LineCounter(SourceFile(path, "csv"))
    assert counter.lines(np.array([0, 1])).tolist() == [2, 4]
    assert counter.lines(np.array([2, 3])).tolist() == [7, 8]
    assert counter.lines(np.array([0])).tolist() == [2]  # earlier again: scans afresh


# --- on the command line, and what reads it next ------------------------------------------


def test_cli_import_events_and_features_build(tmp_path: Path) -> None:
    src = all_tables(tmp_path)
    out = tmp_path / "ds"
    result = runner.invoke(app, ["data", "import", "events", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 watches, 5 impressions, 2 searches, 5 users, 3 items" in result.output
    build_features(out, tmp_path / "feat", config=FeaturesConfig(history_n=3), progress=False)
    assert Features.open(tmp_path / "feat").manifest


def test_cli_bad_rows_skip_only_for_events(tmp_path: Path, sequence_file: Path) -> None:
    result = runner.invoke(
        app,
        [
            "data",
            "import",
            "sequence",
            str(sequence_file),
            "-o",
            str(tmp_path / "o"),
            "--bad-rows",
            "skip",
        ],
    )
    assert result.exit_code == 2


def test_a_failed_import_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = logs(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.DatasetWriter, "add_id_map", broken)
    with pytest.raises(OSError):
        import_events(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
