"""Train / validation / test splits that never let training see the future.

Held-out targets come after the history they are predicted from, never from the middle of
it: a random hold-out leaks the future (Covington et al. 2016, section 3.4).

Both splits work on watches sorted by (user, ts), ties in the table's row order, and give
each user's watches as three consecutive runs of positions: training first, then
validation, then test. Training is therefore always a prefix of a user's history.

- `leave_last_out`: a user's last watch is the test target, the one before it validation
  (or the `valid_n` before it, never leaving fewer than one training watch), the rest
  training. Users with fewer than `min_watches` watches have no held-out watch: all of
  theirs are training (they still teach the model, they are just not scored). More than
  one validation watch per user is for what learns from held-out moments, such as a
  ranker staged on the candidate sources' pages (`funnelrec.ranking.sequence`).
- `time_split`: one global clock; training ts < t1 <= validation ts < t2 <= test ts.
  `time_boundaries` picks t1 and t2 as quantiles of the watch times.

The other tables (searches, impressions) are cut by time with `Split.part_of`: an event of
user u belongs to training when its ts is before `valid_from[u]` (the ts of the user's
first validation watch; t1 for the time split), to validation before `test_from[u]`, and to
test after. With leave-last-out and equal timestamps the row order decides which watch is
the target; an event at exactly the target's ts is already held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from funnelrec.errors import DataError, FunnelrecError

SplitKind = Literal["last", "time"]
TRAIN, VALID, TEST = 0, 1, 2
PART_NAMES = ("train", "valid", "test")
NEVER = np.iinfo(np.int64).max  # "no held-out event": a boundary no timestamp reaches


@dataclass(frozen=True, eq=False)
class Split:
    """Per-user boundaries of a split over watches sorted by (user, ts).

    user_start: [U + 2] position of user u's first watch is user_start[u] (u = dataset id)
    train_end:  [U + 1] positions user_start[u] .. train_end[u] - 1 are training
    valid_end:  [U + 1] train_end[u] .. valid_end[u] - 1 validation; then test to the end
    valid_from: [U + 1] timestamp where user u's validation period starts (NEVER: no such)
    test_from:  [U + 1] timestamp where user u's test period starts (NEVER: no such)
    """

    kind: SplitKind
    user_start: np.ndarray
    train_end: np.ndarray
    valid_end: np.ndarray
    valid_from: np.ndarray
    test_from: np.ndarray
    t1: int | None = None
    t2: int | None = None

    @property
    def user_end(self) -> np.ndarray:
        return self.user_start[1:]

    def part_of_watches(self, n: int) -> np.ndarray:
        """[n] int8 part (0 train, 1 valid, 2 test) of each sorted watch position."""
        part = np.full(n, TEST, dtype=np.int8)
        users = np.arange(len(self.train_end))
        lengths = self.user_start[1:] - self.user_start[:-1]
        user = np.repeat(users, lengths)
        pos = np.arange(n)
        part[pos < self.valid_end[user]] = VALID
        part[pos < self.train_end[user]] = TRAIN
        return part

    def part_of(self, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """[n] int8 part of events (searches, impressions) of `user` at `ts`, by time."""
        user = np.asarray(user, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        known = user < len(self.valid_from)
        u = np.where(known, user, 0)
        vf = np.where(known, self.valid_from[u], NEVER if self.t1 is None else self.t1)
        tf = np.where(known, self.test_from[u], NEVER if self.t2 is None else self.t2)
        part = np.full(user.shape, TEST, dtype=np.int8)
        part[ts < tf] = VALID
        part[ts < vf] = TRAIN
        return part


def user_offsets(user_sorted: np.ndarray, n_users: int | None = None) -> np.ndarray:
    """[U + 2] start of each user id's run in a user-sorted array (ids 0..U; 0 unused)."""
    top = int(user_sorted.max()) if user_sorted.size else 0
    n = max(top, n_users or 0)
    return np.searchsorted(user_sorted, np.arange(n + 2), side="left").astype(np.int64)


def leave_last_out(
    user_start: np.ndarray, ts_sorted: np.ndarray, *, min_watches: int = 3, valid_n: int = 1
) -> Split:
    """Hold out each user's last watch (test) and the `valid_n` before it (validation),
    keeping at least one training watch."""
    if min_watches < 2:
        raise FunnelrecError(f"leave-last-out needs min_watches >= 2, got {min_watches}")
    if valid_n < 1:
        raise FunnelrecError(f"leave-last-out needs valid_n >= 1, got {valid_n}")
    start, end = user_start[:-1], user_start[1:]
    n = end - start
    held = n >= min_watches
    train_end = np.where(held, np.maximum(end - 1 - valid_n, start + 1), end)
    valid_end = np.where(held, end - 1, end)
    valid_from = np.full(len(start), NEVER, dtype=np.int64)
    test_from = np.full(len(start), NEVER, dtype=np.int64)
    valid_from[held] = ts_sorted[train_end[held]]
    test_from[held] = ts_sorted[valid_end[held]]
    return Split("last", user_start, train_end, valid_end, valid_from, test_from)


