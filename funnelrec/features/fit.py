"""Pass 1 of a build: the split, the training part's counts, the transforms fitted on them.

A block's counts (`_count_block`) are summed over blocks (`_Counts.merge`) and the
vocabularies and the user encoder are fitted once from the sum (`_fit_transforms`), so
the transforms are the same however the data is cut into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.errors import DataError
from funnelrec.features import CANDIDATE_SOURCE, FeaturesConfig, UserEncoder
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.ranking_examples import _RankingVocabs
from funnelrec.features.splits import (
    NEVER,
    TEST,
    TRAIN,
    VALID,
    Split,
    leave_last_out,
    time_boundaries,
    time_split,
)
from funnelrec.features.tables import _Log, _Users
from funnelrec.features.transforms import _fit_user_encoder
from funnelrec.features.vectorised import _sample_per_user
from funnelrec.features.vocab import Vocabulary


def _split(
    log: _Log, kind: str, cfg: FeaturesConfig, bounds: tuple[int, int] | None, whole: bool
) -> Split:
    """The split of one block's watches; `bounds` are the time split's global (t1, t2)."""
    if kind == "last":
        return leave_last_out(
            log.w_start, log.w_ts, min_watches=cfg.min_watches, valid_n=cfg.valid_n
        )
    assert bounds is not None
    return time_split(log.w_start, log.w_ts, bounds[0], bounds[1], require_train=whole)


def _time_bounds(w_ts: np.ndarray, cfg: FeaturesConfig) -> tuple[int, int]:
    t1, t2 = cfg.t1, cfg.t2
    if t1 is None or t2 is None:
        q1, q2 = time_boundaries(w_ts, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac)
        t1, t2 = (q1 if t1 is None else t1), (q2 if t2 is None else t2)
    return int(t1), int(t2)


@dataclass(eq=False)
class _Counts:
    """Training-part counts summed over blocks: what the transforms are fitted from."""

    keys: dict[str, list[Any]] = field(default_factory=dict)
    freq: dict[str, list[np.ndarray]] = field(default_factory=dict)
    train_users: list[np.ndarray] = field(default_factory=list)
    t_min: int | None = None
    t_max: int | None = None
    rank_train_rows: list[int] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)  # per block: per part
    held_out_users: int = 0
    rank_columns: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[_Counts]) -> _Counts:
        """The counts of several blocks, in block order."""
        out = cls()
        for p in parts:
            for name, keys in p.keys.items():
                out.keys.setdefault(name, []).extend(keys)
                out.freq.setdefault(name, []).extend(p.freq[name])
            out.train_users += p.train_users
            if p.t_min is not None and p.t_max is not None:
                out.add_time_range(p.t_min, p.t_max)
            out.rank_train_rows += p.rank_train_rows
            out.requests += p.requests
            out.held_out_users += p.held_out_users
            out.rank_columns = out.rank_columns or p.rank_columns
        return out

    def add_time_range(self, lo: int, hi: int) -> None:
        """Widen the training watches' time range to include [lo, hi]."""
        self.t_min = lo if self.t_min is None else min(self.t_min, lo)
        self.t_max = hi if self.t_max is None else max(self.t_max, hi)

    def add(self, name: str, values: pa.Array | np.ndarray) -> None:
        """Count `values` (nulls ignored) under vocabulary `name`."""
        if isinstance(values, np.ndarray):
            keys, freq = np.unique(values, return_counts=True)
            self.keys.setdefault(name, []).append(keys)
        else:
            vc = pc.value_counts(pc.drop_null(values))
            keys_a = vc.field("values")
            freq = np.asarray(vc.field("counts").to_numpy(), dtype=np.int64)
            self.keys.setdefault(name, []).append(keys_a)
        self.freq.setdefault(name, []).append(np.asarray(freq, dtype=np.int64))

    def vocab(self, name: str, *, max_size: int | None, min_count: int, kind: str) -> Vocabulary:
        keys = self.keys.get(name, [])
        freq = np.concatenate(self.freq[name]) if keys else np.zeros(0, np.int64)
        values: pa.Array | np.ndarray
        if kind == "int":
            values = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        else:
            values = pa.concat_arrays(keys) if keys else pa.array([], type=pa.string())
        return Vocabulary.from_counts(name, values, freq, max_size=max_size, min_count=min_count)


def _count_block(
    log: _Log, sp: Split, cfg: FeaturesConfig, acc: _Counts, cap_seed: int | list[int]
) -> None:
    """Pass 1 over a block: add its training-part counts to `acc`."""
    train_w = sp.part_of_watches(len(log.w_ts)) == TRAIN
    if train_w.any():
        t = log.w_ts[train_w]
        acc.add_time_range(int(t.min()), int(t.max()))
    acc.add("item", log.w_item[train_w])
    s_part = sp.part_of(log.s_user, log.s_ts)
    tok_owner = np.repeat(np.arange(len(log.s_ts)), np.diff(log.s_tok_off))
    train_tok = s_part[tok_owner] == TRAIN if tok_owner.size else np.zeros(0, bool)
    acc.add("token", log.s_tokens.filter(pa.array(train_tok)))
    acc.train_users.append(np.unique(log.w_user[train_w]))
    if sp.kind == "last":
        acc.held_out_users += int((sp.valid_from < NEVER).sum())
    imp = log.imp
    if imp is None or not cfg.ranking:
        # one entry per block all the same, so that block b's counts stay at index b
        acc.rank_train_rows.append(0)
        acc.requests.append([0, 0, 0])
        if imp is not None:
            acc.rank_columns = imp.column_names
        return
    acc.rank_columns = imp.column_names
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    i_item = np.asarray(imp.column("item_id").to_numpy(), dtype=np.int64)
    part = sp.part_of(i_user, i_ts)
    train = part == TRAIN
    clicked = np.asarray(imp.column("clicked").to_numpy(zero_copy_only=False), dtype=bool)
    acc.add("rank_item", i_item[train & clicked])
    if log.items.channel is not None:
        ch = log.items.channel[i_item[train]]
        acc.add("channel", ch[ch != 0])
    if log.items.topic is not None:
        acc.add("topic", log.items.topic.take(pa.array(i_item[train])))
    if CANDIDATE_SOURCE in imp.column_names:
        acc.add("source", imp.column(CANDIDATE_SOURCE).combine_chunks().filter(pa.array(train)))
    kept = _ranking_parts(imp, sp, cfg.rank_cap, cap_seed)
    acc.rank_train_rows.append(int((kept == TRAIN).sum()))
    first = _request_starts(imp)
    acc.requests.append([int((kept[first] == p).sum()) for p in (TRAIN, VALID, TEST)])


