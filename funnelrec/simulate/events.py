"""The block simulator: every session of a block of users over the window, as events.

Home slates log, per impression, the logging policy's source that nominated the item and
that source's score (the `cand_source` and `cand_score` impression columns): the names
`POLICY_SOURCES` by code, and the score is the probability that one draw of that source
picks the item for this user at this time (`_policy_scores`, the truth's formulas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

from funnelrec.simulate.config import SimConfig
from funnelrec.simulate.truth import DAY_S, MAX_SEARCH_WATCHES, World, _Pairs, order_by
from funnelrec.simulate.world import F64, I64, _cumcount

# Sessions by hour of day (UTC): quiet at night, peak in the evening.
DIURNAL = np.array(
    [2, 1.5, 1, 1, 1, 1.5, 2, 3, 3.5, 4, 4, 4.5, 5, 5, 5, 5, 5.5, 6, 7, 8, 8.5, 8, 6, 4]
)
DIURNAL = DIURNAL / DIURNAL.sum()
HOME, SEARCH, EXTERNAL, RELATED = 0, 1, 2, 3
SOURCES = ("home", "search", "external", "related")  # watch source by code
# The sources of the home page's logging policy, by code: each slot draws from one of
# them (policy_popular, policy_fresh, the rest personalised); logged as `cand_source`.
POLICY_POPULAR, POLICY_FRESH, POLICY_TOPIC = 0, 1, 2
POLICY_SOURCES = ("popular", "fresh", "topic")


@dataclass
class _Watches:
    user: I64
    item: I64
    ts: I64
    watch_time: NDArray[np.float32]
    source: NDArray[np.int8]

    @staticmethod
    def concat(parts: Sequence[_Watches]) -> _Watches:
        cols = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Watches)
        }
        return _Watches(**cols)

    def take(self, rows: I64 | slice) -> _Watches:
        return _Watches(**{f.name: getattr(self, f.name)[rows] for f in fields(_Watches)})


class _BlockSimulator:
    """Simulates all sessions of one block of users over the whole window."""

    def __init__(self, world: World, config: SimConfig, rng: np.random.Generator) -> None:
        self.w = world
        self.c = config
        self.rng = rng
        self.T = len(world.topics)

    # item draws ---------------------------------------------------------------------

    def _watch_time(self, u: I64, i: I64, ts: I64) -> NDArray[np.float32]:
        return self.w._draw_watch_time(self.rng, u, i, ts)

    def _interest_index(self, lo: int, hi: int, s_user: I64, s_day: I64) -> None:
        """Cumulative interests for the block's topic draws, row r offset by r: one sorted
        array. A row per user, or with drift one per user and day with a session."""
        self._lo = lo
        self._keys: I64 | None = None
        if not self.w.dynamics.drifts:
            rows = self.w.interest[lo:hi]
        else:
            table = self.w.dynamics.hold(lo, hi)  # [users, days, T]
            self._keys = np.unique((s_user - lo) * self.c.days + s_day)
            rows = table[self._keys // self.c.days, self._keys % self.c.days]
        cum = np.cumsum(rows, axis=1, dtype=np.float64)
        cum /= cum[:, -1:]
        self._cum = (cum + np.arange(rows.shape[0])[:, None]).ravel()

    def _topics(self, users: I64, ts: I64, noise: F64 | float) -> I64:
        """[N] topics drawn from each user's interests at ts, or uniformly with prob. `noise`."""
        n = users.size
        row = users - self._lo
        if self._keys is not None:
            day = self.w.dynamics.day(ts, n)
            row = np.searchsorted(self._keys, row * self.c.days + day)
        r = self.rng.random((2, n))
        j = np.searchsorted(self._cum, row + r[0], side="right") - row * self.T
        uniform = self.rng.integers(0, self.T, n)
        return np.where(r[1] < noise, uniform, np.clip(j, 0, self.T - 1))

    def _pick(self, users: I64, ts: I64, cands: I64, extra: F64 | None = None) -> I64:
        """[N] one of the M candidates [N, M] per user at ts, ~ exp(preference).

        Sampling-importance-resampling: candidates come from the topic's popularity, so
        the pick approximates popularity x exp(preference) (`World._own_choice_of`): the
        taste match, and with the niche mechanism a discount of popular items.
        -1 where no candidate is valid.
        """
        n, m = cands.shape
        logits = np.empty((n, m), dtype=np.float64)
        for j in range(m):
            c = np.maximum(cands[:, j], 0)
            logits[:, j] = self.w._preference(users, c, ts)
        if extra is not None:
            logits += extra
        logits += self.rng.gumbel(size=(n, m))
        logits[cands < 0] = -np.inf
        best = np.argmax(logits, axis=1)
        out = cands[np.arange(n), best]
        return np.where(np.isfinite(logits[np.arange(n), best]), out, -1)

    def _own_choice(self, users: I64, ts: I64, topics: I64) -> I64:
        m = self.c.taste_candidates
        cands = self.w.popularity.draw(self.rng, np.repeat(ts, m), np.repeat(topics, m))
        return self._pick(users, ts, cands.reshape(-1, m))

    def _recent(self, ts: I64) -> I64:
        """[N] uniform draws among items uploaded in the last fresh_window_hours (-1: none)."""
        idx, up, _, _ = self.w.popularity.segments[self.T]
        lo = np.searchsorted(up, ts - self.c.fresh_window_hours * 3600, side="right")
        hi = np.searchsorted(up, ts, side="right")
        j = lo + np.floor(self.rng.random(ts.size) * (hi - lo)).astype(np.int64)
        return np.where(hi > lo, idx[np.minimum(j, idx.size - 1)], -1)

    def _policy_scores(self, src: NDArray[Any], u: I64, i: I64, ts: I64) -> F64:
        """[N] the probability that one draw of the slot's source picks its item at ts.

        popular: the item's share of all items' popularity w_i(ts) (appeal x freshness);
        fresh: 1 / the number of items uploaded in the last fresh_window_hours (the draw
        is uniform over them); topic: the probability of the item's topic under the
        user's noisy interests x the item's share of that topic's popularity. The same
        formulas as the truth's `watch_rate` (`World._policy_fresh_of`, ...). No draws.
        """
        w = self.w
        out = np.empty(src.size, dtype=np.float64)
        for code, score in (
            (POLICY_POPULAR, lambda p: p.global_share),
            (POLICY_FRESH, w._policy_fresh_of),
            (POLICY_TOPIC, w._policy_personal_of),
        ):
            sel = src == code
            if sel.any():
                out[sel] = score(_Pairs(w, u[sel], i[sel], ts[sel]))
        return out

    # sessions -------------------------------------------------------------------------

    def run(self, lo: int, hi: int) -> dict[str, Any]:
        c, w, rng = self.c, self.w, self.rng
        users = np.arange(lo, hi, dtype=np.int64)
        days = c.days
        rate = w.users["activity"][lo:hi].astype(np.float64) * c.sessions_per_day
        counts = rng.poisson(np.repeat(rate, days)).ravel()
        s_user = np.repeat(np.repeat(users, days), counts)
        s_day = np.repeat(np.tile(np.arange(days, dtype=np.int64), hi - lo), counts)
        n = s_user.size
        hour = rng.choice(24, size=n, p=DIURNAL)
        s_ts = w.window_start + s_day * DAY_S + hour * 3600 + rng.integers(0, 3600, n)
        ext = max(0.0, 1.0 - c.home_share - c.search_share)
        kind = rng.choice(3, size=n, p=[c.home_share, c.search_share, ext])
        order = order_by(s_user, s_ts)
        s_user, s_ts, kind = s_user[order], s_ts[order], kind[order]
        s_day = s_day[order]
        draws = kind != EXTERNAL  # only home and search sessions draw topics
        self._interest_index(lo, hi, s_user[draws], s_day[draws])
        try:
            return self._sessions(s_user, s_ts, kind)
        finally:
            w.dynamics.release()

    def _sessions(self, s_user: I64, s_ts: I64, kind: NDArray[Any]) -> dict[str, Any]:
        """Every session of the block (ordered by user, then time) as events."""
        home, impressions = self._home(s_user[kind == HOME], s_ts[kind == HOME])
        search, searches = self._search(s_user[kind == SEARCH], s_ts[kind == SEARCH])
        external = self._external(s_user[kind == EXTERNAL], s_ts[kind == EXTERNAL])
        session = np.concatenate(
            [home.pop("session"), search.pop("session"), external.pop("session")]
        )
        kind_of = np.concatenate(
            [np.full(len(home["user"]), HOME), np.full(len(search["user"]), SEARCH),
             np.full(len(external["user"]), EXTERNAL)]
        )  # fmt: skip
        seeds = _Watches.concat([_Watches(**home), _Watches(**search), _Watches(**external)])
        # Session keys must not collide across kinds: offset them by kind.
        skey = session * 3 + kind_of
        related = self._related(seeds, skey)
        watches = _Watches.concat([seeds, related])
        o = order_by(watches.user, watches.ts)
        watches = watches.take(o)
        return {"watches": watches, "searches": searches, "impressions": impressions}

    def _home(self, r_user: I64, r_ts: I64) -> tuple[dict[str, Any], dict[str, Any]]:
        """Slates of the logging policy, clicks and their watches."""
        c, w, rng = self.c, self.w, self.rng
        n_req = r_user.size
        slots = c.slate_size + 3  # over-draw, duplicates within a slate are dropped
        req = np.repeat(np.arange(n_req, dtype=np.int64), slots)
        iu, it = r_user[req], r_ts[req]
        pers = max(0.0, 1.0 - c.policy_popular - c.policy_fresh)
        src = rng.choice(3, size=req.size, p=[c.policy_popular, c.policy_fresh, pers])
        item = np.full(req.size, -1, dtype=np.int64)
        sel = src == POLICY_FRESH
        item[sel] = self._recent(it[sel])
        sel = src == POLICY_TOPIC
        noise = w._policy_noise[iu[sel]]  # more noise for logged-out users
        item[sel] = w.popularity.draw(rng, it[sel], self._topics(iu[sel], it[sel], noise))
        sel = item < 0  # popular slots, and fallbacks where a slot found nothing
        item[sel] = w.popularity.draw(rng, it[sel], self.T)
        src[sel] = POLICY_POPULAR  # a fallback is the popular draw's nomination
        # Drop duplicates within a slate, shuffle, keep the first slate_size.
        ok = item >= 0
        req, iu, it, item, src = req[ok], iu[ok], it[ok], item[ok], src[ok]
        o = order_by(req, item)
        first = np.ones(o.size, dtype=bool)
        first[1:] = (req[o][1:] != req[o][:-1]) | (item[o][1:] != item[o][:-1])
        o = np.sort(o[first])
        req, iu, it, item, src = req[o], iu[o], it[o], item[o], src[o]
        o = order_by(req, rng.integers(0, 1 << 16, req.size))
        req, iu, it, item, src = req[o], iu[o], it[o], item[o], src[o]
        pos = _cumcount(req)
        keep = pos < c.slate_size
        req, iu, it, item, pos = req[keep], iu[keep], it[keep], item[keep], pos[keep]
        src = src[keep]
        # How often this item was already shown to this user (earlier requests).
        # Rows are in time order per user, so ties in (user, item) keep time order.
        o = order_by(iu, item)
        shown = np.empty(req.size, dtype=np.int64)
        shown[o] = _cumcount(iu[o] * w.n_items + item[o])
        clicked, wt = w._respond(rng, iu, item, it, shown)
        impressions = {"req": req, "user": iu, "item": item, "ts": it, "position": pos,
                       "clicked": clicked, "watch_time": wt, "n_requests": n_req,
                       "source": src.astype(np.int8),
                       "score": self._policy_scores(src, iu, item, it)}  # fmt: skip
        # Clicked items are watched one after another, in slate order.
        cr = req[clicked]
        watches = {
            "user": iu[clicked],
            "item": item[clicked],
            "ts": _sequential_ts(cr, it[clicked], wt[clicked], c.gap_s),
            "watch_time": wt[clicked],
            "source": np.full(cr.size, HOME, dtype=np.int8),
            "session": cr,
        }
        return watches, impressions

    def _search(self, q_user: I64, q_ts: I64) -> tuple[dict[str, Any], dict[str, Any]]:
        """Queries from a topic of interest, then watches of that topic's items."""
        c, rng = self.c, self.rng
        n_q = q_user.size
        topic = self._topics(q_user, q_ts, 0.0)
        length = rng.choice(3, size=n_q, p=[0.35, 0.45, 0.2]) + 1
        V = c.tokens_per_topic
        zipf = 1.0 / np.arange(1, V + 1) ** 0.8
        zipf_cum = np.cumsum(zipf / zipf.sum())
        tokens = np.full((n_q, 3), -1, dtype=np.int64)
        for j in range(3):
            tok = topic * V + np.minimum(np.searchsorted(zipf_cum, rng.random(n_q)), V - 1)
            generic = rng.random(n_q) < c.generic_token_share
            g = self.T * V + rng.integers(0, max(c.generic_tokens, 1), n_q)
            tok = np.where(generic, g, tok)
            dup = (tokens[:, :j] == tok[:, None]).any(axis=1)
            tokens[:, j] = np.where((j < length) & ~dup, tok, -1)
        searches = {"user": q_user, "ts": q_ts, "tokens": tokens}
        n_res = np.minimum(rng.poisson(c.search_watches_mean, n_q), MAX_SEARCH_WATCHES)
        sess = np.repeat(np.arange(n_q, dtype=np.int64), n_res)
        u = q_user[sess]
        item = self._own_choice(u, q_ts[sess], topic[sess])
        ok = item >= 0
        sess, u, item = sess[ok], u[ok], item[ok]
        wt = self._watch_time(u, item, q_ts[sess])
        watches = {
            "user": u,
            "item": item,
            "ts": _sequential_ts(sess, q_ts[sess], wt, c.gap_s),
            "watch_time": wt,
            "source": np.full(sess.size, SEARCH, dtype=np.int8),
            "session": sess,
        }
        return watches, searches

    def _external(self, e_user: I64, e_ts: I64) -> dict[str, Any]:
        """Embedded-player watches of globally popular, fresh items."""
        item = self.w.popularity.draw(self.rng, e_ts, self.T)
        ok = item >= 0
        u, t, item = e_user[ok], e_ts[ok], item[ok]
        return {
            "user": u,
            "item": item,
            "ts": t,
            "watch_time": self._watch_time(u, item, t),
            "source": np.full(u.size, EXTERNAL, dtype=np.int8),
            "session": np.flatnonzero(ok).astype(np.int64),
        }

    def _related(self, seeds: _Watches, session: I64) -> _Watches:
        """Continuation chains after each session's last watch."""
        c, w, rng = self.c, self.w, self.rng
        if seeds.user.size == 0:
            return seeds
        o = order_by(session, seeds.ts)
        last = np.ones(o.size, dtype=bool)
        last[:-1] = session[o][1:] != session[o][:-1]
        o = o[last]
        user, item = seeds.user[o], seeds.item[o]
        t = seeds.ts[o] + np.ceil(seeds.watch_time[o]).astype(np.int64) + c.gap_s
        binge = w.p_next_episode
        out: list[_Watches] = []
        for _ in range(c.max_chain):
            go = (rng.random(user.size) < c.related_continue) & (t < w.window_end)
            user, item, t = user[go], item[go], t[go]
            if user.size == 0:
                break
            r = rng.random(user.size)
            nxt, prv = w.next_episode[item], w.prev_episode[item]
            # focused users binge: their own chance to go on to the next episode
            p_next = c.related_next_episode if binge is None else binge[user]
            use_next = (nxt >= 0) & (r < p_next)
            use_next &= w.upload_ts[np.maximum(nxt, 0)] <= t
            p_prev_hi = p_next + c.related_prev_episode
            use_prev = ~use_next & (prv >= 0) & (r >= p_next) & (r < p_prev_hi)
            m = c.taste_candidates
            cands = w.popularity.draw(rng, np.repeat(t, m), np.repeat(w.topic[item], m))
            cands = cands.reshape(-1, m)
            cands[cands == item[:, None]] = -1
            niche = -c.related_niche * w.log_appeal[np.maximum(cands, 0)].astype(np.float64)
            new = self._pick(user, t, cands, niche)
            new = np.where(use_next, nxt, np.where(use_prev, prv, new))
            ok = new >= 0
            user, item, t = user[ok], new[ok], t[ok]
            wt = self._watch_time(user, item, t)
            out.append(_Watches(user, item, t, wt, np.full(user.size, RELATED, dtype=np.int8)))
            t = t + np.ceil(wt).astype(np.int64) + c.gap_s
        if not out:
            return seeds.take(slice(0, 0))
        return _Watches.concat(out)


def _sequential_ts(group: I64, start: I64, watch_time: NDArray[np.float32], gap: int) -> I64:
    """Start times of watches made one after another within each group (groups sorted)."""
    step = np.ceil(watch_time).astype(np.int64) + gap
    before = np.cumsum(step) - step
    if group.size == 0:
        return start.copy()
    new = np.ones(group.size, dtype=bool)
    new[1:] = group[1:] != group[:-1]
    base = before[np.flatnonzero(new)][np.cumsum(new) - 1]
    return start + gap + (before - base)
