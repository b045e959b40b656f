"""Ranking examples: one per impression, every feature from events strictly before its
ts, and the query-side bags of each request (stored once per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.features.candidate_examples import _CandidateContext, _search_bags
from funnelrec.features.config import CANDIDATE_SCORE, CANDIDATE_SOURCE, FeaturesConfig
from funnelrec.features.partition import CountsBefore
from funnelrec.features.splits import TimeIndex
from funnelrec.features.tables import _Log
from funnelrec.features.vectorised import _list_array, drop_zeros, gather_ranges
from funnelrec.features.vocab import Vocabulary


@dataclass(eq=False)
class _RankingContext:
    """Time indexes over all events, for features "before ts" of any impression."""

    log: _Log
    rank_ids: np.ndarray  # [W] rank_item vocabulary id of each sorted watch
    token_ids: np.ndarray
    by_user: TimeIndex  # watches by user (positions = sorted watch positions)
    by_user_channel: TimeIndex | None
    by_user_topic: TimeIndex | None
    by_user_item: TimeIndex
    by_item: CountsBefore  # every user's watches of an item before t (popularity)
    shown: TimeIndex  # impressions by (user, item)
    n_items: int
    n_channels: int
    n_topics: int


def _channel_code(log: _Log) -> tuple[np.ndarray | None, int]:
    """Per item id: a dense code of its channel (0 = none), and the number of codes."""
    ch = log.items.channel
    if ch is None:
        return None, 0
    uniq, code = np.unique(ch, return_inverse=True)
    code = code.astype(np.int64)
    if uniq[0] == 0:
        return code, len(uniq)
    return code + 1, len(uniq) + 1


def _rank_context(
    log: _Log, rank_ids: np.ndarray, token_ids: np.ndarray, by_item: CountsBefore
) -> _RankingContext:
    assert log.imp is not None
    ch_code, n_ch = _channel_code(log)
    n_items = log.items.n + 1
    by_user_channel = by_user_topic = None
    if ch_code is not None:
        wc = ch_code[log.w_item]
        m = wc > 0
        by_user_channel = TimeIndex(log.w_user[m] * (n_ch + 1) + wc[m], log.w_ts[m])
    n_topics = 0
    if log.items.topic_code is not None:
        n_topics = int(log.items.topic_code.max()) + 1
        wt = log.items.topic_code[log.w_item]
        m = wt > 0
        by_user_topic = TimeIndex(log.w_user[m] * (n_topics + 1) + wt[m], log.w_ts[m])
    i_user = np.asarray(log.imp.column("user_id").to_numpy(), dtype=np.int64)
    i_item = np.asarray(log.imp.column("item_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(log.imp.column("ts").to_numpy(), dtype=np.int64)
    return _RankingContext(
        log=log,
        rank_ids=rank_ids,
        token_ids=token_ids,
        by_user=TimeIndex(log.w_user, log.w_ts),
        by_user_channel=by_user_channel,
        by_user_topic=by_user_topic,
        by_user_item=TimeIndex(log.w_user * n_items + log.w_item, log.w_ts),
        by_item=by_item,
        shown=TimeIndex(i_user * n_items + i_item, i_ts),
        n_items=n_items,
        n_channels=n_ch,
        n_topics=n_topics,
    )


def _count_and_ago(
    index: TimeIndex | None,
    group: np.ndarray,
    ts: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    sort_queries: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Events of each query's group before ts: count and seconds since the latest (NaN).

    Queries come sorted by (user, ts), so groups that start with the user are already in
    near order; for the item alone, and for the (large) impression index, sorting the
    queries first measured faster."""
    if index is None:
        nan = np.full(len(ts), np.nan)
        return nan, nan.copy()
    start, end = index.before(group, ts, sort_queries=sort_queries)
    count = (end - start).astype(np.float64)
    last = index.ts[np.maximum(end - 1, 0)] if len(index.ts) else np.zeros(len(ts), np.int64)
    ago = np.where(count > 0, (ts - last).astype(np.float64), np.nan)
    if valid is not None:
        count = np.where(valid, count, np.nan)
        ago = np.where(valid, ago, np.nan)
    return count, ago


