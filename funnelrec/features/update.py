"""A features update: the features of a dataset that grew by a period, built so that a
model trained on the previous features can continue from where it was.

    build_features(DATA, NEW_FEAT, update=FeaturesUpdate(OLD_FEAT))

What differs from a fresh build (`build.py`):

- Vocabularies are the previous ones extended (`Vocabulary.extend`): every old id keeps
  its value, values new in the training part are appended after them, subject to
  `min_count` and to the size cap applied to the new values only (`max_items` new items at
  most, and so on). Gender stays as it was: it is a one-hot dense block, and a new value
  would widen the candidate model's input. A fresh build stays the way to re-truncate.
  The item content's vocabularies are extended the same way, and its table rebuilt over
  the grown catalogue (`content.py`).
- Embedding widths are pinned to the previous features' (the log-cardinality rule would
  widen a table that grew past a threshold), through `FeaturesConfig.dims`.
- Quantile normalisers are kept unless `refit_normalizers`: a kept map keeps the dense
  inputs the model learnt on meaning the same. Either way the manifest reports how far
  the new training data has drifted from the previous maps (`normalizer_drift`).
- Training examples are those of the new period (from `since`, by default the start of
  the dataset's last period) plus a seeded `replay` share of the older ones, so a warm
  start trains on the news without forgetting the rest. Held-out examples are as in a
  fresh build. Example age is measured to the end of the training window, which now ends
  with the new period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from funnelrec.data.dataset import Dataset
from funnelrec.errors import DataError, FunnelrecError
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.vocab import Vocabulary

if TYPE_CHECKING:
    from funnelrec.features.config import FeaturesConfig
    from funnelrec.features.fit import _Counts, _Transforms
    from funnelrec.features.reader import Features
    from funnelrec.features.tables import _Users

# Vocabularies an update keeps as they were (see the module docstring).
FROZEN_VOCABS = ("gender",)
# Probabilities at which `normalizer_drift` reports where the new values fall on the old map.
DRIFT_PROBS = (0.1, 0.5, 0.9)


@dataclass
class FeaturesUpdate:
    """How to update the features at `base` for the grown dataset.

    base:              the previous features directory (its vocabularies are extended)
    refit_normalizers: refit the quantile normalisers on the new training data (False:
                       keep the previous ones; the drift is reported either way)
    since:             training examples at or after this ts are the new period's; None:
                       the start of the dataset's last period (`extra.periods`), or every
                       example when the dataset has a single period
    replay:            share of the older training examples kept, sampled with the
                       features' seed (candidate examples one by one, ranking ones by whole
                       request); 1.0 keeps them all
    """

    base: Path | str
    refit_normalizers: bool = False
    since: int | None = None
    replay: float = 0.1
    report: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay <= 1.0:
            raise FunnelrecError(f"features update: replay must be in [0, 1], got {self.replay}")

    def open_base(self) -> Features:
        from funnelrec.features.reader import Features

        return Features.open(self.base)

    def resolve_since(self, ds: Dataset) -> int | None:
        """`since`, or the start of the dataset's last period when it has several."""
        if self.since is not None:
            return int(self.since)
        periods = ds.manifest.extra.get("periods") or []
        if len(periods) < 2:
            return None
        start = (periods[-1].get("time_range") or {}).get("min_ts")
        return None if start is None else int(start)


def pinned_config(cfg: FeaturesConfig, base: Features) -> FeaturesConfig:
    """`cfg` with every previous vocabulary's embedding width pinned (`dims`)."""
    from dataclasses import replace

    dims = cfg.dim_overrides()
    for name, entry in base.manifest["vocabularies"].items():
        dims[name] = int(entry["dim"])
    return replace(cfg, dims=",".join(f"{k}={v}" for k, v in sorted(dims.items())))


