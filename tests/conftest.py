"""Tiny raw input files for the data loader tests (written by the tests, never real data)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

GENRES = 19  # ml-100k u.item carries 19 genre flags


def _flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(GENRES))


@pytest.fixture
def ml100k_files() -> dict[str, bytes]:
    """The GroupLens ml-100k layout: u.data (tab), u.user and u.item (pipe, Latin-1).

    4 users (user 4 never rates), 3 items, 5 ratings.
    """
    return {
        "u.data": b"1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250948\n"
        b"3\t30\t1\t881250960\n2\t20\t2\t881250951\n",
        "u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|T8H1N\n"
        b"4|30|F|other|\n",
        "u.item": (
            f"10|Caf\xe9 (1995)|01-Jan-1995||http://x|{_flags(3, 5)}\n"
            f"20|Heat (1995)|15-Dec-1995||http://y|{_flags(1, 16)}\n"
            f"30|unknown||||{_flags()}\n"
        ).encode("latin-1"),
    }


@pytest.fixture
def recbole_files() -> dict[str, bytes]:
    """RecBole atomic files of ml-100k: typed headers, tab-separated, 3 users, 2 items."""
    return {
        "ml-100k.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t242\t1\t878887116\n",
        "ml-100k.user": b"user_id:token\tage:token\tgender:token\toccupation:token\t"
        b"zip_code:token\n196\t49\tM\twriter\t55105\n186\t39\tF\texecutive\t00000\n"
        b"22\t25\tM\twriter\t40206\n",
        "ml-100k.item": b"item_id:token\tmovie_title:token_seq\trelease_year:token\t"
        b"class:token_seq\n242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\t"
        b"Crime Film-Noir Mystery Thriller\n",
    }


KUAIRAND_HEADER = (
    "user_id\tvideo_id\tdate\thourmin\ttime_ms\tis_click\tis_follow\tis_comment\tis_forward\t"
    "long_view\tplay_time_ms\tduration_ms\tcomment_stay_time\tis_profile_enter\tlabel\ttimestamp"
)


def _kuairand_row(user: int, video: int, ms: int, click: int, play: int, dur: int) -> str:
    return f"{user}\t{video}\t20220410\t1700\t{ms}\t{click}\t0\t0\t0\t0\t{play}\t{dur}\t0\t0\t1\tx"


@pytest.fixture
def kuairand_header() -> str:
    """The header of the KuaiRand sample log (tab-separated)."""
    return KUAIRAND_HEADER


@pytest.fixture
def kuairand_row() -> Callable[[int, int, int, int, int, int], str]:
    """Build a log row: (user, video, time_ms, is_click, play_time_ms, duration_ms)."""
    return _kuairand_row


@pytest.fixture
def kuairand_tsv(tmp_path: Path) -> Path:
    """6 impression rows: user 111 sees two videos in one request (same time_ms)."""
    rows = [
        _kuairand_row(111, 500, 1649581149287, 1, 46186, 45916),
        _kuairand_row(111, 600, 1649581149287, 0, 5148, 0),
        _kuairand_row(111, 700, 1649664552983, 1, 14549, 0),
        _kuairand_row(90, 500, 1649500000000, 0, 2000, 45000),
        _kuairand_row(90, 700, 1649500001000, 1, 1000, 30000),
        _kuairand_row(111, 600, 1649400000000, 1, 3000, 0),
    ]
    path = tmp_path / "log.tsv"
    path.write_text("\n".join([KUAIRAND_HEADER, *rows]) + "\n")
    return path


@pytest.fixture
def sequence_file(tmp_path: Path) -> Path:
    """`user item` lines; user 10 sorts after user 9 numerically, not as text."""
    path = tmp_path / "seq.txt"
    path.write_text("9 1\n10 2\n9 3\n10 1\n9 2\n")
    return path


# A hung Dask cluster fails the test instead of the suite (pytest-timeout is not a
# dependency): `pytestmark = pytest.mark.usefixtures("dask_time_bound")`.
DASK_TIME_LIMIT_S = 240


@pytest.fixture
def dask_time_bound(request: pytest.FixtureRequest) -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"{request.node.name} ran past {DASK_TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(DASK_TIME_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """A local Dask cluster of two single-threaded worker processes, as a small real
    cluster would have; its scheduler's address."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c.scheduler_address
