"""Splits: leave-last-out per user and a global time split; the (group, ts) time index."""

from __future__ import annotations

import numpy as np
import pytest

from funnelrec.errors import DataError, FunnelrecError
from funnelrec.features.splits import (
    NEVER,
    TEST,
    TRAIN,
    VALID,
    TimeIndex,
    leave_last_out,
    time_boundaries,
    time_split,
    user_offsets,
)

# Watches sorted by (user, ts); user 2 has only two watches, user 4 has equal timestamps.
USER = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4])
TS = np.array([1, 2, 2, 5, 3, 4, 1, 7, 9, 6, 6, 6])


def test_leave_last_out_holds_out_last_two() -> None:
    sp = leave_last_out(user_offsets(USER), TS, min_watches=3)
    part = sp.part_of_watches(len(TS))
    # test = last watch, valid = the one before, per user; user 2 (2 watches) keeps all
    assert part.tolist() == [0, 0, 1, 2, 0, 0, 0, 1, 2, 0, 1, 2]
    assert sp.valid_from[[1, 2, 3, 4]].tolist() == [2, NEVER, 7, 6]
    assert sp.test_from[[1, 3, 4]].tolist() == [5, 9, 6]
    # Ties: row order decides; the training prefix is always before the held-out watches.
    for u in (1, 3, 4):
        lo, hi = sp.user_start[u], sp.user_start[u + 1]
        assert sp.train_end[u] == hi - 2 and sp.valid_end[u] == hi - 1 and lo < hi
    # Other events by time: before the validation watch -> train, and so on.
    ev_part = sp.part_of(np.array([1, 1, 1, 1, 2, 3, 9]), np.array([1, 2, 4, 5, 100, 8, 5]))
    assert ev_part.tolist() == [TRAIN, VALID, VALID, TEST, TRAIN, VALID, TRAIN]
    with pytest.raises(FunnelrecError):
        leave_last_out(user_offsets(USER), TS, min_watches=1)


def test_leave_last_out_holds_out_more_validation_watches() -> None:
    sp = leave_last_out(user_offsets(USER), TS, min_watches=3, valid_n=2)
    part = sp.part_of_watches(len(TS))
    # user 1 (4 watches): 1 train, 2 valid, 1 test; users 3 and 4 (3 watches) keep one
    # training watch, so only one is validation; user 2 (2 watches) keeps all
    assert part.tolist() == [0, 1, 1, 2, 0, 0, 0, 1, 2, 0, 1, 2]
    assert sp.valid_from[1] == 2 and sp.test_from[1] == 5
    with pytest.raises(FunnelrecError, match="valid_n"):
        leave_last_out(user_offsets(USER), TS, valid_n=0)


def test_min_watches_keeps_light_users_in_training() -> None:
    sp = leave_last_out(user_offsets(USER), TS, min_watches=4)
    part = sp.part_of_watches(len(TS))
    assert part.tolist() == [0, 0, 1, 2] + [0] * 8


def test_time_split_boundaries() -> None:
    sp = time_split(user_offsets(USER), TS, 4, 7)
    part = sp.part_of_watches(len(TS))
    assert np.all(TS[part == TRAIN] < 4)
    assert np.all((TS[part == VALID] >= 4) & (TS[part == VALID] < 7))
    assert np.all(TS[part == TEST] >= 7)
    assert (part == TRAIN).sum() + (part == VALID).sum() + (part == TEST).sum() == len(TS)
    ev = sp.part_of(np.array([1, 3, 99, 2]), np.array([3, 4, 7, 6]))
    assert ev.tolist() == [TRAIN, VALID, TEST, VALID]
    with pytest.raises(FunnelrecError):
        time_split(user_offsets(USER), TS, 7, 7)
    with pytest.raises(DataError, match="training part is empty"):
        time_split(user_offsets(USER), TS, 0, 7)


def test_time_boundaries_fractions() -> None:
    ts = np.arange(1000)
    t1, t2 = time_boundaries(ts, valid_frac=0.1, test_frac=0.2)
    assert (ts >= t2).mean() == pytest.approx(0.2, abs=0.01)
    assert ((ts >= t1) & (ts < t2)).mean() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(FunnelrecError):
        time_boundaries(ts, valid_frac=0.6, test_frac=0.5)


@pytest.mark.parametrize("scale", [1, 10**15])  # the second forces the rank-coded key
def test_time_index_matches_brute_force(scale: int) -> None:
    rng = np.random.default_rng(0)
    group = rng.integers(0, 50, size=2000) * 10**9  # sparse, large group keys
    ts = rng.integers(0, 100, size=2000) * scale
    index = TimeIndex(group, ts)
    qg = np.concatenate([rng.choice(group, 500), [7, -3]])  # two unknown groups
    qt = rng.integers(-5, 105, size=502) * scale
    for inclusive in (False, True):
        start, end = index.before(qg, qt, inclusive=inclusive)
        for g, t, s, e in zip(qg, qt, start, end, strict=True):
            mask = (group == g) & ((ts <= t) if inclusive else (ts < t))
            assert e - s == mask.sum()
            if e > s:
                assert index.ts[e - 1] == ts[mask].max()
                assert np.all(group[index.order[s:e]] == g)


def test_time_split_users_without_watches_get_empty_runs() -> None:
    user = np.array([2, 2, 5])
    ts = np.array([1, 9, 3])
    sp = time_split(user_offsets(user, 7), ts, 5, 8)
    n = np.diff(sp.user_start)
    assert n.tolist() == [0, 0, 2, 0, 0, 1, 0, 0]
    assert np.all(sp.train_end >= sp.user_start[:-1]) and np.all(sp.valid_end <= sp.user_start[1:])
    assert sp.part_of_watches(3).tolist() == [TRAIN, TEST, TRAIN]