def extend_transforms(
    tf: _Transforms,
    acc: _Counts,
    users: _Users,
    cfg: FeaturesConfig,
    update: FeaturesUpdate,
    base: Features,
) -> _Transforms:
    """The freshly fitted `tf` with the previous vocabularies extended in place of its own
    and, unless refitting, the previous candidate normaliser. Records the growth and the
    candidate normaliser's drift in `update.report`."""
    old_vocabs = base.manifest["vocabularies"]

    def seen(name: str, kind: str) -> Vocabulary:
        return acc.vocab(name, max_size=None, min_count=1, kind=kind)

    def grow(name: str, fresh: Vocabulary, counts: Vocabulary, max_new: int | None) -> Vocabulary:
        if name not in old_vocabs:
            return fresh
        old = base.vocab(name)
        if name in FROZEN_VOCABS:
            return old
        min_count = 1 if name == "source" else cfg.min_count
        return old.extend(counts, max_new=max_new, min_count=min_count)

    tf.item = grow("item", tf.item, seen("item", "int"), cfg.max_items)
    tf.token = grow("token", tf.token, seen("token", "str"), cfg.max_tokens)
    train_users = (
        np.sort(np.concatenate(acc.train_users)) if acc.train_users else np.zeros(0, np.int64)
    )
    enc = tf.enc
    for name in ("region", "device"):
        column = getattr(users, name)
        fresh = getattr(enc, name)
        counts = fresh
        if column is not None:
            counts = Vocabulary.fit(name, column.take(pa.array(train_users)))
        setattr(enc, name, grow(name, fresh, counts, None))
    if enc.gender is not None and "gender" in old_vocabs:
        enc.gender = base.vocab("gender")
    if tf.rank is not None:
        rv = tf.rank
        rv.item = grow("rank_item", rv.item, seen("rank_item", "int"), cfg.max_rank_items)
        for attr, kind in (("channel", "int"), ("topic", "str"), ("source", "str")):
            fresh = getattr(rv, attr)
            if fresh is not None:
                setattr(rv, attr, grow(fresh.name, fresh, seen(fresh.name, kind), None))
    old_norm = base.normalizer("candidates")
    if users.age is not None and "age" in old_norm.input_columns:
        ages = np.asarray(users.age, dtype=np.float64)[train_users]
        update.report.setdefault("drift", {})["candidates"] = normalizer_drift(
            old_norm, {"age": ages}
        )
    if not update.refit_normalizers:
        enc.normalizer = old_norm
    update.report["vocab_growth"] = {
        name: {"old": int(old_vocabs[name]["size"]), "new": len(v)}
        for name, v in tf.vocabs().items()
        if name in old_vocabs
    }
    grown = tf.vocabs()
    for name in old_vocabs:
        if name in grown and not grown[name].extends(base.vocab(name)):
            raise DataError(f"features update: vocabulary '{name}' does not extend the old one")
    return tf


def ranking_normalizer(
    fresh: QuantileNormalizer, data: dict[str, np.ndarray], update: FeaturesUpdate, base: Features
) -> QuantileNormalizer:
    """The ranking normaliser of an update (the previous one unless refitting), with the
    drift of the previous one from the new training `data` recorded."""
    if not base.has_ranking:
        return fresh
    old = base.normalizer("ranking")
    present = {k: v for k, v in data.items() if k in old.input_columns}
    update.report.setdefault("drift", {})["ranking"] = normalizer_drift(old, present)
    if update.refit_normalizers or set(old.input_columns) - set(data):
        return fresh
    return old


def normalizer_drift(
    old: QuantileNormalizer, data: dict[str, np.ndarray]
) -> dict[str, dict[str, float | int]]:
    """How far each column of newer `data` has moved from the map `old` was fitted with.

    On the data a map was fitted on, its outputs are uniform over [0, n / (n + 1)); so per
    column: `ks`, the Kolmogorov-Smirnov distance of the new values' outputs from that
    uniform law (0: no drift, 1: every value beyond the old range), the outputs at the new
    values' 10th, 50th and 90th percentiles (`p10`, `p50`, `p90`; no drift: about 0.1,
    0.5, 0.9), the share clamped at either end of the old range, and the missing rate.
    """
    out: dict[str, dict[str, float | int]] = {}
    for name, values in data.items():
        col = old.column(name)
        v = np.asarray(values, dtype=np.float64)
        present = v[~np.isnan(v)]
        row: dict[str, float | int] = {
            "values": int(v.size),
            "missing": float(np.isnan(v).mean()) if v.size else float("nan"),
        }
        if present.size == 0 or col.knots.size == 0:
            out[name] = {**row, "ks": float("nan")}
            continue
        top = old.n_quantiles / (old.n_quantiles + 1)
        x = np.sort(col(present)) / top  # about uniform on [0, 1) without drift
        n = x.size
        upper = np.arange(1, n + 1) / n - x
        lower = x - np.arange(n) / n
        row["ks"] = float(max(upper.max(), lower.max(), 0.0))
        for p, q in zip(DRIFT_PROBS, np.quantile(x * top, DRIFT_PROBS), strict=True):
            row[f"p{round(p * 100)}"] = float(q)
        row["below_range"] = float((present < col.knots[0]).mean())
        row["above_range"] = float((present > col.knots[-1]).mean())
        out[name] = row
    return out


def replay_keep(
    ts: np.ndarray, since: int | None, replay: float, rng: np.random.Generator
) -> np.ndarray:
    """[n] bool: the examples at `ts` a training part keeps (all when `since` is None)."""
    if since is None:
        return np.ones(len(ts), dtype=bool)
    old = ts < since
    return ~old | (rng.random(len(ts)) < replay)
