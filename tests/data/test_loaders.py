from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import (
    dense_ids,
    find_movielens_files,
    import_kuairand,
    import_movielens,
    import_sequence,
)
from funnelrec.errors import DataError

Row = Callable[[int, int, int, int, int, int], str]


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def rows(ds: Dataset, name: str) -> list[dict]:
    return ds.table(name).to_pylist()


def raw_ids(ds: Dataset, space: str) -> list[str]:
    return ds.id_map(space).column("raw_id").to_pylist()


# --- dense ids -------------------------------------------------------------------------


def test_dense_ids_sort_integers_numerically_and_share_one_space() -> None:
    raw, (a, b) = dense_ids(pa.array(["10", "9", "10"]), pa.array(["100", "9"]))
    assert raw.to_pylist() == ["9", "10", "100"]
    assert a.tolist() == [2, 1, 2] and b.tolist() == [3, 1]


def test_dense_ids_sort_text_ids_as_text_independent_of_row_order() -> None:
    raw1, (d1,) = dense_ids(pa.array(["b", "a", "c", "a"]))
    raw2, _ = dense_ids(pa.array(["c", "a", "b"]))
    assert raw1.to_pylist() == raw2.to_pylist() == ["a", "b", "c"]
    assert d1.tolist() == [2, 1, 3, 1]


# --- movielens -------------------------------------------------------------------------


def test_ml100k_ratings_demographics_and_item_metadata(
    tmp_path: Path, ml100k_files: dict[str, bytes]
) -> None:
    src = write_files(tmp_path / "ml-100k", ml100k_files)
    result = import_movielens(src, tmp_path / "out")
    assert result.row_counts == {"users": 4, "items": 3, "watches": 5}
    assert result.extra["variant"] == "ml-100k"
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["1", "2", "3", "4"]  # user 4 has no rating, still a user
    assert raw_ids(ds, "item") == ["10", "20", "30"]
    users = rows(ds, "users")
    assert users[0] == {"user_id": 1, "age": 24.0, "gender": "M", "region": "us-8"}
    assert [u["region"] for u in users] == ["us-8", "us-9", "other", None]
    items = rows(ds, "items")
    assert items[0]["title"] == "Café (1995)"  # Latin-1 decoded
    assert items[0]["upload_ts"] == 788918400  # 01-Jan-1995 UTC
    assert [i["topic"] for i in items] == ["Animation", "Action", None]
    assert items[2]["upload_ts"] is None
    watches = ds.table("watches")
    # sorted by (user, ts): user 1 watched item 20 before item 10
    assert watches.column("user_id").to_pylist() == [1, 1, 2, 2, 3]
    assert watches.column("item_id").to_pylist()[:2] == [2, 1]
    assert watches.column("ts").to_pylist()[:2] == [881250948, 881250949]
    assert watches.column("watch_time_s").null_count == 5
    assert watches.column("source").null_count == 5
    assert ds.manifest.optional_columns["users"] == ["age", "gender", "region"]


def test_ml1m_double_colon_files(tmp_path: Path) -> None:
    src = write_files(
        tmp_path / "ml-1m",
        {
            "ratings.dat": b"1::1193::5::978300760\n2::1193::4::978300761\n1::48::3::978300700\n",
            "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072-1234\n",
            "movies.dat": b"1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
            b"48::Star Wars: Episode IV (1977)::Action|Adventure\n",
        },
    )
    import_movielens(src, tmp_path / "out")
    ds = Dataset.open(tmp_path / "out")
    assert rows(ds, "users") == [
        {"user_id": 1, "age": 1.0, "gender": "F", "region": "us-4"},
        {"user_id": 2, "age": 56.0, "gender": "M", "region": "us-7"},
    ]
    items = rows(ds, "items")
    assert raw_ids(ds, "item") == ["48", "1193"]
    assert items[0]["title"] == "Star Wars: Episode IV (1977)"  # single ':' kept
    assert items[0]["topic"] == "Action"
    assert items[0]["upload_ts"] == 220924800  # 1977-01-01 UTC
    assert ds.num_rows("watches") == 3


