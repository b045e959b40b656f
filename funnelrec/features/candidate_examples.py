"""Candidate-generation examples: one per label watch, with its history and search bags,
demographics, example age and (held out) the items seen before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from funnelrec.features.config import FeaturesConfig
from funnelrec.features.splits import TRAIN, VALID, Split, TimeIndex
from funnelrec.features.tables import _Log
from funnelrec.features.vectorised import _list_array, _sample_per_user, drop_zeros, gather_ranges


@dataclass(eq=False)
class _CandidateContext:
    log: _Log
    split: Split
    item_ids: np.ndarray  # [W] item vocabulary id of each sorted watch
    token_ids: np.ndarray  # [T] token vocabulary id of each flat query token
    region: np.ndarray  # [U + 1] per user id
    device: np.ndarray
    dense: np.ndarray  # [U + 1, F]
    item_vocab_size: int
    search_index: TimeIndex  # searches by (user, ts)
    t_min: int
    t_max: int


def _search_bags(
    ctx: _CandidateContext, user: np.ndarray, before_ts: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the last n queries of each user with ts < before_ts (flat, offsets)."""
    log = ctx.log
    if log.s_user.size == 0:
        return np.zeros(0, np.int32), np.zeros(len(user) + 1, np.int64)
    # Searches are already sorted by (user, ts), so the index's positions are theirs.
    start, end = ctx.search_index.before(user, before_ts)
    lo = np.maximum(start, end - n)
    return gather_ranges(ctx.token_ids, log.s_tok_off[lo], log.s_tok_off[end])


def _candidate_table(
    ctx: _CandidateContext,
    pos: np.ndarray,
    *,
    held_out: bool,
    random_holdout: bool,
    cfg: FeaturesConfig,
    rng: np.random.Generator,
    stats: dict[str, float],
) -> pa.Table:
    """Examples labelled by sorted watch positions `pos` (all one part)."""
    log = ctx.log
    n = cfg.history_n
    user = log.w_user[pos]
    t = log.w_ts[pos]
    us = log.w_start[user]
    if random_holdout:
        # A window of n + 1 training watches containing the label, then the label removed.
        te = ctx.split.train_end[user]
        lo = np.clip(pos - n // 2, us, np.maximum(us, te - (n + 1)))
        hi = np.minimum(lo + n + 1, te)
        idx, off = gather_ranges(np.arange(len(log.w_ts), dtype=np.int64), lo, hi)
        owner = np.repeat(np.arange(len(pos)), np.diff(off))
        keep = idx != pos[owner]
        hist, hist_off = (
            ctx.item_ids[idx[keep]],
            np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(pos)))]),
        )
        # Searches up to the last watch of the window (strictly before the boundary).
        last = hi - 1
        search_before = np.where(last > pos, log.w_ts[last] + 1, t)
        search_before = np.minimum(search_before, ctx.split.valid_from[user])
    else:
        hist, hist_off = gather_ranges(ctx.item_ids, np.maximum(us, pos - n), pos)
        search_before = t
    stats["history_ids"] += hist.size
    stats["history_oov"] += int((hist == 0).sum())
    hist, hist_off = drop_zeros(hist, hist_off)
    toks, tok_off = _search_bags(ctx, user, search_before, cfg.search_n)
    stats["search_ids"] += toks.size
    stats["search_oov"] += int((toks == 0).sum())
    toks, tok_off = drop_zeros(toks, tok_off)
    label = ctx.item_ids[pos]
    if held_out:
        age = np.zeros(len(pos), dtype=np.float32)
    else:
        span = max(ctx.t_max - ctx.t_min, 1)
        age = np.clip((ctx.t_max - t) / span, 0.0, 1.0).astype(np.float32)
    dense = ctx.dense[user]
    f = dense.shape[1]
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(user),
        "ts": pa.array(t),
        "item_id": pa.array(log.w_item[pos]),
        "label": pa.array(label, type=pa.int32()),
        "history": _list_array(hist, hist_off, pa.int32()),
        "search": _list_array(toks, tok_off, pa.int32()),
        "region": pa.array(ctx.region[user], type=pa.int32()),
        "device": pa.array(ctx.device[user], type=pa.int32()),
        "dense": _list_array(
            dense.reshape(-1), np.arange(len(pos) + 1, dtype=np.int64) * f, pa.float32()
        ),
        "example_age": pa.array(age, type=pa.float32()),
    }
    if held_out:
        seen, seen_off = gather_ranges(ctx.item_ids, us, pos)
        owner = np.repeat(np.arange(len(pos), dtype=np.int64), np.diff(seen_off))
        vocab_n = ctx.item_vocab_size
        keyed = np.sort(owner * vocab_n + seen)  # distinct (example, item) pairs, sorted
        keyed = keyed[np.concatenate([[True], keyed[1:] != keyed[:-1]])[: keyed.size]]
        ids = keyed % vocab_n
        own = keyed // vocab_n
        keep = ids != 0
        ids, own = ids[keep], own[keep]
        seen_off = np.concatenate([[0], np.cumsum(np.bincount(own, minlength=len(pos)))])
        cols["seen"] = _list_array(ids.astype(np.int32), seen_off, pa.int32())
    table = pa.table(cols)
    if not held_out:
        table = table.take(pa.array(rng.permutation(table.num_rows)))
    return table


def _candidate_positions(
    ctx: _CandidateContext, part: int, cap: int | None, rng: np.random.Generator
) -> np.ndarray:
    split = ctx.split
    n_w = len(ctx.log.w_ts)
    users = np.arange(len(split.train_end))
    if part == TRAIN:
        lo, hi = split.user_start[:-1], split.train_end
    elif part == VALID:
        lo, hi = split.train_end, split.valid_end
    else:
        lo, hi = split.valid_end, split.user_start[1:]
    pos, off = gather_ranges(np.arange(n_w, dtype=np.int64), lo, hi)
    owner = np.repeat(users, np.diff(off))
    return pos[_sample_per_user(owner, cap, rng)]
