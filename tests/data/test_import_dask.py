"""`funnelrec data import events` on a Dask cluster: the dataset the local import writes,
value for value (tables, id maps, manifest, rejected rows), and the same bad-row errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import import_events
from funnelrec.engines import SCHEDULER_ENV, DaskEngine, LocalEngine
from funnelrec.errors import DataError, FunnelrecError

pytest.importorskip("distributed")
pytestmark = pytest.mark.usefixtures("dask_time_bound")

DAY = 1714521600  # 2024-05-01T00:00:00Z
TABLES = ("watches", "impressions", "searches", "users", "items")


def _iso(ts: np.ndarray) -> list[str]:
    return [np.datetime_as_string(np.datetime64(int(t), "s")) + "Z" for t in ts]


def _events(rng: np.random.Generator, n: int, day: int) -> dict[str, Any]:
    """`n` events of one day: string ids (not all numbers: numbered as text), ISO times."""
    users = [f"u-{u}" for u in rng.integers(0, 40, n)]
    items = [f"v-{i}" for i in rng.integers(0, 30, n)]
    # whole minutes: several rows of a user at one time form one request (impressions)
    ts = DAY + day * 86400 + 60 * rng.integers(0, 30, n)
    return {"users": users, "items": items, "ts": ts}


def write_logs(root: Path, bad: bool = False) -> Path:
    """Watches in two CSV files and a Parquet file, impressions in Parquet, searches, users
    and items in CSV; with `bad`, a bad row in each of a later file of three tables."""
    rng = np.random.default_rng(3)
    logs = root / "logs"
    (logs / "watches").mkdir(parents=True)
    for k, name in enumerate(("a.csv", "b.csv", "c.parquet")):
        e = _events(rng, 150, k)
        times = _iso(e["ts"])
        ms = rng.integers(0, 60_000, 150)
        if bad and name == "b.csv":
            times[40] = "yesterday"
            times[90] = "2024-13-01"
        if name.endswith(".csv"):
            lines = ["uid,video,at,ms"] + [
                f"{u},{i},{t},{m}"
                for u, i, t, m in zip(e["users"], e["items"], times, ms, strict=True)
            ]
            (logs / "watches" / name).write_text("\n".join(lines) + "\n")
        else:
            table = {"uid": e["users"], "video": e["items"], "at": times, "ms": ms}
            pq.write_table(pa.table(table), logs / "watches" / name)
    e = _events(rng, 200, 1)
    clicked = [bool(c) for c in rng.integers(0, 2, 200)]
    imp = pa.table(
        {
            "uid": e["users"],
            "video": e["items"],
            "at": _iso(e["ts"]),
            "click": pa.array(
                ["maybe" if bad and r == 120 else str(c) for r, c in enumerate(clicked)]
            ),
        }
    )
    pq.write_table(imp, logs / "impressions.parquet", row_group_size=64)
    e = _events(rng, 60, 2)
    (logs / "searches.csv").write_text(
        "uid,at,q\n"
        + "".join(
            f"{u},{t},query {j % 7}\n"
            for j, (u, t) in enumerate(zip(e["users"], _iso(e["ts"]), strict=True))
        )
    )
    user_rows = [f"u-{u},{20 + u},{'fm'[u % 2]}" for u in range(0, 40, 2)]
    if bad:
        user_rows.insert(7, "u-4,31,f")  # u-4 described twice
    (logs / "users.csv").write_text("uid,age,gender\n" + "\n".join(user_rows) + "\n")
    item_rows = [f"v-{i},ch-{i % 5},{'en' if i % 3 else 'de'}" for i in range(30)]
    (logs / "items.csv").write_text("vid,channel,lang\n" + "\n".join(item_rows) + "\n")
    mapping = logs / "map.toml"
    mapping.write_text(
        """\
[watches]
path = ["watches/a.csv", "watches/b.csv", "watches/c.parquet"]
user = "uid"
item = "video"
time = "at"
time_unit = "iso"
watch_time = "ms"
watch_time_unit = "ms"

[impressions]
path = "impressions.parquet"
user = "uid"
item = "video"
time = "at"
time_unit = "iso"
clicked = "click"

[searches]
path = "searches.csv"
user = "uid"
time = "at"
time_unit = "iso"
query = "q"

[users]
path = "users.csv"
user = "uid"
age = "age"
gender = "gender"