def test_ml_latest_csv_with_quoted_titles_and_no_users_file(tmp_path: Path) -> None:
    src = write_files(
        tmp_path / "ml-latest-small",
        {
            "ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"
            b"1,3,4.5,964981247\n7,1,0.5,1106635946\n",
            "movies.csv": b"movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
            b'3,"American President, The (1995)",(no genres listed)\n',
            "tags.csv": b"userId,movieId,tag,timestamp\n",  # other files are ignored
        },
    )
    result = import_movielens(src, tmp_path / "out")
    assert result.row_counts == {"users": 2, "items": 2, "watches": 3}
    ds = Dataset.open(tmp_path / "out")
    assert rows(ds, "users") == [{"user_id": 1}, {"user_id": 2}]
    assert rows(ds, "items")[1]["title"] == "American President, The (1995)"
    assert rows(ds, "items")[1]["topic"] is None


def test_recbole_atomic_files_in_a_directory_and_a_zip(
    tmp_path: Path, recbole_files: dict[str, bytes]
) -> None:
    src = write_files(tmp_path / "rb", recbole_files)
    import_movielens(src, tmp_path / "a")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in recbole_files.items():
            z.writestr(f"some/dir/{name}", data)
        z.writestr("other/x.inter", b"user_id:token\n")  # outside `within`: not seen
    import_movielens(archive, tmp_path / "b", within="some/dir/")
    a, b = Dataset.open(tmp_path / "a"), Dataset.open(tmp_path / "b")
    assert a.table("watches").equals(b.table("watches"))
    assert rows(a, "users")[0] == {"user_id": 1, "age": 25.0, "gender": "M", "region": "us-4"}
    items = rows(a, "items")
    assert items[1]["topic"] == "Crime" and items[1]["title"] == "L.A. Confidential"
    assert items[1]["upload_ts"] == 852076800  # 1997-01-01 UTC
    assert find_movielens_files(archive, "some/").variant == "recbole"


def test_movielens_without_ratings_names_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"u\.data, ratings\.dat, ratings\.csv"):
        import_movielens(tmp_path / "empty", tmp_path / "out")


# --- kuairand ---------------------------------------------------------------------------


def test_kuairand_rows_become_impressions_and_clicked_rows_watches(
    tmp_path: Path, kuairand_tsv: Path
) -> None:
    result = import_kuairand(kuairand_tsv, tmp_path / "out")
    assert result.row_counts == {"users": 2, "items": 3, "watches": 4, "impressions": 6}
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["90", "111"]
    imp = rows(ds, "impressions")
    # requests = (user, time_ms) groups numbered in (user, time) order
    assert [r["request_id"] for r in imp] == [1, 2, 3, 4, 4, 5]
    shared = [r for r in imp if r["request_id"] == 4]
    assert [(r["position"], r["clicked"]) for r in shared] == [(0, True), (1, False)]
    assert shared[0]["ts"] == 1649581149
    assert shared[0]["watch_time_s"] == pytest.approx(46.186)
    assert shared[1]["watch_time_s"] == 0.0  # not clicked: 0, although play_time_ms > 0
    watches = ds.table("watches")
    assert watches.num_rows == 4
    assert np.allclose(watches.column("watch_time_s").to_numpy(), [1.0, 3.0, 46.186, 14.549])
    items = rows(ds, "items")
    # item 600 only ever had duration_ms 0 (unknown)
    assert [i["duration_s"] for i in items] == pytest.approx([45.916, None, 30.0])


