from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.dataset import Dataset
from funnelrec.data.describe import Spread, describe
from funnelrec.data.loaders import import_movielens
from funnelrec.errors import DataError

runner = CliRunner()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_import_prints_a_summary_and_describe_a_table(tmp_path: Path, kuairand_tsv: Path) -> None:
    out = tmp_path / "kr"
    result = runner.invoke(
        app, ["data", "import", "kuairand", str(kuairand_tsv), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "4 watches, 6 impressions, 2 users, 3 items" in result.output
    assert "time range: 2022-04-08 .. 2022-04-11" in result.output

    result = runner.invoke(app, ["data", "describe", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("watches per user", "impressions per request", "duration_s", "p99"):
        assert text in result.output


def test_import_needs_force_to_replace(tmp_path: Path, sequence_file: Path) -> None:
    out = tmp_path / "seq"
    args = ["data", "import", "sequence", str(sequence_file), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and isinstance(again.exception, DataError)
    assert "already exists" in str(again.exception)
    sequence_file.write_text("1 1\n")
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert Dataset.open(out).num_rows("watches") == 1
    assert "synthetic" in forced.output


def test_bad_input_fails_without_leaving_a_directory(
    tmp_path: Path, ml100k_files: dict[str, bytes]
) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    for name, data in ml100k_files.items():
        (src / name).write_bytes(data)
    (src / "u.data").write_bytes(b"1\t10\t5\tsoon\n")
    result = runner.invoke(
        app, ["data", "import", "movielens", str(src), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "u.data, line 1, column 'ts'" in str(result.exception)
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == []


def test_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "import", "parquet", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_console_script_prints_one_line_error(tmp_path: Path) -> None:
    code = "import sys; from funnelrec.cli import main; sys.argv[0] = 'funnelrec'; main()"
    missing = tmp_path / "missing.txt"
    args = ["data", "import", "sequence", str(missing), "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {missing}: cannot read (no such file or directory)"
    ]


KILL_AT_COMMIT = """
import os, signal, sys
from funnelrec.data import dataset
from funnelrec.data.loaders import import_sequence

def die(self):  # the process dies with every table written, just before the rename
    os.kill(os.getpid(), signal.SIGKILL)

dataset.AtomicDirectory.commit = die
import_sequence(sys.argv[1], sys.argv[2])
"""


def test_import_killed_midway_leaves_no_dataset_and_is_swept(
    tmp_path: Path, sequence_file: Path
) -> None:
    out = tmp_path / "data" / "seq"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT, str(sequence_file), str(out)])
    assert proc.returncode == -9
    assert not out.exists()
    leftovers = hidden(out.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".seq.tmp-")
    assert (out.parent / leftovers[0] / "watches.parquet").exists()  # it was killed late

    result = runner.invoke(
        app, ["data", "import", "sequence", str(sequence_file), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert Dataset.open(out).num_rows("watches") == 5
    assert hidden(out.parent) == []  # the dead process's temporary directory is gone


def test_describe_counts_users_and_items_without_watches_as_zero(
    tmp_path: Path, ml100k_files: dict[str, bytes]
) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    for name, data in ml100k_files.items():
        (src / name).write_bytes(data)
    import_movielens(src, tmp_path / "out")
    d = describe(tmp_path / "out")
    # watches per user: 2, 2, 1 and 0 (user 4 never rated); per item: 2, 2, 1
    assert d.user_activity == Spread(p50=1.5, p90=2.0, p99=2.0, max=2, zero=1)
    assert d.item_popularity.p50 == 2.0 and d.item_popularity.zero == 0
    assert d.watch_time_known == 0.0 and d.impressions_per_request is None
    assert d.optional_columns["users"] == ["age", "gender", "region"]
