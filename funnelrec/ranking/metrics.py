"""Offline metrics of a ranker on held-out impressions, vectorised NumPy.

All functions take flat arrays over n impressions:
    score       [n]  the model's logit (any monotone score works for the ranking metrics)
    label       [n]  1 clicked, 0 not
    watch_time  [n]  seconds watched (0 when not clicked)
    user_id     [n]  who saw it
    request_id  [n]  which page (request) showed it; pairs are formed within one
                     (user_id, request_id) page

Weighted per-user loss (the paper's headline metric, Covington et al. 2016, section 4.3):
for every page, every pair of a clicked impression p and an unclicked impression q on it;
the pair is mispredicted when q scores higher than p, and then p's watch time counts as
mispredicted. A tie counts half (a ranker that cannot tell them apart orders them at
random, so half the time it is wrong).

    loss = sum over pairs T_p * ([s_q > s_p] + 0.5 [s_q == s_p]) / sum over pairs T_p

summed over all users' pairs at once (micro-average: a pair's share is its watch time).
A random order scores 0.5; a perfect one 0. Pairs are counted by sorting, O(n log n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _groups(*keys: ArrayLike) -> NDArray[np.int64]:
    """A dense group index [n] for the distinct tuples of `keys` (0..G-1)."""
    combined: NDArray[np.int64] | None = None
    for k in keys:
        idx = np.unique(np.asarray(k).ravel(), return_inverse=True)[1].ravel().astype(np.int64)
        if combined is None:
            combined = idx
        else:
            # Pack (previous group, this key) into one int64, then re-densify.
            combined = combined * (int(idx.max(initial=0)) + 1) + idx
            combined = np.unique(combined, return_inverse=True)[1].ravel().astype(np.int64)
    assert combined is not None
    return combined


def _grouped_keys(
    group: NDArray[np.int64], score: NDArray[np.float64]
) -> tuple[NDArray[np.int64], int]:
    """One int64 key per item that orders by (group, score): group * stride + score rank."""
    rank = np.unique(score, return_inverse=True)[1].ravel().astype(np.int64)
    stride = int(rank.max(initial=-1)) + 2
    return group * stride + rank, stride


@dataclass(frozen=True)
class PairCounts:
    """Per-impression pair counts, [n] each (zero for unclicked impressions)."""

    negatives: NDArray[np.int64]  # unclicked impressions on the same page
    higher: NDArray[np.int64]  # ... of them scored strictly higher
    ties: NDArray[np.int64]  # ... of them scored exactly the same


def pair_counts(
    score: ArrayLike, label: ArrayLike, user_id: ArrayLike, request_id: ArrayLike
) -> PairCounts:
    """For each clicked impression, count the unclicked ones on its page above and level with it.

    Sorting-based: each page's unclicked scores become a sorted run of int64 keys, and a
    clicked impression's counts are three binary searches into that run.
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    pos = np.asarray(label).ravel() > 0.5
    group = _groups(user_id, request_id)
    key, stride = _grouped_keys(group, s)
    neg_keys = np.sort(key[~pos])

    n = len(s)
    negatives = np.zeros(n, dtype=np.int64)
    higher = np.zeros(n, dtype=np.int64)
    ties = np.zeros(n, dtype=np.int64)
    k = key[pos]
    g = group[pos]
    page_start = np.searchsorted(neg_keys, g * stride, side="left")
    page_end = np.searchsorted(neg_keys, (g + 1) * stride, side="left")
    level_lo = np.searchsorted(neg_keys, k, side="left")
    level_hi = np.searchsorted(neg_keys, k, side="right")
    negatives[pos] = page_end - page_start
    higher[pos] = page_end - level_hi
    ties[pos] = level_hi - level_lo
    return PairCounts(negatives=negatives, higher=higher, ties=ties)