def test_kuairand_release_directory_with_video_features(
    tmp_path: Path, kuairand_header: str, kuairand_row: Row
) -> None:
    src = tmp_path / "KuaiRand-Pure" / "data"
    src.mkdir(parents=True)
    header = kuairand_header.replace("\t", ",")
    (src / "log_standard_4_08_to_4_21_pure.csv").write_text(
        header + "\n" + kuairand_row(1, 50, 1649581149287, 1, 9000, 0).replace("\t", ",") + "\n"
    )
    (src / "log_random_4_22_to_5_08_pure.csv").write_text(
        header + "\n" + kuairand_row(2, 60, 1650581149287, 0, 100, 0).replace("\t", ",") + "\n"
    )
    (src / "video_features_basic_pure.csv").write_text(
        "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
        "server_width,server_height,music_id,music_type,tag\n"
        '50,7000,NORMAL,2022-04-01,ShortImport,public,12000,720,1280,0,,"28,11"\n'
        "60,7001,NORMAL,2022-03-01,ShortImport,public,,720,1280,0,,5\n"
        "99,7002,NORMAL,2022-03-01,ShortImport,public,1000,720,1280,0,,5\n"
    )
    result = import_kuairand(src, tmp_path / "out")
    assert result.row_counts["impressions"] == 2 and result.row_counts["items"] == 2
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "channel") == ["7000", "7001"]
    assert rows(ds, "items") == [
        {"item_id": 1, "duration_s": 12.0, "upload_ts": 1648771200, "channel_id": 1,
         "topic": "28"},
        {"item_id": 2, "duration_s": None, "upload_ts": 1646092800, "channel_id": 2,
         "topic": "5"},
    ]  # fmt: skip


# --- sequence ---------------------------------------------------------------------------


def test_sequence_positions_are_synthetic_timestamps(tmp_path: Path, sequence_file: Path) -> None:
    result = import_sequence(sequence_file, tmp_path / "out")
    assert result.synthetic_timestamps
    assert result.row_counts == {"users": 2, "items": 3, "watches": 5}
    ds = Dataset.open(tmp_path / "out")
    assert ds.manifest.synthetic_timestamps
    assert raw_ids(ds, "user") == ["9", "10"]
    w = ds.table("watches")
    assert w.column("user_id").to_pylist() == [1, 1, 1, 2, 2]
    assert w.column("item_id").to_pylist() == [1, 3, 2, 2, 1]  # file order within a user
    assert w.column("ts").to_pylist() == [0, 1, 2, 0, 1]


def test_sequence_accepts_tabs_and_text_ids(tmp_path: Path) -> None:
    src = tmp_path / "s.tsv"
    src.write_text("bob\tx\nann\ty\nbob\ty\n")
    import_sequence(src, tmp_path / "out")
    ds = Dataset.open(tmp_path / "out")
    assert raw_ids(ds, "user") == ["ann", "bob"]
    assert ds.table("watches").column("ts").to_pylist() == [0, 0, 1]


# --- bad input --------------------------------------------------------------------------


def ml100k_with(tmp_path: Path, files: dict[str, bytes], **replace: bytes) -> Path:
    return write_files(tmp_path / "src", {**files, **replace})


def kuairand_with(tmp_path: Path, header: str, *lines: str) -> Path:
    path = tmp_path / "src.tsv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture
def good_row(kuairand_row: Row) -> str:
    return kuairand_row(1, 2, 1649581149287, 1, 1000, 0)


def assert_clean_failure(tmp_path: Path, run: Callable[[Path], object], *expected: str) -> str:
    """`run(OUT)` fails with one line naming every `expected` and leaves nothing behind;
    the message."""
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        run(out)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def test_missing_column(tmp_path: Path, kuairand_header: str) -> None:
    src = kuairand_with(tmp_path, kuairand_header.replace("\tplay_time_ms", ""), "1\t2")
    assert_clean_failure(
        tmp_path, lambda out: import_kuairand(src, out), "src.tsv, line 1", "'play_time_ms'"
    )


def test_extra_column_in_a_header(tmp_path: Path, kuairand_header: str, good_row: str) -> None:
    src = kuairand_with(tmp_path, kuairand_header + "\tbogus", good_row + "\t1")
    assert_clean_failure(tmp_path, lambda out: import_kuairand(src, out), "line 1", "'bogus'")


def test_extra_field_in_a_headerless_file(tmp_path: Path, ml100k_files: dict[str, bytes]) -> None:
    src = ml100k_with(tmp_path, ml100k_files, **{"u.data": b"1\t10\t5\t881250949\n1\t2\t3\t4\t5\n"})
    assert_clean_failure(
        tmp_path,
        lambda out: import_movielens(src, out),
        "u.data, line 2",
        "5 field(s), expected 4",
    )