[items]
path = "items.csv"
item = "vid"
channel = "channel"
language = "lang"
"""
    )
    return mapping


def _manifest(path: Path) -> dict[str, Any]:
    extra = json.loads((path / "manifest.json").read_text())["extra"]
    for period in extra["periods"]:
        period.pop("added_at")
    return extra


def assert_same(local: Path, dask: Path) -> None:
    a, b = Dataset.open(local), Dataset.open(dask)
    for name in TABLES:
        assert a.table(name).equals(b.table(name)), name
    for space in ("user", "item", "channel"):
        assert a.id_map(space).equals(b.id_map(space)), space
    assert _manifest(local) == _manifest(dask)


def test_clean_logs_equal_to_the_local_import(tmp_path: Path, cluster: str) -> None:
    mapping = write_logs(tmp_path)
    batches: dict[str, list[tuple[str, int]]] = {"local": [], "dask": []}
    import_events(
        mapping, tmp_path / "local", on_batch=lambda name, n: batches["local"].append((name, n))
    )
    import_events(
        mapping,
        tmp_path / "dask",
        engine=DaskEngine(cluster),
        on_batch=lambda name, n: batches["dask"].append((name, n)),
    )
    assert_same(tmp_path / "local", tmp_path / "dask")
    ds = Dataset.open(tmp_path / "dask")
    assert ds.num_rows("watches") == 450
    assert ds.num_rows("impressions") == 200
    # progress as the local import gives it: the same batches, in the same order
    assert batches["dask"] == batches["local"]
    assert sum(n for name, n in batches["dask"] if name == "watches") == 450


def test_a_bad_row_fails_the_same_way(tmp_path: Path, cluster: str) -> None:
    mapping = write_logs(tmp_path, bad=True)
    with pytest.raises(DataError) as local:
        import_events(mapping, tmp_path / "local")
    with pytest.raises(DataError) as dask:
        import_events(mapping, tmp_path / "dask", engine=DaskEngine(cluster))
    assert str(dask.value) == str(local.value)
    assert "watches/b.csv, line 42, column 'at': 'yesterday'" in str(dask.value)
    assert not (tmp_path / "dask").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dask")]


def test_a_relative_mapping_path_names_files_the_same_way(
    tmp_path: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers started elsewhere: they read the files this process's relative paths
    name, and messages name them as the local import does."""
    write_logs(tmp_path, bad=True)
    monkeypatch.chdir(tmp_path)
    mapping = Path("logs/map.toml")
    with pytest.raises(DataError) as local:
        import_events(mapping, Path("local"))
    with pytest.raises(DataError) as dask:
        import_events(mapping, Path("dask"), engine=DaskEngine(cluster))
    assert str(dask.value) == str(local.value)
    assert str(dask.value).startswith("logs/watches/b.csv, line 42")


def test_a_file_that_cannot_be_read_fails_the_same_way(tmp_path: Path, cluster: str) -> None:
    """An error raised in a task (here: a mapped column missing) reaches the command as the
    local import words it."""
    mapping = write_logs(tmp_path)
    b = mapping.parent / "watches" / "b.csv"
    b.write_text(b.read_text().replace("uid,video,at,ms", "uid,video,when,ms", 1))
    with pytest.raises(DataError) as local:
        import_events(mapping, tmp_path / "local")
    with pytest.raises(DataError) as dask:
        import_events(mapping, tmp_path / "dask", engine=DaskEngine(cluster))
    assert str(dask.value) == str(local.value)
    assert "b.csv" in str(dask.value) and "'at'" in str(dask.value)
    assert not (tmp_path / "dask").exists()


def test_bad_rows_skipped_write_the_same_rejected_rows(tmp_path: Path, cluster: str) -> None:
    mapping = write_logs(tmp_path, bad=True)
    import_events(mapping, tmp_path / "local", bad_rows="skip")
    import_events(mapping, tmp_path / "dask", bad_rows="skip", engine=DaskEngine(cluster))
    assert_same(tmp_path / "local", tmp_path / "dask")
    rejected = tmp_path / "local" / "rejected" / "period-1"
    names = sorted(p.name for p in rejected.iterdir())
    assert names == ["impressions.parquet", "users.parquet", "watches.parquet"]
    for name in names:
        theirs = pq.read_table(tmp_path / "dask" / "rejected" / "period-1" / name)
        assert pq.read_table(rejected / name).equals(theirs), name
    assert _manifest(tmp_path / "dask")["rejected"] == {"watches": 2, "impressions": 1, "users": 1}


def test_interrupted_and_rerun_gives_the_same_dataset(tmp_path: Path, cluster: str) -> None:
    """An import stopped half-way leaves nothing; run again, it starts over (the tasks
    write nothing, so the ones still running on the cluster cannot get in its way)."""
    mapping = write_logs(tmp_path)
    import_events(mapping, tmp_path / "local")
    seen: list[int] = []

    def stop_after_two(name: str, n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        import_events(
            mapping, tmp_path / "dask", engine=DaskEngine(cluster), on_batch=stop_after_two
        )
    assert not (tmp_path / "dask").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dask")]
    import_events(mapping, tmp_path / "dask", engine=DaskEngine(cluster))
    assert_same(tmp_path / "local", tmp_path / "dask")


def test_the_command_on_a_cluster(tmp_path: Path, cluster: str) -> None:
    mapping = write_logs(tmp_path)
    cli = CliRunner()
    local = cli.invoke(
        app, ["data", "import", "events", str(mapping), "--out", str(tmp_path / "l")]
    )
    assert local.exit_code == 0, local.output
    args = ["data", "import", "events", str(mapping), "--out", str(tmp_path / "d")]
    result = cli.invoke(app, [*args, "--engine", "dask", "--cluster", cluster])
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "l", tmp_path / "d")
    wrong = cli.invoke(app, [*args, "--cluster", cluster])
    assert wrong.exit_code != 0 and "--cluster goes with --engine dask" in wrong.output


def test_no_scheduler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    with pytest.raises(FunnelrecError, match=SCHEDULER_ENV):
        import_events(write_logs(tmp_path), tmp_path / "d", engine=DaskEngine())


def test_local_processes_give_results_in_order() -> None:
    assert list(LocalEngine(workers=2).imap(abs, [-3, 1, -2, 5, -4])) == [3, 1, 2, 5, 4]
