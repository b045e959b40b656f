"""Matrix factorisation through the `implicit` library's CPU models: `BPR` and `ALS`
(which alone can fold in a history without a training user id)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from funnelrec.baselines.base import Baseline, _with_padding_column
from funnelrec.baselines.data import (
    Histories,
    Interactions,
    Jagged,
    _binary_user_items,
    _check_ids,
    _history_matrix,
)
from funnelrec.errors import ArtifactError, FunnelrecError


@dataclass(frozen=True)
class MFConfig:
    """factors: latent dimension. iterations, regularization, learning_rate (BPR only),
    alpha (ALS only: confidence of an observed item, implicit's alpha), threads (0 = all
    cores; BPR is only reproducible with 1), seed: implicit's random_state."""

    factors: int = 64
    iterations: int = 100
    regularization: float = 0.01
    learning_rate: float = 0.01
    alpha: float = 1.0
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 1 or self.threads < 0:
            raise FunnelrecError("matrix factorisation: factors, iterations >= 1; threads >= 0")


class _MatrixFactorisation(Baseline):
    """Scores are dot products of a user vector with each item vector (item 0: -inf).

    Users seen in training can be scored by their learned vectors (`users=`); a history
    without a user id needs a fold-in, which only ALS has (`_fold_in`)."""

    min_candidate_score = -math.inf

    def __init__(self, cfg: MFConfig | None = None) -> None:
        super().__init__()
        cfg = self.cfg = cfg or MFConfig()
        self.item_factors = np.zeros((1, cfg.factors), dtype=np.float32)  # [N + 1, f]
        self.user_factors = np.zeros((0, cfg.factors), dtype=np.float32)  # [U, f]
        self.user_ids = np.zeros(0, dtype=np.int64)  # [U] sorted dataset ids

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        model = cls()
        model.cfg = MFConfig(**config)
        return model

    def _model(self) -> Any:
        raise NotImplementedError

    def fit(
        self,
        train: pa.Table | Mapping[str, ArrayLike] | Interactions,
        num_items: int | None = None,
    ) -> Self:
        from threadpoolctl import threadpool_limits

        started = time.perf_counter()
        data = Interactions.of(train, need_ts=False)
        n = self._n(data, num_items)
        # implicit sees items 1..N as columns 0..N-1: padding must not be a sampled negative
        x = _binary_user_items(data, n)[:, 1:].tocsr()
        # implicit's own threads do the work; a multi-threaded BLAS underneath only fights
        # them. Import first: it loads scipy's BLAS, which the limit must find loaded.
        import implicit.cpu.als
        import implicit.cpu.bpr  # noqa: F401

        with threadpool_limits(1, "blas"):
            model = self._model()
            model.fit(x, show_progress=False)
        items = np.asarray(model.item_factors, dtype=np.float32)
        users = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])
        self.user_factors = users
        self.user_ids = np.unique(data.user)
        self.num_items = n
        self.fit_seconds = time.perf_counter() - started
        self._fitted = True
        return self

    def _fold_in(self, h: Jagged) -> np.ndarray:
        raise FunnelrecError(
            f"{type(self).__name__} cannot score a history without a training user id (pass users=)"
        )

    def user_vectors(self, histories: Histories, users: ArrayLike | None = None) -> np.ndarray:
        """[B, f'] user vectors: learned ones for `users` (dataset ids) seen in training,
        a fold-in of the history for the others (ALS only)."""
        self._check_fitted()
        h = Jagged.of(histories)
        _check_ids(h.values, self.num_items, "history")
        if users is None:
            return self._fold_in(h)
        u = np.asarray(users, dtype=np.int64).reshape(-1)
        if u.size != len(h):
            raise FunnelrecError(f"{u.size} users for {len(h)} histories")
        pos = np.zeros(u.size, dtype=np.int64)
        known = np.zeros(u.size, dtype=bool)
        if self.user_ids.size:
            pos = np.minimum(np.searchsorted(self.user_ids, u), self.user_ids.size - 1)
            known = self.user_ids[pos] == u
        out = np.zeros((u.size, self.user_factors.shape[1]), dtype=np.float32)
        out[known] = self.user_factors[pos[known]]
        if not known.all():
            idx = np.flatnonzero(~known)
            lo, hi = h.offsets[idx], h.offsets[idx + 1]
            sub = Jagged.from_rows([h.values[a:b] for a, b in zip(lo, hi, strict=True)])
            out[idx] = self._fold_in(sub)
        return out

    def score(
        self, histories: Histories, *, users: ArrayLike | None = None, **_: Any
    ) -> np.ndarray:
        """[B, N + 1] dot-product scores; `users`: [B] dataset user ids (see user_vectors)."""
        vec = self.user_vectors(histories, users)
        return _with_padding_column(vec @ self.item_factors.T)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "item_factors": self.item_factors,
            "user_factors": self.user_factors,
            "user_ids": self.user_ids,
        }

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        items, users, ids = arrays["item_factors"], arrays["user_factors"], arrays["user_ids"]
        if (
            items.ndim != 2
            or items.shape[0] != self.num_items + 1
            or users.ndim != 2
            or users.shape[1] != items.shape[1]
            or ids.shape != (users.shape[0],)
        ):
            raise ArtifactError(f"{self.kind}: factor arrays of inconsistent shapes")
        self.item_factors = items.astype(np.float32)
        self.user_factors = users.astype(np.float32)
        self.user_ids = ids.astype(np.int64)