def _ranking_parts(imp: pa.Table, sp: Split, cap: int | None, seed: int | list[int]) -> np.ndarray:
    """[n] part of each impression; -1 for training impressions left out by `cap` (at most
    `cap` training requests per user, sampled with `seed`, whole pages kept)."""
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    part = sp.part_of(i_user, i_ts)
    if cap is None:
        return part
    first = _request_starts(imp)
    train_req = np.flatnonzero(part[first] == TRAIN)
    keep = train_req[_sample_per_user(i_user[first[train_req]], cap, np.random.default_rng(seed))]
    kept = np.zeros(len(first), dtype=bool)
    kept[keep] = True
    req_of_row = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(i_ts))))
    return np.where((part == TRAIN) & ~kept[req_of_row], np.int8(-1), part).astype(np.int8)


def _request_starts(imp: pa.Table) -> np.ndarray:
    """Row of each request's first impression: runs of one (user, ts, request_id)."""
    i_user = np.asarray(imp.column("user_id").to_numpy(), dtype=np.int64)
    i_ts = np.asarray(imp.column("ts").to_numpy(), dtype=np.int64)
    i_req = np.asarray(imp.column("request_id").to_numpy(), dtype=np.int64)
    new_req = np.ones(len(i_ts), dtype=bool)
    new_req[1:] = (i_req[1:] != i_req[:-1]) | (i_user[1:] != i_user[:-1]) | (i_ts[1:] != i_ts[:-1])
    return np.flatnonzero(new_req)


@dataclass(eq=False)
class _Transforms:
    """Everything fitted on the training part of all blocks."""

    item: Vocabulary
    token: Vocabulary
    enc: UserEncoder
    rank: _RankingVocabs | None
    t_min: int
    t_max: int

    def vocabs(self) -> dict[str, Vocabulary]:
        out = {"item": self.item, "token": self.token, "region": self.enc.region}
        out["device"] = self.enc.device
        if self.enc.gender is not None:
            out["gender"] = self.enc.gender
        if self.rank is not None:
            for v in (self.rank.item, self.rank.channel, self.rank.topic, self.rank.source):
                if v is not None:
                    out[v.name] = v
        return out


def _fit_transforms(acc: _Counts, users: _Users, cfg: FeaturesConfig, ranking: bool) -> _Transforms:
    if acc.t_min is None or acc.t_max is None:
        raise DataError("the training part of the split has no watches")
    rank = None
    if ranking:

        def opt(name: str, kind: str, min_count: int) -> Vocabulary | None:
            if name not in acc.keys:
                return None
            return acc.vocab(name, max_size=None, min_count=min_count, kind=kind)

        rank = _RankingVocabs(
            item=acc.vocab(
                "rank_item", max_size=cfg.max_rank_items, min_count=cfg.min_count, kind="int"
            ),
            channel=opt("channel", "int", cfg.min_count),
            topic=opt("topic", "str", cfg.min_count),
            source=opt("source", "str", 1),
        )
    train_users = np.concatenate(acc.train_users) if acc.train_users else np.zeros(0, np.int64)
    return _Transforms(
        item=acc.vocab("item", max_size=cfg.max_items, min_count=cfg.min_count, kind="int"),
        token=acc.vocab("token", max_size=cfg.max_tokens, min_count=cfg.min_count, kind="str"),
        enc=_fit_user_encoder(users, np.sort(train_users), cfg),
        rank=rank,
        t_min=acc.t_min,
        t_max=acc.t_max,
    )


def _load_transforms(work: Path, fit: dict[str, Any], users: _Users) -> _Transforms:
    tdir = work / "transforms"

    def v(name: str) -> Vocabulary | None:
        return Vocabulary.load(tdir / f"{name}.parquet") if name in fit["vocabs"] else None

    def must(name: str) -> Vocabulary:
        out = v(name)
        assert out is not None
        return out

    enc = UserEncoder(
        region=must("region"),
        device=must("device"),
        gender=v("gender"),
        normalizer=QuantileNormalizer.load(tdir / "candidates_dense.json"),
        has_age=users.age is not None,
        has_logged_in=users.logged_in is not None,
    )
    rank = None
    if fit["ranking"]:
        rank = _RankingVocabs(
            item=must("rank_item"), channel=v("channel"), topic=v("topic"), source=v("source")
        )
    return _Transforms(
        item=must("item"),
        token=must("token"),
        enc=enc,
        rank=rank,
        t_min=int(fit["t_min"]),
        t_max=int(fit["t_max"]),
    )
