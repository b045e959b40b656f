from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from funnelrec.data.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    AtomicDirectory,
    Dataset,
    DatasetWriter,
    Manifest,
    write_json_atomic,
)
from funnelrec.errors import ArtifactError, DataError


def users(n: int) -> pa.Table:
    return pa.table({"user_id": pa.array(range(1, n + 1), pa.int64())})


def items(n: int) -> pa.Table:
    return pa.table({"item_id": pa.array(range(1, n + 1), pa.int64()), "topic": ["t"] * n})


def watches(ts: list[int]) -> pa.Table:
    n = len(ts)
    return pa.table(
        {
            "user_id": [1] * n,
            "item_id": [1] * n,
            "ts": ts,
            "watch_time_s": pa.nulls(n, pa.float32()),
            "source": pa.nulls(n, pa.string()),
        }
    )


def write_small(out: Path, **kwargs: object) -> Path:
    with DatasetWriter(out, source="test", **kwargs) as w:  # type: ignore[arg-type]
        w.write("users", users(2))
        w.write("items", items(3))
        w.write("watches", watches([50, 10]))
        w.write("watches", watches([70]))  # a second chunk of the same table
        w.add_id_map("user", ["u-a", "u-b"])
    return out


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_chunked_writes_and_manifest_round_trip(tmp_path: Path) -> None:
    ds = Dataset.open(write_small(tmp_path / "d", synthetic_timestamps=True, extra={"k": 1}))
    m = ds.manifest
    assert m.format_version == FORMAT_VERSION and m.source == "test"
    assert m.row_counts == {"users": 2, "items": 3, "watches": 3}
    assert m.time_range == {"min_ts": 10, "max_ts": 70}
    assert m.optional_columns == {"users": [], "items": ["topic"], "watches": []}
    assert m.synthetic_timestamps and m.extra == {"k": 1}
    assert Manifest.from_file(ds.path / MANIFEST) == m
    assert ds.table("watches", columns=["ts"]).column(0).to_pylist() == [50, 10, 70]
    assert [b.num_rows for b in ds.batches("watches", batch_size=2)] == [2, 1]
    assert ds.columns("items") == ["item_id", "topic"] and ds.has("items")
    assert not ds.has("impressions")
    ids = ds.id_map("user")
    assert ids.column("raw_id").to_pylist() == ["u-a", "u-b"]
    assert ids.column("id").to_pylist() == [1, 2]
    assert hidden(tmp_path) == []


def test_reading_what_is_not_there(tmp_path: Path) -> None:
    ds = Dataset.open(write_small(tmp_path / "d"))
    with pytest.raises(DataError, match="no 'searches' table"):
        ds.table("searches")
    with pytest.raises(DataError, match="no id map for 'item'"):
        ds.id_map("item")
    with pytest.raises(ArtifactError, match="no such dataset directory"):
        Dataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not a funnelrec dataset"):
        Dataset.open(tmp_path / "empty")


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    out = write_small(tmp_path / "d")
    raw = json.loads((out / MANIFEST).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (out / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="format version"):
        Dataset.open(out)


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    a = Dataset.open(write_small(tmp_path / "a")).fingerprint()
    assert Dataset.open(write_small(tmp_path / "b")).fingerprint() == a
    with DatasetWriter(tmp_path / "c", source="test") as w:
        w.write("users", users(2))
        w.write("items", items(3))
        w.write("watches", watches([50, 10, 70, 80]))
    assert Dataset.open(tmp_path / "c").fingerprint() != a


def test_invalid_chunk_aborts_and_counts_rows_across_chunks(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="row 3"), DatasetWriter(tmp_path / "d", source="t") as w:
        w.write("watches", watches([1, 2]))
        bad = watches([3]).set_column(1, "item_id", pa.array([0], pa.int64()))
        w.write("watches", bad)
    assert not (tmp_path / "d").exists() and hidden(tmp_path) == []


def test_chunks_must_keep_their_columns(tmp_path: Path) -> None:
    with (
        pytest.raises(DataError, match="earlier chunks"),
        DatasetWriter(tmp_path / "d", source="t") as w,
    ):
        w.write("items", items(2))
        w.write("items", items(2).drop_columns(["topic"]))
    assert hidden(tmp_path) == []


def test_missing_required_table_fails_at_commit(tmp_path: Path) -> None:
    with (
        pytest.raises(DataError, match="no items, watches table"),
        DatasetWriter(tmp_path / "d", source="t") as w,
    ):
        w.write("users", users(1))
    assert not (tmp_path / "d").exists() and hidden(tmp_path) == []


def test_force_replaces_and_a_failed_forced_write_keeps_the_old(tmp_path: Path) -> None:
    out = write_small(tmp_path / "d")
    with pytest.raises(DataError, match="already exists"):
        DatasetWriter(out, source="t")
    with pytest.raises(RuntimeError), DatasetWriter(out, source="t", force=True) as w:
        w.write("users", users(5))
        raise RuntimeError("interrupted")
    assert Dataset.open(out).num_rows("users") == 2
    with DatasetWriter(out, source="t", force=True) as w:
        w.write("users", users(5))
        w.write("items", items(1))
        w.write("watches", watches([1]))
    assert Dataset.open(out).num_rows("users") == 5
    assert hidden(tmp_path) == []


def test_target_appearing_during_the_write_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "d"
    with pytest.raises(DataError, match="already exists"), DatasetWriter(out, source="t") as w:
        w.write("users", users(1))
        w.write("items", items(1))
        w.write("watches", watches([1]))
        out.mkdir()  # someone else created it meanwhile
        (out / "theirs").write_text("x")
    assert (out / "theirs").exists() and hidden(tmp_path) == []


def test_subdir_holds_a_sources_own_files(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "d", source="sim") as w:
        (w.subdir("truth") / "params.json").write_text("{}")
        w.write("users", users(1))
        w.write("items", items(1))
        w.write("watches", watches([1]))
    assert (tmp_path / "d" / "truth" / "params.json").read_text() == "{}"


def test_stale_temporary_directories_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    stale = tmp_path / f".d.tmp-{int(dead.stdout)}-abcd1234"
    stale.mkdir()
    mine = tmp_path / f".d.tmp-{os.getpid()}-00000000"  # a live process: left alone
    mine.mkdir()
    directory = AtomicDirectory(tmp_path / "d")
    assert not stale.exists() and mine.exists()
    directory.abort()
    assert hidden(tmp_path) == [mine.name]


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"n": np.int64(3), "p": tmp_path})
    assert json.loads(path.read_text()) == {"n": 3, "p": str(tmp_path)}
    assert hidden(tmp_path) == []
