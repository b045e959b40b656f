"""Transforms fitted on the training users: demographics -> region and device ids and
the candidate model's dense columns (`UserEncoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.features.config import FeaturesConfig
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.tables import _Users
from funnelrec.features.vocab import Vocabulary


@dataclass(eq=False)
class UserEncoder:
    """Demographics -> (region ids, device ids, dense [B, F]) with fitted transforms."""

    region: Vocabulary
    device: Vocabulary
    gender: Vocabulary | None
    normalizer: QuantileNormalizer  # age (no powers); may have no columns
    has_age: bool
    has_logged_in: bool

    @property
    def dense_columns(self) -> list[str]:
        cols: list[str] = []
        if self.has_age:
            cols += self.normalizer.output_columns
        if self.has_logged_in:
            cols += ["logged_in", "logged_in_missing"]
        if self.gender is not None:
            cols += [f"gender={v}" for v in self.gender.values] + ["gender_missing"]
        return cols

    def encode(
        self,
        *,
        age: np.ndarray | None,
        logged_in: np.ndarray | None,
        gender: pa.Array | None,
        region: pa.Array | None,
        device: pa.Array | None,
        n: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n] region ids, [n] device ids, [n, F] float32 dense."""
        parts = []
        if self.has_age:
            a = age if age is not None else np.full(n, np.nan)
            parts.append(self.normalizer.transform({"age": a}))
        if self.has_logged_in:
            li = logged_in if logged_in is not None else np.full(n, np.nan)
            miss = np.isnan(li)
            parts.append(np.stack([np.where(miss, 0.0, li), miss], axis=1).astype(np.float32))
        if self.gender is not None:
            g = gender if gender is not None else pa.nulls(n, pa.string())
            gid = self.gender.lookup(g)
            onehot = np.zeros((n, len(self.gender)), dtype=np.float32)
            onehot[np.arange(n), gid] = 1.0
            missing = np.asarray(pc.is_null(g).to_numpy(zero_copy_only=False), dtype=np.float32)
            # Column 0 of the one-hot is "gender not in vocabulary": it is not emitted.
            parts.append(np.concatenate([onehot[:, 1:], missing[:, None]], axis=1))
        dense = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)
        r = self.region.lookup(region) if region is not None else np.zeros(n, np.int32)
        d = self.device.lookup(device) if device is not None else np.zeros(n, np.int32)
        return r, d, dense.astype(np.float32)


def _fit_user_encoder(users: _Users, train_users: np.ndarray, cfg: FeaturesConfig) -> UserEncoder:
    def col(a: pa.Array | None) -> pa.Array:
        return a.take(pa.array(train_users)) if a is not None else pa.nulls(0, pa.string())

    region = Vocabulary.fit("region", col(users.region), min_count=cfg.min_count)
    device = Vocabulary.fit("device", col(users.device), min_count=cfg.min_count)
    gender = (
        Vocabulary.fit("gender", col(users.gender), max_size=16, min_count=cfg.min_count)
        if users.gender is not None
        else None
    )
    ages = {"age": users.age[train_users]} if users.age is not None else {}
    normalizer = QuantileNormalizer.fit(
        ages,
        n_quantiles=cfg.n_quantiles,
        powers=False,
        nullable=("age",),
        max_values=cfg.quantile_sample,
        seed=cfg.seed,
    )
    return UserEncoder(
        region=region,
        device=device,
        gender=gender,
        normalizer=normalizer,
        has_age=users.age is not None,
        has_logged_in=users.logged_in is not None,
    )


def _encode_all_users(enc: UserEncoder, users: _Users) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return enc.encode(
        age=users.age,
        logged_in=users.logged_in,
        gender=users.gender,
        region=users.region,
        device=users.device,
        n=users.n + 1,
    )