def test_missing_field_names_the_column(tmp_path: Path, ml100k_files: dict[str, bytes]) -> None:
    src = ml100k_with(tmp_path, ml100k_files, **{"u.data": b"1\t10\t5\t881250949\n1\t2\t3\n"})
    assert_clean_failure(tmp_path, lambda out: import_movielens(src, out), "line 2", "'ts'")


def test_wrong_type(tmp_path: Path, ml100k_files: dict[str, bytes]) -> None:
    src = ml100k_with(tmp_path, ml100k_files, **{"u.user": b"1|24|M|x|1\n2|old|F|x|2\n"})
    assert_clean_failure(
        tmp_path, lambda out: import_movielens(src, out), "u.user, line 2", "'age'", "'old'"
    )


def test_negative_watch_time(
    tmp_path: Path, kuairand_header: str, kuairand_row: Row, good_row: str
) -> None:
    bad = kuairand_row(1, 3, 1649581149287, 1, -5, 0)
    src = kuairand_with(tmp_path, kuairand_header, good_row, bad)
    assert_clean_failure(
        tmp_path, lambda out: import_kuairand(src, out), "line 3", "'play_time_ms'", "-5"
    )


def test_unparseable_timestamp_counts_physical_lines(
    tmp_path: Path, ml100k_files: dict[str, bytes]
) -> None:
    # a blank line 2 is skipped by the parser but still counted in the line number
    data = b"1\t10\t5\t881250949\n\n2\t10\t3\tyesterday\n"
    src = ml100k_with(tmp_path, ml100k_files, **{"u.data": data})
    assert_clean_failure(
        tmp_path, lambda out: import_movielens(src, out), "line 3", "'ts'", "'yesterday'"
    )


def test_empty_file(tmp_path: Path) -> None:
    src = tmp_path / "empty.txt"
    src.write_text("")
    assert_clean_failure(tmp_path, lambda out: import_sequence(src, out), "empty.txt", "empty")


def test_header_without_rows(tmp_path: Path, kuairand_header: str) -> None:
    src = kuairand_with(tmp_path, kuairand_header)
    assert_clean_failure(tmp_path, lambda out: import_kuairand(src, out), "no data rows")


def test_duplicate_user_row(tmp_path: Path, ml100k_files: dict[str, bytes]) -> None:
    users = b"1|24|M|x|1\n2|30|F|x|2\n1|25|M|x|1\n"
    src = ml100k_with(tmp_path, ml100k_files, **{"u.user": users})
    assert_clean_failure(
        tmp_path,
        lambda out: import_movielens(src, out),
        "u.user, line 3",
        "duplicate id '1' (first on line 1)",
    )


def test_missing_id_value(tmp_path: Path, kuairand_header: str, good_row: str) -> None:
    src = kuairand_with(tmp_path, kuairand_header, good_row, good_row.replace("1\t2\t", "\t2\t", 1))
    assert_clean_failure(tmp_path, lambda out: import_kuairand(src, out), "line 3", "'user_id'")


@pytest.mark.parametrize("name", ["missing.txt", "."])
def test_unreadable_path(tmp_path: Path, name: str) -> None:
    src = tmp_path / "in" / name
    (tmp_path / "in").mkdir()
    assert_clean_failure(tmp_path, lambda out: import_sequence(src, out), "cannot read")


def test_existing_output_needs_force(tmp_path: Path, sequence_file: Path) -> None:
    out = tmp_path / "out"
    import_sequence(sequence_file, out)
    with pytest.raises(DataError, match="already exists"):
        import_sequence(sequence_file, out)
    sequence_file.write_text("1 1\n")
    import_sequence(sequence_file, out, force=True)
    assert Dataset.open(out).num_rows("watches") == 1


def test_failed_forced_import_keeps_the_old_dataset(tmp_path: Path, sequence_file: Path) -> None:
    out = tmp_path / "out"
    import_sequence(sequence_file, out)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1 1\n")
    with pytest.raises(DataError):
        import_sequence(bad, out, force=True)
    assert Dataset.open(out).num_rows("watches") == 5