def weighted_per_user_loss(
    score: ArrayLike,
    label: ArrayLike,
    watch_time: ArrayLike,
    user_id: ArrayLike,
    request_id: ArrayLike,
) -> float:
    """Mispredicted watch time / total watch time over (clicked, unclicked) same-page pairs.

    Ties count half. NaN when there is no pair with positive watch time.
    """
    c = pair_counts(score, label, user_id, request_id)
    t = np.asarray(watch_time, dtype=np.float64).ravel()
    t = np.where(np.asarray(label).ravel() > 0.5, t, 0.0)
    total = float(np.sum(t * c.negatives))
    if total <= 0:
        return float("nan")
    wrong = float(np.sum(t * (c.higher + 0.5 * c.ties)))
    return wrong / total


def _auc_by_group(
    score: NDArray[np.float64], pos: NDArray[np.bool_], group: NDArray[np.int64]
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """AUC per group (ties half) via mid-ranks: (auc [G], positives [G], negatives [G]).

    AUC is NaN for groups without both a positive and a negative.
    """
    n_groups = int(group.max(initial=-1)) + 1
    key, _ = _grouped_keys(group, score)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    # Mid-rank of each tie block (1-based within the whole array, then made group-relative).
    _, first, counts = np.unique(sorted_key, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    block = np.repeat(np.arange(len(first)), counts)
    rank = np.empty(len(score), dtype=np.float64)
    rank[order] = mid[block]
    sizes = np.bincount(group, minlength=n_groups)
    group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank -= group_start[group]
    n_pos = np.bincount(group, weights=pos, minlength=n_groups).astype(np.int64)
    n_neg = sizes - n_pos
    rank_sum = np.bincount(group, weights=np.where(pos, rank, 0.0), minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return auc, n_pos, n_neg


def auc(score: ArrayLike, label: ArrayLike) -> float:
    """Area under the ROC curve of `score` for clicks (ties half); NaN if one class is absent."""
    s = np.asarray(score, dtype=np.float64).ravel()
    pos = np.asarray(label).ravel() > 0.5
    a, _, _ = _auc_by_group(s, pos, np.zeros(len(s), dtype=np.int64))
    return float(a[0]) if len(a) else float("nan")


def gauc(score: ArrayLike, label: ArrayLike, user_id: ArrayLike) -> float:
    """Per-user AUC averaged with each user weighted by their number of impressions.

    Users with only clicks or only non-clicks have no AUC and are left out. NaN if none left.
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    pos = np.asarray(label).ravel() > 0.5
    a, n_pos, n_neg = _auc_by_group(s, pos, _groups(user_id))
    ok = ~np.isnan(a)
    if not ok.any():
        return float("nan")
    w = (n_pos + n_neg)[ok].astype(np.float64)
    return float(np.sum(a[ok] * w) / np.sum(w))


def log_loss(score: ArrayLike, label: ArrayLike, weight: ArrayLike | None = None) -> float:
    """Mean binary cross-entropy of sigmoid(score) against clicks (score is a logit).

    With `weight` [n], a weighted mean. For a watch-time model sigmoid(logit) is not a click
    probability, so its plain log loss is expected to be poor; see `weighted_logistic_loss`.
    """
    z = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(label).ravel() > 0.5
    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z); stable forms.
    per = np.where(y, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))
    if weight is None:
        return float(per.mean()) if len(per) else float("nan")
    w = np.asarray(weight, dtype=np.float64).ravel()
    return float(np.sum(w * per) / np.sum(w))


def weighted_logistic_loss(
    score: ArrayLike,
    label: ArrayLike,
    watch_time: ArrayLike,
    *,
    watch_time_unit: float = 1.0,
    clicks_as_negatives: bool = False,
) -> float:
    """The watch-time training objective on held-out impressions (mean over impressions).

    Same formula as `ranking.weighted_logistic_loss` with objective "watch_time": clicks
    weigh T / unit as positives, non-clicks 1 as negatives.
    """
    z = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(label).ravel() > 0.5
    t = np.asarray(watch_time, dtype=np.float64).ravel()
    pos_w = np.where(y, t / watch_time_unit, 0.0)
    neg_w = np.ones_like(z) if clicks_as_negatives else (~y).astype(np.float64)
    per = pos_w * np.logaddexp(0.0, -z) + neg_w * np.logaddexp(0.0, z)
    return float(per.mean()) if len(per) else float("nan")


def calibration(predicted: ArrayLike, watch_time: ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Predicted vs observed watch time per impression (seconds), overall and by decile.

    predicted [n]: exp(logit) * unit, the model's expected watch time of each impression;
    watch_time [n]: observed (0 for non-clicks). Deciles are equal-count bins of impressions
    sorted by prediction (the last bins take the remainder). Returns
        {"mean_predicted", "mean_observed", "ratio" (= predicted / observed),
         "deciles": [{"count", "mean_predicted", "mean_observed", "ratio"}, ...]}
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    t = np.asarray(watch_time, dtype=np.float64).ravel()
    order = np.argsort(p, kind="stable")
    rows = []
    for idx in np.array_split(order, bins):
        if len(idx) == 0:
            continue
        mp, mo = float(p[idx].mean()), float(t[idx].mean())
        rows.append(
            {
                "count": len(idx),
                "mean_predicted": mp,
                "mean_observed": mo,
                "ratio": mp / mo if mo > 0 else float("nan"),
            }
        )
    mp = float(p.mean()) if len(p) else float("nan")
    mo = float(t.mean()) if len(t) else float("nan")
    return {
        "mean_predicted": mp,
        "mean_observed": mo,
        "ratio": mp / mo if mo > 0 else float("nan"),
        "deciles": rows,
    }


def ranking_metrics(
    score: ArrayLike,
    label: ArrayLike,
    watch_time: ArrayLike,
    user_id: ArrayLike,
    request_id: ArrayLike,
    *,
    watch_time_unit: float = 1.0,
    clicks_as_negatives: bool = False,
    calibration_factor: float = 1.0,
) -> dict[str, Any]:
    """Every ranking metric at once (score = logits), as a JSON-able dict.

    Keys: weighted_per_user_loss, auc, gauc, log_loss, weighted_log_loss, impressions,
    clicks, pages, pairs, and two `calibration` reports: "calibration" of the model's
    expected watch time c * exp(score) * watch_time_unit (c = calibration_factor, also
    stored there as "factor") and "calibration_raw" of exp(score) * watch_time_unit. The
    deciles are the same impressions in both (a positive factor keeps the order).
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(label).ravel() > 0.5
    t = np.asarray(watch_time, dtype=np.float64).ravel()
    c = pair_counts(s, y, user_id, request_id)
    pos_t = np.where(y, t, 0.0)
    total = float(np.sum(pos_t * c.negatives))
    wpul = float(np.sum(pos_t * (c.higher + 0.5 * c.ties))) / total if total > 0 else np.nan
    return {
        "weighted_per_user_loss": float(wpul),
        "auc": auc(s, y),
        "gauc": gauc(s, y, user_id),
        "log_loss": log_loss(s, y),
        "weighted_log_loss": weighted_logistic_loss(
            s, y, t, watch_time_unit=watch_time_unit, clicks_as_negatives=clicks_as_negatives
        ),
        "calibration": {
            "factor": calibration_factor,
            **calibration(np.exp(s) * (watch_time_unit * calibration_factor), t),
        },
        "calibration_raw": calibration(np.exp(s) * watch_time_unit, t),
        "impressions": len(s),
        "clicks": int(y.sum()),
        "pages": len(np.unique(_groups(user_id, request_id))),
        "pairs": int(c.negatives.sum()),
    }


def top_k_share(score: ArrayLike, user_id: ArrayLike, flag: ArrayLike, k: int = 10) -> float:
    """Share of flagged impressions among each user's top k by score, over all users.

    For every user, their impressions are sorted by score (descending; ties in input order)
    and the first k kept; the result is (flagged kept) / (kept). With `flag` = "the item is
    high-clickbait" this shows whether a ranker pushes clickbait up (compare with the share
    among all impressions, `np.mean(flag)`).
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    f = np.asarray(flag).ravel().astype(bool)
    group = _groups(user_id)
    order = np.lexsort((-s, group))
    g_sorted = group[order]
    starts = np.searchsorted(g_sorted, g_sorted, side="left")
    keep = order[(np.arange(len(order)) - starts) < k]
    return float(f[keep].mean()) if len(keep) else float("nan")
