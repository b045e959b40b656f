from __future__ import annotations

import pyarrow as pa
import pytest

from funnelrec.data.schema import SPECS, TABLE_NAMES, validate_table
from funnelrec.errors import DataError


def watches(**overrides: list) -> pa.Table:
    cols: dict[str, list] = {
        "user_id": [1, 2, 3],
        "item_id": [4, 5, 6],
        "ts": [10, 20, 30],
        "watch_time_s": [1.5, None, 0.0],
        "source": ["home", None, "search"],
    }
    cols.update(overrides)
    return pa.table(cols)


def test_every_table_has_a_spec_and_ids_first() -> None:
    assert set(SPECS) == set(TABLE_NAMES)
    for name in ("users", "items"):
        assert SPECS[name].required[0].name == SPECS[name].unique


def test_valid_table_comes_back_in_canonical_order_and_types() -> None:
    t = watches()
    shuffled = t.select(["ts", "source", "item_id", "watch_time_s", "user_id"]).cast(
        pa.schema(
            [
                ("ts", pa.int32()),
                ("source", pa.string()),
                ("item_id", pa.int32()),
                ("watch_time_s", pa.float64()),
                ("user_id", pa.int64()),
            ]
        )
    )
    out = validate_table("watches", shuffled)
    assert out.column_names == ["user_id", "item_id", "ts", "watch_time_s", "source"]
    assert out.schema.field("ts").type == pa.int64()
    assert out.schema.field("watch_time_s").type == pa.float32()
    assert out.column("watch_time_s").to_pylist() == [1.5, None, 0.0]


def test_optional_columns_are_kept_only_when_present() -> None:
    out = validate_table("users", pa.table({"region": ["a", None], "user_id": [1, 2]}))
    assert out.column_names == ["user_id", "region"]
    assert SPECS["users"].arrow_schema(["region"]).names == ["user_id", "region"]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (watches().drop_columns(["ts"]), "column 'ts': missing column(s) ts"),
        (watches().append_column("rating", pa.array([1, 2, 3])), "column 'rating': unexpected"),
        (watches(ts=["1", "2", "x"]), "column 'ts', row 3: value 'x' is not of type int64"),
        (watches(item_id=[4, None, 6]), "column 'item_id', row 2: missing value"),
        (watches(user_id=[1, 0, 3]), "column 'user_id', row 2: value 0 is below the minimum 1"),
        (watches(watch_time_s=[1.0, -2.0, None]), "column 'watch_time_s', row 2: value -2"),
        (watches(watch_time_s=[1.0, float("nan"), None]), "row 2: value is NaN"),
        (watches(source=["home", "email", None]), "row 2: source 'email' is not one of"),
    ],
)
def test_invalid_watches_name_column_and_row(table: pa.Table, expected: str) -> None:
    with pytest.raises(DataError) as info:
        validate_table("watches", table, "w.parquet")
    assert str(info.value).startswith("w.parquet")
    assert expected in str(info.value)


def test_row_numbers_count_across_chunks() -> None:
    with pytest.raises(DataError, match="row 1002"):
        validate_table("watches", watches(item_id=[4, None, 6]), row_offset=1000)


def test_duplicate_ids_name_both_rows() -> None:
    with pytest.raises(DataError, match=r"row 3: duplicate user_id 7 \(first seen in row 1\)"):
        validate_table("users", pa.table({"user_id": [7, 8, 7]}))


def test_empty_required_table_is_an_error_but_empty_optional_is_not() -> None:
    with pytest.raises(DataError, match="table 'users' is empty"):
        validate_table("users", pa.table({"user_id": pa.array([], pa.int64())}))
    empty = pa.table({"user_id": pa.array([], pa.int64()), "ts": [], "query": []})
    assert validate_table("searches", empty).num_rows == 0


def test_impressions_need_position_and_click() -> None:
    table = pa.table(
        {
            "request_id": [1, 1],
            "user_id": [1, 1],
            "item_id": [2, 3],
            "ts": [5, 5],
            "position": [0, -1],
            "clicked": [True, False],
            "watch_time_s": [3.0, 0.0],
        }
    )
    with pytest.raises(DataError, match="column 'position', row 2"):
        validate_table("impressions", table)


def test_unknown_table_name() -> None:
    with pytest.raises(DataError, match="unknown table 'clicks'"):
        validate_table("clicks", pa.table({"a": [1]}))
