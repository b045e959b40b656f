from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.data.fetch import (
    RECBOLE_ML100K,
    FetchFailed,
    check_digest,
    download,
    fetch_movielens_100k,
)
from funnelrec.data.loaders import import_movielens
from funnelrec.errors import FunnelrecError


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(folder: Path, files: dict[str, bytes]) -> Path:
    """A minimal but installable-looking recbole 1.2.1 wheel carrying the atomic files."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "recbole-1.2.1-py3-none-any.whl"
    info = "recbole-1.2.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/__init__.py", "")
        for name, data in files.items():
            z.writestr(RECBOLE_ML100K + name, data)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: recbole\nVersion: 1.2.1\n")
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


def make_grouplens_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"ml-100k/{name}", data)
        z.writestr("ml-100k/u1.base", b"not read\n")
    return path


def test_atomic_files_are_read_straight_out_of_the_wheel(
    tmp_path: Path, recbole_files: dict[str, bytes]
) -> None:
    wheel = make_wheel(tmp_path / "w", recbole_files)
    result = import_movielens(wheel, tmp_path / "out", within=RECBOLE_ML100K)
    assert result.row_counts == {"users": 3, "items": 2, "watches": 3}
    assert result.extra["files"][0].endswith("!" + RECBOLE_ML100K + "ml-100k.inter")
    assert Dataset.open(tmp_path / "out").table("users").column("age").to_pylist() == [25, 39, 49]


def test_download_checks_the_md5(tmp_path: Path, ml100k_files: dict[str, bytes]) -> None:
    archive = make_grouplens_zip(tmp_path / "ml-100k.zip", ml100k_files)
    url = archive.as_uri()
    seen: list[int] = []
    got = download(
        url, tmp_path / "a.zip", md5=md5(archive), on_progress=lambda d, t: seen.append(d)
    )
    assert got.read_bytes() == archive.read_bytes() and seen[-1] == archive.stat().st_size
    with pytest.raises(FetchFailed, match="does not match the published"):
        download(url, tmp_path / "b.zip", md5="0" * 32)
    with pytest.raises(FetchFailed):
        download((tmp_path / "nowhere.zip").as_uri(), tmp_path / "c.zip", md5="0" * 32)


def test_fetch_uses_grouplens_when_it_answers(
    tmp_path: Path, ml100k_files: dict[str, bytes]
) -> None:
    archive = make_grouplens_zip(tmp_path / "ml-100k.zip", ml100k_files)
    result = fetch_movielens_100k(tmp_path / "out", url=archive.as_uri(), md5=md5(archive))
    assert result.source == "grouplens" and result.fallback_reason is None
    assert result.imported.row_counts == {"users": 4, "items": 3, "watches": 5}
    assert Dataset.open(tmp_path / "out").manifest.extra["fetched_from"].startswith("grouplens")


def test_fetch_falls_back_to_the_wheel_from_the_package_index(
    tmp_path: Path, recbole_files: dict[str, bytes]
) -> None:
    # A local package index (pip's --find-links) stands in for PyPI: pip itself runs.
    index = tmp_path / "index"
    wheel = make_wheel(index, recbole_files)
    unreachable = (tmp_path / "missing.zip").as_uri()
    local = ("--no-index", "--find-links", str(index))
    result = fetch_movielens_100k(
        tmp_path / "out", url=unreachable, sha256=sha256(wheel), pip_args=local
    )
    assert result.source == "pypi-wheel"
    assert result.fallback_reason is not None and "missing.zip" in result.fallback_reason
    assert result.imported.row_counts["watches"] == 3


def test_check_digest_refuses_a_file_that_is_not_the_published_one(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"wheel bytes")
    check_digest(wheel, "sha256", sha256(wheel), what="x.whl")
    with pytest.raises(FetchFailed, match=r"x\.whl: sha256 [0-9a-f]{64} does not match"):
        check_digest(wheel, "sha256", "0" * 64, what="x.whl")


def test_fetch_does_not_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FunnelrecError, match="already exists"):
        fetch_movielens_100k(tmp_path / "out", url="file:///nonexistent")
