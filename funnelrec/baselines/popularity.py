"""`Popularity`: (time-windowed, time-decayed) watch counts, the same ranking for
everyone, and its "fresh and popular now" variant that boosts recent uploads."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from funnelrec.baselines.base import Baseline, in_sorted
from funnelrec.baselines.data import Histories, Interactions, Jagged, _check_ids
from funnelrec.errors import ArtifactError, DataError, FunnelrecError


@dataclass(frozen=True)
class PopularityConfig:
    """window_s: count only watches in (now - window_s, now]; None = all up to now.
    half_life_s: a watch `a` seconds before now counts 0.5 ** (a / half_life_s); None = 1.
    fresh_half_life_s: set to make the "fresh and popular now" source (needs upload_ts).
    fresh_boost: how much a brand-new upload's score is multiplied by, minus 1.
    fresh_prior: pseudo-count added to every uploaded item in the fresh variant, so new
    items with no watches yet can still be nominated."""

    window_s: int | None = None
    half_life_s: float | None = None
    fresh_half_life_s: float | None = None
    fresh_boost: float = 3.0
    fresh_prior: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window_s", "half_life_s", "fresh_half_life_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise FunnelrecError(f"popularity: {name} must be positive or None, got {v}")
        if self.fresh_boost < 0 or self.fresh_prior < 0:
            raise FunnelrecError("popularity: fresh_boost and fresh_prior must be >= 0")


class Popularity(Baseline):
    """Items by (windowed, time-decayed) watch counts at a reference time `now`.

    count_i = sum over training watches w of item i with now - window_s < ts_w <= now of
              0.5 ** ((now - ts_w) / half_life_s)       (1 per watch without a half-life)

    "Fresh and popular now" (fresh_half_life_s set; fit needs each item's upload_ts):
        age_i   = now - upload_ts_i
        score_i = (count_i + prior) * (1 + boost * 0.5 ** (age_i / fresh_half_life_s))
    An item uploaded just now has its (smoothed) count multiplied by 1 + boost, one
    fresh_half_life_s old by 1 + boost / 2, an old one by ~1. Items with unknown
    upload_ts get no boost; items uploaded after `now` did not exist then and score 0.
    Without the fresh variant score_i = count_i. Scores do not depend on the history.
    """

    kind = "popularity"

    def __init__(
        self,
        window_s: int | None = None,
        half_life_s: float | None = None,
        *,
        fresh_half_life_s: float | None = None,
        fresh_boost: float = 3.0,
        fresh_prior: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg = PopularityConfig(
            window_s, half_life_s, fresh_half_life_s, fresh_boost, fresh_prior
        )
        self.scores_ = np.zeros(1, dtype=np.float32)
        self.now = 0
        # (scores_, item ids by them, best first, ties by smaller id): `_ranked`
        self._ranking: tuple[np.ndarray, np.ndarray] | None = None

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
        *,
        now: int | None = None,
        upload_ts: ArrayLike | None = None,
    ) -> Self:
        """now: reference time (default: the last training ts). upload_ts: [N + 1] upload
        time per item id (entry 0 ignored; NaN = unknown), needed by
        the fresh variant."""
        started = time.perf_counter()
        cfg = self.cfg
        data = Interactions.of(train)
        n = self._n(data, num_items)
        now = int(data.ts.max()) if now is None else int(now)
        keep = data.ts <= now
        if cfg.window_s is not None:
            keep &= data.ts > now - cfg.window_s
        age = (now - data.ts[keep]).astype(np.float64)
        w = 0.5 ** (age / cfg.half_life_s) if cfg.half_life_s is not None else np.ones(age.size)
        counts = np.bincount(data.item[keep], weights=w, minlength=n + 1).astype(np.float64)
        if cfg.fresh_half_life_s is not None:
            if upload_ts is None:
                raise FunnelrecError("fresh popularity needs each item's upload_ts")
            up = np.asarray(upload_ts, dtype=np.float64).reshape(-1)
            if up.size != n + 1:
                raise DataError(f"upload_ts has {up.size} entries, expected N + 1 = {n + 1}")
            known = np.isfinite(up)
            item_age = np.where(known, now - np.where(known, up, 0), np.inf)
            boost = np.where(
                item_age >= 0, 1 + cfg.fresh_boost * 0.5 ** (item_age / cfg.fresh_half_life_s), 0
            )
            counts = (counts + cfg.fresh_prior) * boost
        counts[0] = -np.inf
        self.scores_ = counts.astype(np.float32)
        self.num_items, self.now = n, now
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def score(self, histories: Histories, **_: Any) -> np.ndarray:
        self._check_fitted()
        b = len(Jagged.of(histories))
        return np.broadcast_to(self.scores_, (b, self.num_items + 1)).copy()

    def top_k(
        self, history: ArrayLike, k: int, exclude: ArrayLike | None = None, **_: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `Baseline.top_k`; the scores do not depend on the history, so the items are
        ranked once (`_ranked`) and a request reads the head of that order: time in k and
        the exclusions, not in the catalogue."""
        self._check_fitted()
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        ex = np.zeros(0, np.int64)
        if exclude is not None:
            ex = np.unique(np.asarray(exclude, dtype=np.int64).reshape(-1))
            _check_ids(ex, self.num_items, "exclude")
        # k of the first k + |excluded| are not excluded; item 0 scores -inf, below any floor
        head = self._ranked()[: k + len(ex)]
        scores = self.scores_[head]
        keep = (scores > self.min_candidate_score) & ~in_sorted(head, ex)
        ids = head[keep][:k]
        return ids.astype(np.int64), self.scores_[ids].astype(np.float32)

    def _ranked(self) -> np.ndarray:
        """Every item id (0 included) by score, best first, ties by smaller id: sorted once
        per score array."""
        if self._ranking is None or self._ranking[0] is not self.scores_:
            ids = np.arange(len(self.scores_))
            self._ranking = (self.scores_, ids[np.lexsort((ids, -self.scores_))])
        return self._ranking[1]

    def with_more_items(self, scores: np.ndarray) -> Popularity:
        """A copy over items 1..len(scores) - 1: `scores` holds this model's scores first,
        unchanged, and new items' after them (items added to a served catalogue). The new
        items are merged into the ranked order (time linear in the catalogue), not the
        whole catalogue sorted again."""
        n0 = self.num_items
        if len(scores) < n0 + 1:
            raise FunnelrecError(f"{len(scores) - 1} scores, fewer than the {n0} items held")
        order = self._ranked()
        new = np.arange(n0 + 1, len(scores))
        new = new[np.lexsort((new, -scores[new]))]
        # After every held item scoring at least as much: their ids are all smaller.
        at = np.searchsorted(-self.scores_[order], -scores[new], side="right")
        twin = copy.copy(self)
        twin.scores_, twin.num_items = scores, len(scores) - 1
        twin._ranking = (scores, np.insert(order, at, new))
        return twin

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores_}

    def _meta(self) -> dict[str, Any]:
        return {"now": self.now}

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        s = arrays["scores"]
        if s.shape != (self.num_items + 1,):
            raise ArtifactError(f"popularity scores of shape {s.shape}, expected N + 1")
        self.scores_ = s.astype(np.float32)
        self.now = int(meta.get("now", 0))


def upload_times(items: pa.Table, num_items: int | None = None) -> np.ndarray:
    """[N + 1] float64 upload_ts by item id (NaN: unknown) from an items table with
    columns item_id and upload_ts: the `upload_ts` argument of the fresh variant."""
    if "item_id" not in items.column_names or "upload_ts" not in items.column_names:
        raise DataError("items table needs columns item_id and upload_ts", path="items")
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    ts = items.column("upload_ts").to_numpy(zero_copy_only=False)
    n = max(int(ids.max()) if ids.size else 0, num_items or 0)
    out = np.full(n + 1, np.nan)
    out[ids] = np.asarray(ts, dtype=np.float64)  # nulls arrive as NaN
    return out
