"""A dataset damaged after its import is refused when it is opened or first read.

Each test writes a small valid dataset, damages one file the way a full disk, another
tool or a hand edit would, and expects a `DataError` naming the file (and the column and
row where there is one), from `Dataset` and from `features build`, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.dataset import MANIFEST, Dataset, DatasetWriter
from funnelrec.errors import DataError
from funnelrec.features import FeaturesConfig
from funnelrec.features.build import build_features

runner = CliRunner()

WATCH_TIME = [30.0, None, 12.5, 4.0, 8.0, 1.0, 2.0, 3.0, 9.0, 7.0, 6.0, 5.0]
SOURCE = ["home", None, "search", "related", "home", "home", None, "external", "home", "home"]
SOURCE += ["search", None]


def watches() -> pa.Table:
    """Users 1, 2, 3 watch 5, 4 and 3 of items 1..6."""
    return pa.table(
        {
            "user_id": [1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3],
            "item_id": [1, 2, 3, 4, 5, 2, 3, 6, 1, 4, 5, 6],
            "ts": [10 * i for i in range(12)],
            "watch_time_s": pa.array(WATCH_TIME, pa.float32()),
            "source": SOURCE,
        }
    )


def write_world(path: Path) -> Path:
    with DatasetWriter(path, source="test") as w:
        w.write("users", pa.table({"user_id": [1, 2, 3], "region": ["a", "b", None]}))
        w.write(
            "items",
            pa.table({"item_id": list(range(1, 7)), "topic": ["x", "y", "x", "y", "x", None]}),
        )
        w.write("watches", watches())
        w.write("searches", pa.table({"user_id": [1, 3], "ts": [15, 95], "query": ["a", "b"]}))
        w.write(
            "impressions",
            pa.table(
                {
                    "request_id": [1, 1, 2, 2],
                    "user_id": [1, 1, 2, 2],
                    "item_id": [3, 4, 6, 1],
                    "ts": [25, 25, 65, 65],
                    "position": pa.array([0, 1, 0, 1], pa.int32()),
                    "clicked": [True, False, True, False],
                    "watch_time_s": pa.array([12.5, 0.0, 3.0, 0.0], pa.float32()),
                }
            ),
        )
        w.add_id_map("user", ["u1", "u2", "u3"])
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_world(tmp_path / "data")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def rewrite(data: Path, name: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace a table's file by `change` of its content, as another tool would write it."""
    file = data / f"{name}.parquet"
    pq.write_table(change(pq.read_table(file)), file)


def edit_manifest(data: Path, change: Callable[[dict], None]) -> None:
    raw = json.loads((data / MANIFEST).read_text())
    change(raw)
    (data / MANIFEST).write_text(json.dumps(raw))


def set_column(name: str, values: pa.Array) -> Callable[[pa.Table], pa.Table]:
    def change(t: pa.Table) -> pa.Table:
        return t.set_column(t.column_names.index(name), name, values)

    return change


def with_watch_time(*changes: tuple[int, float]) -> pa.Array:
    values = list(WATCH_TIME)
    for row, value in changes:
        values[row - 1] = value
    return pa.array(values, pa.float32())


# ------------------------------------------------------------- damage found when opening


def truncate(data: Path) -> None:
    file = data / "watches.parquet"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def random_bytes(data: Path) -> None:
    (data / "watches.parquet").write_bytes(np.random.default_rng(0).bytes(4096))


def empty_file(data: Path) -> None:
    (data / "watches.parquet").write_bytes(b"")


def remove_watches(data: Path) -> None:
    (data / "watches.parquet").unlink()


def drop_item_id(data: Path) -> None:
    rewrite(data, "watches", lambda t: t.drop_columns(["item_id"]))


def ts_as_strings(data: Path) -> None:
    rewrite(data, "watches", lambda t: set_column("ts", pc.cast(t["ts"], pa.string()))(t))


def extra_column(data: Path) -> None:
    rewrite(data, "items", lambda t: t.append_column("rating", pa.array([1.0] * t.num_rows)))


def drop_a_row(data: Path) -> None:
    rewrite(data, "watches", lambda t: t.slice(1))


def unlist_watches(data: Path) -> None:
    edit_manifest(data, lambda m: m["tables"].pop("watches"))


def empty_users(data: Path) -> None:
    rewrite(data, "users", lambda t: t.slice(0, 0))
    edit_manifest(data, lambda m: m["row_counts"].update(users=0))


def damage_id_map(data: Path) -> None:
    (data / "idmap_user.parquet").write_bytes(b"PAR1 not really")


