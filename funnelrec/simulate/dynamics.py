"""Users who change over the window: interest drift and the move from popular to niche.

Two of the simulator's user mechanisms depend on time, so the truth has to evaluate them
at the moment of each request (docs/simulator.md, "Users who change"):

- interest drift (`drift_sd`): each day the logits of a user's topic mixture take an
  independent Gaussian step of sd `drift_sd` per topic, a random walk from the mixture
  drawn at the window's start (day 0). A day's mixture is
  interest_0 x exp(drift_sd x walk) renormalised, so weight moves among the topics a user
  has; a topic they have next to no interest in keeps next to none.
- popular to niche (`niche_rate`): within a topic a user weights items by
  appeal^-nu relative to a typical popular draw, with
  nu(u, t) = niche_rate x log(1 + experience), experience = the user's expected days
  active so far (tenure before the window plus the days elapsed in it, each counted
  with the chance of at least one session that day).

`UserDynamics` is what both the generator and the oracle ask, so the data and the truth
follow one model. The walk's steps come from one random stream per `GROUP` users
(`[seed, 3, 2, group]`), so any user's walk can be recomputed on its own (the oracle's
random access) and is the same whichever block of users the generator ran it in.

With `drift_sd` and `niche_rate` at 0 nothing here draws or changes anything: the
presets without "-v2" give the worlds they gave before these mechanisms existed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

DAY_S = 86_400
# Users sharing one random stream of drift steps: small enough that the oracle's look-up
# of one user recomputes little besides, large enough that a block needs few streams.
GROUP = 16
_CACHED_GROUPS = 256  # group tables kept for the oracle's repeated look-ups


class UserDynamics:
    """The time-varying state of users: interest on each day, niche preference at ts.

    `interest` is the mixture at the window's start [U, T]; `activity` [U] and
    `tenure_days` [U] (days on the platform before the window; needed when niche_rate > 0)
    set how fast experience accumulates. Days are window days, 0 .. days - 1: times
    before the window read day 0, times after it the last day.
    """

    def __init__(
        self,
        *,
        seed: int,
        interest: F32,
        activity: NDArray[Any],
        tenure_days: NDArray[Any] | None,
        window_start: int,
        days: int,
        drift_sd: float,
        niche_rate: float,
        sessions_per_day: float,
    ) -> None:
        self.seed = int(seed)
        self.interest = interest
        self.window_start = int(window_start)
        self.days = max(int(days), 1)
        self.drift_sd = float(drift_sd)
        self.niche_rate = float(niche_rate)
        self.drifts = self.drift_sd > 0
        self.niches = self.niche_rate > 0
        if self.niches:
            if tenure_days is None:
                raise ValueError("niche_rate > 0 needs each user's tenure_days")
            act = np.asarray(activity, dtype=np.float64) * float(sessions_per_day)
            # The chance of at least one session on a day: experience counts days active.
            self._active = -np.expm1(-act)
            self._tenure = np.asarray(tenure_days, dtype=np.float64)
        self._held: tuple[int, int, F32] | None = None
        self._groups: dict[int, F32] = {}

    # -- time ----------------------------------------------------------------------------

    def day(self, ts: NDArray[Any] | None, n: int) -> I64:
        """[n] window day of each ts (None: day 0), clipped to the window."""
        if ts is None:
            return np.zeros(n, dtype=np.int64)
        d = (np.asarray(ts, dtype=np.int64) - self.window_start) // DAY_S
        return np.clip(d, 0, self.days - 1)

    # -- interest drift -------------------------------------------------------------------

    def _group(self, g: int) -> F32:
        """[GROUP, days, T] interest mixtures of group g's users on each day (cached)."""
        table = self._groups.get(g)
        if table is None:
            n_users = self.interest.shape[0]
            table = self.table(g * GROUP, min((g + 1) * GROUP, n_users))
            if len(self._groups) >= _CACHED_GROUPS:
                self._groups.pop(next(iter(self._groups)))
            self._groups[g] = table
        return table

    def table(self, lo: int, hi: int) -> F32:
        """[hi - lo, days, T] interest mixtures of users lo..hi-1 on each day.

        Every step is computed element by element or along a user's own row, so a user's
        mixtures do not depend on which other users share the call.
        """
        g0, g1 = lo // GROUP, (hi - 1) // GROUP + 1
        n_topics = self.interest.shape[1]
        steps = np.empty(((g1 - g0) * GROUP, self.days, n_topics), dtype=np.float32)
        for g in range(g0, g1):
            rng = np.random.default_rng([self.seed, 3, 2, g])
            part = steps[(g - g0) * GROUP : (g - g0 + 1) * GROUP]
            rng.standard_normal(part.shape, dtype=np.float32, out=part)
        walk = steps[lo - g0 * GROUP : hi - g0 * GROUP]
        walk[:, 0] = 0.0  # day 0 is the mixture as drawn
        np.cumsum(walk, axis=1, out=walk)
        walk *= np.float32(self.drift_sd)
        walk += np.log(np.maximum(self.interest[lo:hi], np.float32(1e-30)))[:, None, :]
        walk -= walk.max(axis=2, keepdims=True)  # keeps exp in range; renormalised below
        np.exp(walk, out=walk)
        walk /= walk.sum(axis=2, keepdims=True)
        return walk

    def hold(self, lo: int, hi: int) -> F32:
        """Compute and keep users lo..hi-1's table (one generator block) until `release`."""
        self._held = (lo, hi, self.table(lo, hi))
        return self._held[2]

    def release(self) -> None:
        self._held = None

    def gather(self, users: I64, days: I64, topics: NDArray[Any] | None = None) -> F32:
        """The interest of each user on its day: [N] in `topics`, or [N, T] without."""
        users = np.asarray(users, dtype=np.int64)
        if self._held is not None and users.size:
            lo, hi, held = self._held
            if users.min() >= lo and users.max() < hi:
                if topics is None:
                    return held[users - lo, days]
                return held[users - lo, days, topics]
        n_topics = self.interest.shape[1]
        out = np.empty((users.size,) if topics is not None else (users.size, n_topics), np.float32)
        group = users // GROUP
        order = np.argsort(group, kind="stable")
        cuts = np.flatnonzero(np.diff(group[order])) + 1
        for rows in np.split(order, cuts) if users.size else []:
            g = int(group[rows[0]])
            table = self._group(g)
            local = users[rows] - g * GROUP
            if topics is None:
                out[rows] = table[local, days[rows]]
            else:
                out[rows] = table[local, days[rows], np.asarray(topics)[rows]]
        return out

    # -- popular to niche -----------------------------------------------------------------

    def niche(self, users: I64, ts: NDArray[Any] | None) -> F64:
        """[N] nu: how far each user has moved from popular to niche items by ts."""
        users = np.asarray(users, dtype=np.int64)
        if not self.niches:
            return np.zeros(users.shape, dtype=np.float64)
        elapsed = 0.0 if ts is None else (np.asarray(ts, dtype=np.float64) - self.window_start)
        days = np.maximum(self._tenure[users] + np.asarray(elapsed) / DAY_S, 0.0)
        return self.niche_rate * np.log1p(self._active[users] * days)