def _threads(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


class BPR(_MatrixFactorisation):
    """Bayesian Personalised Ranking (implicit.cpu.bpr); no fold-in for new histories."""

    kind = "bpr"

    def __init__(
        self,
        factors: int = 64,
        *,
        iterations: int = 100,
        regularization: float = 0.01,
        learning_rate: float = 0.01,
        threads: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            MFConfig(
                factors=factors,
                iterations=iterations,
                regularization=regularization,
                learning_rate=learning_rate,
                threads=threads,
                seed=seed,
            )
        )

    def _model(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.cfg
        return BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            num_threads=_threads(c.threads),
            random_state=c.seed,
        )


class ALS(_MatrixFactorisation):
    """Implicit-feedback ALS (implicit.cpu.als, Hu, Koren & Volinsky 2008).

    Fold-in of a history (users not given, or unseen): the exact least-squares user step
    with the item factors Y fixed, as implicit's `recalculate_user` does, with confidence
    c = alpha for each distinct history item:
        x_u = (Y'Y + (c - 1) Y_S'Y_S + regularization I)^-1  c Y_S' 1
    """

    kind = "als"

    def __init__(
        self,
        factors: int = 64,
        *,
        iterations: int = 15,
        regularization: float = 0.01,
        alpha: float = 1.0,
        threads: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            MFConfig(
                factors=factors,
                iterations=iterations,
                regularization=regularization,
                alpha=alpha,
                threads=threads,
                seed=seed,
            )
        )

    def _model(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.cfg
        return AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            num_threads=_threads(c.threads),
            random_state=c.seed,
        )

    def _fold_in(self, h: Jagged) -> np.ndarray:
        y = self.item_factors.astype(np.float64)  # [N + 1, f], row 0 all zero
        f = y.shape[1]
        m = _history_matrix(h, np.ones(h.values.size), self.num_items)
        m.data[:] = 1.0  # distinct items
        c = self.cfg.alpha
        base = y.T @ y + self.cfg.regularization * np.eye(f)
        b = c * np.asarray(m @ y)  # [B, f]
        a = np.broadcast_to(base, (len(h), f, f)).copy()
        if c != 1.0:
            for r in range(len(h)):
                ys = y[m.indices[m.indptr[r] : m.indptr[r + 1]]]
                a[r] += (c - 1.0) * ys.T @ ys
        return np.linalg.solve(a, b[..., None])[..., 0].astype(np.float32)
