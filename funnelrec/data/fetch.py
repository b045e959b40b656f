"""Fetch MovieLens-100K from its publisher, or from a wheel on the package index.

    funnelrec data fetch movielens-100k --out /tmp/ml100k

First choice: GroupLens' `ml-100k.zip` over HTTPS, checked against the MD5 that GroupLens
publishes beside it (`ml-100k.zip.md5`). Where that host cannot be reached (or the file
does not match), the `recbole==1.2.1` wheel is fetched with `pip download --no-deps`; it
carries RecBole's atomic copy of the same data (`recbole/dataset_example/ml-100k/`), read
straight out of the wheel (a zip) after checking the wheel's SHA-256 against the digest
the package index publishes for it. Downloads go to a temporary directory, removed after.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from funnelrec.data.loaders import ImportResult, import_movielens
from funnelrec.errors import FunnelrecError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# Published by GroupLens as https://files.grouplens.org/datasets/movielens/ml-100k.zip.md5
GROUPLENS_MD5 = "0e33842e24a9c977be4e0107933c0723"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
# sha256 of recbole-1.2.1-py3-none-any.whl as listed on https://pypi.org/simple/recbole/
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/"


class FetchFailed(FunnelrecError):
    """One source could not deliver a verified file (the next source is tried)."""


@dataclass(frozen=True)
class FetchResult:
    """Which source delivered the data, and the import it went into."""

    source: str  # "grouplens" or "pypi-wheel"
    detail: str  # URL / requirement and the checksum verified
    fallback_reason: str | None  # why GroupLens was not used, when it was not
    imported: ImportResult


def check_digest(path: Path, algorithm: str, expected: str, *, what: str) -> None:
    """Raise `FetchFailed` unless the `algorithm` digest of `path` is `expected`."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise FetchFailed(
            f"{what}: {algorithm} {h.hexdigest()} does not match the published {expected}"
        )


def download(
    url: str,
    dest: Path,
    *,
    md5: str,
    timeout: float = 10.0,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download `url` to `dest` and check its MD5; raise `FetchFailed` on any failure.

    `on_progress(done_bytes, total_bytes_or_None)` is called per block.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as f:
            total = response.headers.get("Content-Length")
            size = int(total) if total else None
            done = 0
            for block in iter(lambda: response.read(1 << 16), b""):
                f.write(block)
                done += len(block)
                if on_progress is not None:
                    on_progress(done, size)
    except (OSError, ValueError) as e:  # URLError, timeouts and HTTP errors are OSErrors
        raise FetchFailed(f"{url}: {getattr(e, 'reason', e)}") from None
    check_digest(dest, "md5", md5, what=url)
    return dest


def pip_download(
    requirement: str, dest: Path, *, sha256: str, pip_args: Sequence[str] = ()
) -> Path:
    """`pip download --no-deps` one wheel into `dest`, check its SHA-256, return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
        "-d", str(dest), *pip_args, requirement,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise FetchFailed(f"pip download {requirement}: {lines[-1] if lines else 'failed'}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchFailed(f"pip download {requirement}: expected one wheel, got {len(wheels)}")
    check_digest(wheels[0], "sha256", sha256, what=wheels[0].name)
    return wheels[0]


def fetch_movielens_100k(
    out: Path,
    *,
    force: bool = False,
    url: str = GROUPLENS_URL,
    md5: str = GROUPLENS_MD5,
    requirement: str = RECBOLE_REQUIREMENT,
    sha256: str = RECBOLE_SHA256,
    pip_args: Sequence[str] = (),
    timeout: float = 10.0,
    on_progress: Callable[[int, int | None], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> FetchResult:
    """Fetch MovieLens-100K (GroupLens, else the RecBole wheel) and import it into `out`.

    The keyword arguments name the sources and their checksums; the defaults are the
    real ones (tests point them at local files).
    """
    say = on_status or (lambda _msg: None)
    out = Path(out)
    if out.exists() and not force:
        raise FunnelrecError(f"{out} already exists (use --force to overwrite)")
    with tempfile.TemporaryDirectory(prefix="funnelrec-fetch-") as tmp:
        say(f"downloading {url}")
        try:
            archive = download(
                url, Path(tmp) / "ml-100k.zip", md5=md5, timeout=timeout, on_progress=on_progress
            )
        except FetchFailed as e:
            reason = str(e)
            say(f"GroupLens not usable ({reason}); trying {requirement} from the package index")
            wheel_dir = Path(tmp) / "wheel"
            wheel_dir.mkdir()
            try:
                wheel = pip_download(requirement, wheel_dir, sha256=sha256, pip_args=pip_args)
            except FetchFailed as e2:
                raise FunnelrecError(f"cannot fetch movielens-100k: {reason}; and {e2}") from None
            detail = f"{requirement} ({wheel.name}, sha256 verified)"
            imported = import_movielens(
                wheel,
                out,
                force=force,
                within=RECBOLE_ML100K,
                # the download folder is temporary: record the archive's name, not its path
                extra={"fetched_from": f"pypi: {detail}", "files": [wheel.name]},
            )
            return FetchResult("pypi-wheel", detail, reason, imported)
        detail = f"{url} (md5 verified)"
        imported = import_movielens(
            archive,
            out,
            force=force,
            extra={"fetched_from": f"grouplens: {detail}", "files": [archive.name]},
        )
        return FetchResult("grouplens", detail, None, imported)