NOT_PARQUET = "not a readable Parquet file"


@pytest.mark.parametrize(
    ("damage", "file", "expected"),
    [
        (truncate, "watches.parquet", NOT_PARQUET),
        (random_bytes, "watches.parquet", NOT_PARQUET),
        (empty_file, "watches.parquet", NOT_PARQUET),
        (remove_watches, "watches.parquet", "no such file (the dataset's 'watches' table)"),
        (drop_item_id, "watches.parquet", "column 'item_id': missing column(s) item_id"),
        (ts_as_strings, "watches.parquet", "column 'ts': stored as string, expected int64"),
        (extra_column, "items.parquet", "column 'rating': unexpected column(s) rating"),
        (drop_a_row, "watches.parquet", "11 rows, the manifest says 12"),
        (unlist_watches, MANIFEST, "no watches table (required: users, items, watches)"),
        (empty_users, "users.parquet", "table 'users' is empty"),
        (damage_id_map, "idmap_user.parquet", NOT_PARQUET),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_opening_refuses_damaged_files(
    data: Path, damage: Callable[[Path], None], file: str, expected: str
) -> None:
    damage(data)
    with pytest.raises(DataError) as info:
        Dataset.open(data)
    message = str(info.value)
    assert message.startswith(f"{data / file}")
    assert expected in message
    assert "\n" not in message


# --------------------------------------------------- damage found when a table is first read


@pytest.mark.parametrize(
    ("table", "change", "expected"),
    [
        pytest.param(
            "watches",
            set_column("watch_time_s", with_watch_time((3, -1.0), (7, -2.0))),
            "column 'watch_time_s', row 3: value -1.0 is below the minimum 0; 2 rows in all",
            id="negative-watch-time",
        ),
        pytest.param(
            "impressions",
            set_column("watch_time_s", pa.array([12.5, -3.0, 3.0, 0.0], pa.float32())),
            "column 'watch_time_s', row 2: value -3.0 is below the minimum 0; 1 row in all",
            id="negative-impression-watch-time",
        ),
        pytest.param(
            "watches",
            set_column("watch_time_s", with_watch_time((5, float("inf")))),
            "column 'watch_time_s', row 5: value inf is not finite; 1 row in all",
            id="infinite-watch-time",
        ),
        pytest.param(
            "watches",
            set_column("watch_time_s", with_watch_time((1, float("nan")), (2, float("-inf")))),
            "column 'watch_time_s', row 1: value is NaN; 2 rows in all",
            id="nan-watch-time",
        ),
        pytest.param(
            "watches",
            set_column("item_id", pa.array([1, 2, 3, 99, 5, 2, 120, 6, 1, 99, 5, 6])),
            "column 'item_id', row 4: item id 99 is not in the items table; "
            "3 rows in all, with ids 99, 120",
            id="item-not-in-items",
        ),
        pytest.param(
            "impressions",
            set_column("item_id", pa.array([3, 4, 7, 1])),
            "column 'item_id', row 3: item id 7 is not in the items table; "
            "1 row in all, with ids 7",
            id="impression-item-not-in-items",
        ),
        pytest.param(
            "searches",
            set_column("user_id", pa.array([1, 4])),
            "column 'user_id', row 2: user id 4 is not in the users table",
            id="search-user-not-in-users",
        ),
        pytest.param(
            "watches",
            set_column("user_id", pa.array([1, 1, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])),
            "column 'user_id', row 3: value 0 is below the minimum 1; 1 row in all",
            id="id-zero",
        ),
        pytest.param(
            "watches",
            set_column("ts", pa.array([0, None, *range(2, 12)], pa.int64())),
            "column 'ts', row 2: missing value; 1 row in all",
            id="missing-ts",
        ),
        pytest.param(
            "watches",
            set_column("source", pa.array(["home", "email", *[None] * 10], pa.string())),
            "column 'source', row 2: source 'email' is not one of home, search, related",
            id="unknown-source",
        ),
        pytest.param(
            "items",
            set_column("item_id", pa.array([1, 2, 3, 4, 5, 1])),
            "column 'item_id', row 6: duplicate item_id 1 (first seen in row 1); 1 row in all",
            id="duplicate-item",
        ),
        pytest.param(
            # ids that do not run 1..N: looked up one by one rather than as a range
            "items",
            set_column("item_id", pa.array([1, 2, 3, 4, 5, 10])),
            "watches.parquet, column 'item_id', row 8: item id 6 is not in the items table; "
            "2 rows in all, with ids 6",
            id="item-not-in-sparse-items",
        ),
    ],
)
def test_first_read_refuses_values_the_import_refuses(
    data: Path, tmp_path: Path, table: str, change: Callable[[pa.Table], pa.Table], expected: str
) -> None:
    rewrite(data, table, change)
    ds = Dataset.open(data)  # the footers are fine: only the values are wrong
    with pytest.raises(DataError) as info:
        for name in ("users", "items", "watches", "searches", "impressions"):
            ds.table(name)
    assert str(info.value).startswith(str(data))
    assert expected in str(info.value)
    # the feature build reads every table: it stops with the same message, writing nothing
    out = tmp_path / "feat"
    with pytest.raises(DataError) as built:
        build_features(data, out, progress=False)
    assert str(built.value) == str(info.value)
    assert not out.exists() and hidden(tmp_path) == []


def test_the_import_and_the_reader_give_the_same_message(data: Path, tmp_path: Path) -> None:
    bad = set_column("watch_time_s", with_watch_time((3, -1.0)))(watches())
    with pytest.raises(DataError) as imported, DatasetWriter(tmp_path / "x", source="t") as w:
        w.write("watches", bad, where=data / "watches.parquet")
    rewrite(data, "watches", lambda _: bad)
    with pytest.raises(DataError) as read:
        Dataset.open(data).table("watches")
    assert str(read.value).startswith(str(imported.value))


def test_columns_not_asked_for_are_checked_too(data: Path) -> None:
    rewrite(data, "watches", set_column("watch_time_s", with_watch_time((3, -1.0))))
    ds = Dataset.open(data)
    with pytest.raises(DataError, match="column 'watch_time_s', row 3"):
        ds.table("watches", ["user_id", "ts"])
    with pytest.raises(DataError, match="column 'watch_time_s', row 3"):
        ds.table("watches", ["user_id", "ts"])  # still refused: nothing was marked checked


def test_streamed_reads_stop_before_a_bad_batch_and_count_the_whole_table(data: Path) -> None:
    rewrite(data, "watches", set_column("watch_time_s", with_watch_time((3, -1.0), (12, -4.0))))
    ds = Dataset.open(data)
    seen = []
    with pytest.raises(DataError, match=r"row 3: value -1.0 is below the minimum 0; 2 rows in all"):
        for batch in ds.batches("watches", ["ts"], batch_size=2):
            seen.append(batch)
    assert len(seen) == 1 and seen[0].column_names == ["ts"]  # rows 1-2; rows 3-4 held back


def test_a_valid_dataset_reads_as_before(data: Path) -> None:
    ds = Dataset.open(data)
    assert (
        ds.table("watches", ["item_id"]).column(0).to_pylist() == watches()["item_id"].to_pylist()
    )
    assert sum(b.num_rows for b in ds.batches("watches", batch_size=5)) == 12
    assert ds.table("watches").equals(watches().cast(ds.table("watches").schema))
    with pytest.raises(DataError, match="no column"):
        ds.table("watches", ["rating"])


def test_a_blocked_build_stops_at_the_partition(data: Path, tmp_path: Path) -> None:
    rewrite(data, "impressions", set_column("item_id", pa.array([3, 4, 7, 1])))
    out = tmp_path / "feat"
    with pytest.raises(DataError, match=r"impressions\.parquet, column 'item_id', row 3"):
        build_features(data, out, progress=False, config=FeaturesConfig(block_events=10))
    assert not out.exists()


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (truncate, "watches.parquet: not a readable Parquet file"),
        (drop_item_id, "watches.parquet, column 'item_id': missing column(s) item_id"),
    ],
)
def test_features_build_exits_with_the_message(
    data: Path, tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    damage(data)
    out = tmp_path / "feat"
    result = runner.invoke(app, ["features", "build", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    assert expected in str(result.exception)
    assert not out.exists() and hidden(tmp_path) == []


def test_console_script_prints_one_line_and_no_traceback(data: Path, tmp_path: Path) -> None:
    rewrite(data, "watches", set_column("watch_time_s", with_watch_time((3, -1.0))))
    out = tmp_path / "feat"
    code = "import sys; from funnelrec.cli import main; sys.argv[0] = 'funnelrec'; main()"
    args = ["features", "build", "--data", str(data), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {data / 'watches.parquet'}, column 'watch_time_s', row 3: "
        "value -1.0 is below the minimum 0; 1 row in all"
    ]
    assert not out.exists() and hidden(tmp_path) == []