def _ranking_raw(
    ctx: _RankingContext, user: np.ndarray, item: np.ndarray, ts: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Raw continuous features (RANKING_CONTINUOUS) of impressions sorted by (user, ts),
    plus the [start, end) positions of each user's watches before ts (for the seed item)."""
    log, items = ctx.log, ctx.log.items
    out: dict[str, np.ndarray] = {}
    start, end = ctx.by_user.before(user, ts, sort_queries=False)
    out["user_prior_watches"] = (end - start).astype(np.float64)
    last = log.w_ts[np.maximum(end - 1, 0)]
    out["user_last_watch_ago_s"] = np.where(end > start, (ts - last).astype(np.float64), np.nan)
    ch_code, n_ch = _channel_code(log)
    if ch_code is not None:
        c = ch_code[item]
        out["channel_watches"], out["channel_last_watch_ago_s"] = _count_and_ago(
            ctx.by_user_channel, user * (n_ch + 1) + c, ts, valid=c > 0
        )
    else:
        out["channel_watches"], out["channel_last_watch_ago_s"] = _count_and_ago(None, user, ts)
    if items.topic_code is not None:
        tc = items.topic_code[item]
        out["topic_watches"], out["topic_last_watch_ago_s"] = _count_and_ago(
            ctx.by_user_topic, user * (ctx.n_topics + 1) + tc, ts, valid=tc > 0
        )
    else:
        out["topic_watches"], out["topic_last_watch_ago_s"] = _count_and_ago(None, user, ts)
    ui = user * ctx.n_items + item
    out["item_watched_before"], _ = _count_and_ago(ctx.by_user_item, ui, ts)
    out["item_shown_before"], out["item_last_shown_ago_s"] = _count_and_ago(
        ctx.shown, ui, ts, sort_queries=True
    )
    out["item_prior_watches"] = ctx.by_item.count_before(item, ts).astype(np.float64)
    if items.upload_ts is not None:
        out["item_age_s"] = np.maximum(ts - items.upload_ts[item], 0.0)
    else:
        out["item_age_s"] = np.full(len(ts), np.nan)
    out["duration_s"] = (
        items.duration[item] if items.duration is not None else np.full(len(ts), np.nan)
    )
    return out, start, end


@dataclass(eq=False)
class _RankingVocabs:
    item: Vocabulary
    channel: Vocabulary | None
    topic: Vocabulary | None
    source: Vocabulary | None


def _request_table(
    ctx: _RankingContext,
    cand: _CandidateContext,
    first: np.ndarray,
    *,
    cfg: FeaturesConfig,
    stats: dict[str, float],
) -> pa.Table:
    """The query-side bags of requests, given each request's first impression row.

    The watch history and search tokens are the same for every impression of a request
    (query features are computed once per request: Covington et al. 2016, section 4.1), so
    they are stored once per request and joined by the loader, not repeated for each of the
    slate's impressions.
    """
    log = ctx.log
    assert log.imp is not None
    user = np.asarray(log.imp.column("user_id").take(pa.array(first)).to_numpy(), np.int64)
    ts = np.asarray(log.imp.column("ts").take(pa.array(first)).to_numpy(), np.int64)
    start, end = ctx.by_user.before(user, ts)
    hist, hist_off = gather_ranges(ctx.rank_ids, np.maximum(start, end - cfg.history_n), end)
    stats["history_ids"] += hist.size
    stats["history_oov"] += int((hist == 0).sum())
    hist, hist_off = drop_zeros(hist, hist_off)
    toks, tok_off = _search_bags(cand, user, ts, cfg.search_n)
    toks, tok_off = drop_zeros(toks, tok_off)
    return pa.table(
        {
            "request_id": log.imp.column("request_id").take(pa.array(first)).combine_chunks(),
            "user_id": pa.array(user),
            "ts": pa.array(ts),
            "history": _list_array(hist, hist_off, pa.int32()),
            "search": _list_array(toks, tok_off, pa.int32()),
        }
    )


def _ranking_table(
    ctx: _RankingContext,
    cand: _CandidateContext,
    vocabs: _RankingVocabs,
    rows: np.ndarray,
    request_index: np.ndarray,
    *,
    stats: dict[str, float],
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Ranking examples for impression rows `rows` (indices into the sorted impressions);
    `request_index` is each row's position in its split's requests table."""
    log = ctx.log
    assert log.imp is not None
    # Work on the rows in (user, ts) order, the impressions' own, so that every time-index
    # lookup walks its arrays in order; the caller's (shuffled) order is restored at the end.
    order = np.argsort(rows, kind="stable")
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    rows, request_index = rows[order], request_index[order]
    imp = log.imp.take(pa.array(rows))
    user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    item = np.asarray(imp.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    raw, start, end = _ranking_raw(ctx, user, item, ts)
    seed = np.where(end > start, ctx.rank_ids[np.maximum(end - 1, 0)], 0).astype(np.int32)
    item_id = vocabs.item.lookup(item)
    stats["items"] += len(item_id)
    stats["item_oov"] += int((item_id == 0).sum())
    cols: dict[str, pa.Array] = {
        "request_id": imp.column("request_id").combine_chunks(),
        "user_id": pa.array(user),
        "ts": pa.array(ts),
        "item_id": pa.array(item),
        "position": imp.column("position").combine_chunks(),
        "label": pc.cast(imp.column("clicked"), pa.float32()).combine_chunks(),
        "watch_time": pc.cast(imp.column("watch_time_s"), pa.float32()).combine_chunks(),
        "request_index": pa.array(request_index, type=pa.int64()),
        "item": pa.array(item_id, type=pa.int32()),
        "seed": pa.array(seed, type=pa.int32()),
        "region": pa.array(cand.region[user], type=pa.int32()),
        "device": pa.array(cand.device[user], type=pa.int32()),
    }
    if vocabs.channel is not None and log.items.channel is not None:
        ch = log.items.channel[item]
        cols["channel"] = pa.array(
            vocabs.channel.lookup(pa.array(ch, mask=ch == 0)), type=pa.int32()
        )
    if vocabs.topic is not None and log.items.topic is not None:
        cols["topic"] = pa.array(
            vocabs.topic.lookup(log.items.topic.take(pa.array(item))), type=pa.int32()
        )
    if vocabs.source is not None:
        cols["source"] = pa.array(
            vocabs.source.lookup(imp.column(CANDIDATE_SOURCE)), type=pa.int32()
        )
    if CANDIDATE_SCORE in imp.column_names:
        raw[CANDIDATE_SCORE] = np.asarray(
            pc.fill_null(imp.column(CANDIDATE_SCORE).cast(pa.float64()), np.nan).to_numpy(),
            dtype=np.float64,
        )
    for name, values in raw.items():
        cols[name] = pa.array(values.astype(np.float32), type=pa.float32())
    table = pa.table(cols).take(pa.array(restore))
    return table, {name: values[restore] for name, values in raw.items()}