def time_boundaries(
    ts: np.ndarray, *, valid_frac: float = 0.1, test_frac: float = 0.1
) -> tuple[int, int]:
    """t1, t2 such that about `test_frac` of watches are at or after t2 and `valid_frac`
    between t1 and t2. Raises DataError when a part would be empty."""
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise FunnelrecError(
            f"time split: valid_frac and test_frac must be in (0, 1) with a sum below 1 "
            f"(got {valid_frac}, {test_frac})"
        )
    ts = np.asarray(ts)
    if ts.size == 0:
        raise DataError("time split: no watches")
    t1 = int(np.quantile(ts, 1 - valid_frac - test_frac, method="higher"))
    t2 = int(np.quantile(ts, 1 - test_frac, method="higher"))
    return t1, t2


def time_split(
    user_start: np.ndarray, ts_sorted: np.ndarray, t1: int, t2: int, *, require_train: bool = True
) -> Split:
    """Global time split: training ts < t1 <= validation ts < t2 <= test ts.

    `require_train=False` allows watches with none before t1 (one block of users of a
    larger dataset, whose other blocks have training watches)."""
    if not t1 < t2:
        raise FunnelrecError(f"time split: need t1 < t2, got t1={t1}, t2={t2}")
    n_users = len(user_start) - 1
    if require_train and ts_sorted.size and not (ts_sorted < t1).any():
        raise DataError(f"time split: no watch before t1={t1}: the training part is empty")
    user = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(user_start))
    index = TimeIndex(user, ts_sorted)
    users = np.arange(n_users, dtype=np.int64)
    # Per user: how many of their watches are before t1 (t2); the prefix ends there.
    s1, e1 = index.before(users, np.full(n_users, t1, dtype=np.int64))
    s2, e2 = index.before(users, np.full(n_users, t2, dtype=np.int64))
    train_end = user_start[:-1] + (e1 - s1)
    valid_end = user_start[:-1] + (e2 - s2)
    valid_from = np.full(n_users, t1, dtype=np.int64)
    test_from = np.full(n_users, t2, dtype=np.int64)
    return Split(
        "time",
        user_start,
        train_end,
        valid_end,
        valid_from,
        test_from,
        t1=int(t1),
        t2=int(t2),
    )


class TimeIndex:
    """Events keyed by (group, ts), for vectorised "which events of g came before t".

    group: [E] int64 any keys (a user id, a (user, channel) pair code, ...)
    ts:    [E] int64 timestamps

    The events are sorted stably by (group, ts); `order[i]` is the original index of the
    i-th sorted event. `before(g, t)` gives, per query, the sorted positions [start, end)
    of group g's events with ts < t (or <= t with inclusive=True): their count is
    end - start and the latest of them is order[end - 1]. No Python loop per event: one
    sort of the events and two searchsorted per batch of queries.
    """

    def __init__(self, group: np.ndarray, ts: np.ndarray) -> None:
        group = np.asarray(group, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        self.groups, g = np.unique(group, return_inverse=True)
        g = g.astype(np.int64)
        lo = int(ts.min()) if ts.size else 0
        hi = int(ts.max()) if ts.size else 0
        n_groups = len(self.groups) + 1
        self._ranks: np.ndarray | None = None
        if n_groups * (hi - lo + 3) < 2**62:
            self._lo, self._span = lo - 1, hi - lo + 3
            code = ts - self._lo
        else:
            # Too wide a time range for a (group, ts) int64 key: use ranks of the distinct
            # event times instead (exact for "<" and "<=" comparisons).
            self._ranks = np.unique(ts)
            self._lo, self._span = 0, len(self._ranks) + 1
            code = np.searchsorted(self._ranks, ts).astype(np.int64)
        key = g * self._span + code
        self.order = np.argsort(key, kind="stable")
        self._key = key[self.order]
        self.ts = ts[self.order]

    def _code(self, ts: np.ndarray) -> np.ndarray:
        if self._ranks is not None:
            return np.searchsorted(self._ranks, ts, side="left").astype(np.int64)
        return np.clip(ts - self._lo, 0, self._span - 1)

    def before(
        self,
        group: np.ndarray,
        ts: np.ndarray,
        *,
        inclusive: bool = False,
        sort_queries: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions [start, end) of the group's events with ts < t (<= if inclusive).

        Binary searches for needles in order walk memory in order: several times faster
        than for needles in random order, so the queries are sorted first (and the answers
        put back in their order). `sort_queries=False` skips that for callers whose
        queries are already (nearly) in group order.
        """
        group = np.asarray(group, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        order = np.argsort(group) if sort_queries else None
        if order is not None:
            group, ts = group[order], ts[order]
        pos = np.searchsorted(self.groups, group)
        pos_c = np.minimum(pos, max(len(self.groups) - 1, 0))
        found = self.groups[pos_c] == group if len(self.groups) else np.zeros(group.shape, bool)
        base = pos_c.astype(np.int64) * self._span
        start = np.searchsorted(self._key, base, side="left")
        if self._ranks is not None and inclusive:
            code = np.searchsorted(self._ranks, ts, side="right").astype(np.int64)
            end = np.searchsorted(self._key, base + code, side="left")
        else:
            t = np.where(ts < NEVER, ts + 1, ts) if inclusive else ts
            end = np.searchsorted(self._key, base + self._code(t), side="left")
        end = np.where(found, end, start).astype(np.int64)
        start = start.astype(np.int64)
        if order is None:
            return start, end
        out_start = np.empty(len(order), dtype=np.int64)
        out_end = np.empty(len(order), dtype=np.int64)
        out_start[order] = start
        out_end[order] = end
        return out_start, out_end
