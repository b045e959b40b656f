"""The canonical users and items tables of a world, and the id and token strings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.simulate.truth import World
from funnelrec.simulate.world import I64


def _ids(prefix: str, n: int) -> pa.Array:
    ids = pa.array(np.arange(1, n + 1, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), ids, "")


def _join_tokens(strings: pa.Array, tokens: I64, sep: str = " ") -> pa.Array:
    """Rows of token indices (-1 = none) joined into strings."""
    cols = []
    for j in range(tokens.shape[1]):
        col = tokens[:, j]
        cols.append(pc.take(strings, pa.array(col, mask=col < 0)))
    return pc.binary_join_element_wise(*cols, sep, null_handling="skip")


def users_table(world: World) -> pa.Table:
    """The canonical users table (logged-out users have no age or gender)."""
    u = world.users
    li = np.asarray(u["logged_in"], dtype=bool)
    return pa.table(
        {
            "user_id": np.arange(1, world.n_users + 1, dtype=np.int64),
            "age": pa.array(u["age"], mask=~li),
            "gender": pa.array(u["gender"], mask=~li),
            "region": pa.array(u["region"]),
            "device": pa.array(u["device"]),
            "logged_in": pa.array(li),
        }
    )


def items_table(world: World, rng: np.random.Generator) -> pa.Table:
    """The canonical items table; titles are topic tokens (+ series name and episode)."""
    n = world.n_items
    V = len(world.vocab[0]) if world.vocab else 0
    words = pa.array([t for v in world.vocab for t in v] + world.generic_tokens)
    zipf = 1.0 / np.arange(1, V + 1) ** 0.8
    zipf_cum = np.cumsum(zipf / zipf.sum())
    length = rng.integers(3, 6, n)
    tok = world.topic[:, None].astype(np.int64) * V + np.minimum(
        np.searchsorted(zipf_cum, rng.random((n, 5))), V - 1
    )
    tok[np.arange(5)[None, :] >= length[:, None]] = -1
    for j in range(1, 5):  # no repeated word within a title
        tok[(tok[:, :j] == tok[:, j : j + 1]).any(axis=1), j] = -1
    # A series' name: two distinct tokens of its topic, the same for every episode.
    sid = world.series_id
    first = (sid * 7919) % V
    second = (first + 1 + (sid * 104729) % max(V - 1, 1)) % V
    base = world.topic.astype(np.int64) * V
    is_series = sid > 0
    tok[is_series, 0] = (base + first)[is_series]
    tok[is_series, 1] = np.where(V > 1, base + second, -1)[is_series]
    tok[is_series, 2:] = -1
    title = _join_tokens(words, tok)
    ep = pc.binary_join_element_wise(
        title, pa.scalar("ep"), pa.array(world.episode.astype(np.int64)).cast(pa.string()), " "
    )
    title = pc.if_else(pa.array(is_series), ep, title)
    return pa.table(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "upload_ts": world.upload_ts,
            "duration_s": world.duration_s,
            "channel_id": world.items["channel_id"],
            "topic": pc.take(pa.array(world.topics), pa.array(world.topic)),
            "title": title,
        }
    )
