"""Reading data: the dataset's user and item columns by id, and the event tables
sorted by (user, ts) (`_Log`) that every example is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.dataset import Dataset
from funnelrec.data.schema import validate_table
from funnelrec.errors import DataError
from funnelrec.features.config import CANDIDATE_SCORE, CANDIDATE_SOURCE
from funnelrec.features.partition import EventTables
from funnelrec.features.splits import user_offsets
from funnelrec.features.tokenize import tokenize_array


@dataclass(eq=False)
class _Users:
    """Per-user columns indexed by dataset user id (row 0 unused); raw values."""

    n: int
    age: np.ndarray | None  # float64, NaN missing
    logged_in: np.ndarray | None  # float64 1/0, NaN missing
    gender: pa.Array | None  # string, null missing
    region: pa.Array | None
    device: pa.Array | None


@dataclass(eq=False)
class _Items:
    """Per-item columns indexed by dataset item id (row 0 unused)."""

    n: int
    upload_ts: np.ndarray | None  # float64, NaN missing
    duration: np.ndarray | None
    channel: np.ndarray | None  # int64, 0 missing
    topic_code: np.ndarray | None  # int64 dense code of the topic string, 0 missing
    topic: pa.Array | None  # raw topic string per item id, null missing


def _by_id(ids: np.ndarray, n: int, values: np.ndarray, fill: Any) -> np.ndarray:
    out = np.full(n + 1, fill, dtype=values.dtype)
    out[ids] = values
    return out


def _arrow_by_id(ids: np.ndarray, n: int, values: pa.Array) -> pa.Array:
    index = np.full(n + 1, -1, dtype=np.int64)
    index[ids] = np.arange(len(ids))
    mask = index < 0
    return values.take(pa.array(np.where(mask, 0, index), mask=mask))


def _float_col(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name).cast(pa.float64())
    return np.asarray(pc.fill_null(col, np.nan).to_numpy(), dtype=np.float64)


def _read_users(ds: Dataset, n_min: int) -> _Users:
    t = ds.table("users")
    ids = t.column("user_id").to_numpy()
    n = max(int(ids.max()) if len(ids) else 0, n_min)
    age = _float_col(t, "age")
    logged = _float_col(t, "logged_in")

    def s(name: str) -> pa.Array | None:
        if name not in t.column_names:
            return None
        return _arrow_by_id(ids, n, t.column(name).combine_chunks())

    return _Users(
        n=n,
        age=None if age is None else _by_id(ids, n, age, np.nan),
        logged_in=None if logged is None else _by_id(ids, n, logged, np.nan),
        gender=s("gender"),
        region=s("region"),
        device=s("device"),
    )


def _read_items(ds: Dataset, n_min: int) -> _Items:
    t = ds.table("items")
    ids = t.column("item_id").to_numpy()
    n = max(int(ids.max()) if len(ids) else 0, n_min)
    upload = _float_col(t, "upload_ts")
    duration = _float_col(t, "duration_s")
    channel = None
    if "channel_id" in t.column_names:
        ch = np.asarray(pc.fill_null(t.column("channel_id"), 0).to_numpy(), dtype=np.int64)
        channel = _by_id(ids, n, ch, 0)
    topic_code = topic = None
    if "topic" in t.column_names:
        topic = _arrow_by_id(ids, n, t.column("topic").combine_chunks())
        enc = pc.dictionary_encode(topic)
        codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False))
        topic_code = codes.astype(np.int64) + 1
    return _Items(
        n=n,
        upload_ts=None if upload is None else _by_id(ids, n, upload, np.nan),
        duration=None if duration is None else _by_id(ids, n, duration, np.nan),
        channel=channel,
        topic_code=topic_code,
        topic=topic,
    )


@dataclass(eq=False)
class _Log:
    """The event tables, sorted by (user, ts) with ties in row order."""

    users: _Users
    items: _Items
    w_user: np.ndarray
    w_item: np.ndarray
    w_ts: np.ndarray
    w_start: np.ndarray  # [U + 2] user offsets into the watches
    s_user: np.ndarray
    s_ts: np.ndarray
    s_tokens: pa.Array  # flat token strings of all queries, in sorted query order
    s_tok_off: np.ndarray  # [Q + 1]
    s_start: np.ndarray  # [U + 2]
    imp: pa.Table | None  # sorted by (user, ts, request_id, position)


def _sort_by_user_ts(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    return np.lexsort((ts, user))  # stable: equal (user, ts) keep row order


def _check_impressions(table: pa.Table) -> pa.Table:
    """Impressions given by the caller, validated as the dataset's would be (the canonical
    columns and the optional candidate-generation ones)."""
    return validate_table("impressions", table, where="impressions given to build_features")


def _read_log(
    ds: EventTables,
    impressions: pa.Table | None = None,
    *,
    users: _Users | None = None,
    items: _Items | None = None,
    candidate_columns: bool = True,
) -> _Log:
    """The events of `ds` sorted by (user, ts). `users` and `items`, when given, are used
    as they are (one block of a larger dataset: sized for all its ids); otherwise they are
    read from `ds` (a Dataset), sized for the largest id of its tables and events. Without
    `candidate_columns` the impressions' cand_source / cand_score are dropped, as if they
    did not carry them (`FeaturesConfig.candidate_columns`)."""
    w = ds.table("watches", columns=["user_id", "item_id", "ts"])
    if w.num_rows == 0 and users is None:
        raise DataError(f"{ds.path}: the watches table is empty")
    w_user = np.asarray(w.column("user_id").to_numpy(), dtype=np.int64)
    w_ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
    w_item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)
    order = _sort_by_user_ts(w_user, w_ts)
    w_user, w_item, w_ts = w_user[order], w_item[order], w_ts[order]
    del w

    if ds.has("searches") and ds.num_rows("searches") > 0:
        s = ds.table("searches")
        s_user = np.asarray(s.column("user_id").to_numpy(), dtype=np.int64)
        s_ts = np.asarray(s.column("ts").to_numpy(), dtype=np.int64)
        order = _sort_by_user_ts(s_user, s_ts)
        s_user, s_ts = s_user[order], s_ts[order]
        tokens, tok_off = tokenize_array(s.column("query").take(pa.array(order)))
    else:
        s_user = s_ts = np.zeros(0, dtype=np.int64)
        tokens, tok_off = pa.array([], type=pa.string()), np.zeros(1, dtype=np.int64)

    imp = None
    if impressions is not None:
        imp = _check_impressions(impressions) if impressions.num_rows else None
    elif ds.has("impressions") and ds.num_rows("impressions") > 0:
        imp = ds.table("impressions")
    if imp is not None and not candidate_columns:
        imp = imp.drop_columns(
            [c for c in (CANDIDATE_SOURCE, CANDIDATE_SCORE) if c in imp.column_names]
        )
    if imp is not None:
        order = np.lexsort(
            (
                imp.column("position").to_numpy(),
                imp.column("request_id").to_numpy(),
                imp.column("ts").to_numpy(),
                imp.column("user_id").to_numpy(),
            )
        )
        imp = imp.take(pa.array(order))

    if users is None or items is None:
        assert isinstance(ds, Dataset)
        n_users = int(max(w_user.max(), s_user.max() if s_user.size else 0))
        if imp is not None:
            n_users = max(n_users, int(pc.max(imp.column("user_id")).as_py()))
        users = _read_users(ds, n_users)
        n_items = int(w_item.max())
        if imp is not None:
            n_items = max(n_items, int(pc.max(imp.column("item_id")).as_py()))
        items = _read_items(ds, n_items)
    return _Log(
        users=users,
        items=items,
        w_user=w_user,
        w_item=w_item,
        w_ts=w_ts,
        w_start=user_offsets(w_user, users.n),
        s_user=s_user,
        s_ts=s_ts,
        s_tokens=tokens,
        s_tok_off=tok_off,
        s_start=user_offsets(s_user, users.n),
        imp=imp,
    )
