"""`Baseline`: the interface every model of `funnelrec.baselines` offers (fit, score,
top_k, save, load), and the directory format it saves to (`baseline.json` + NPY arrays)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike

from funnelrec import __version__
from funnelrec.baselines.data import Histories, Interactions, _check_ids
from funnelrec.data.dataset import AtomicDirectory, write_json_atomic
from funnelrec.errors import ArtifactError, DataError, FunnelrecError

FORMAT_VERSION = 1
META = "baseline.json"


class Baseline:
    """What every model here offers; subclasses fill in `_fit`, `score` and the arrays."""

    kind: ClassVar[str]
    # top_k returns only items scoring above this (count models: no evidence = 0).
    min_candidate_score: ClassVar[float] = 0.0

    def __init__(self) -> None:
        self.num_items = 0
        self.fit_seconds = 0.0
        self._fitted = False

    # -- configuration, saved with the model
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        """An unfitted model of the configuration `config()` returned."""
        return cls(**config)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise FunnelrecError(f"{type(self).__name__} is not fitted (call fit first)")

    def _n(self, train: Interactions, num_items: int | None) -> int:
        top = int(train.item.max())
        if num_items is not None and num_items < top:
            raise DataError(
                f"item id {top} in training data is above num_items={num_items}",
                path="training interactions",
                column="item_id",
            )
        return int(num_items) if num_items is not None else top

    def score(self, histories: Histories, **kwargs: Any) -> np.ndarray:
        """[B, N + 1] float32 scores of every item for each history; column 0 is -inf."""
        raise NotImplementedError

    def top_k(
        self,
        history: ArrayLike,
        k: int,
        exclude: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best k items for one history: (item ids [<= k] int64, scores float32),
        best first, ties by smaller id; excluded ids and items without evidence (score not
        above `min_candidate_score`) are left out, so fewer than k may come back."""
        self._check_fitted()
        if k < 1:
            raise FunnelrecError(f"k must be at least 1, got {k}")
        s = self.score([np.asarray(history, dtype=np.int64).reshape(-1)], **kwargs)[0]
        return _top_of(s, k, exclude, self.min_candidate_score, self.num_items)

    # -- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        return {}

    def save(self, path: Path | str, *, force: bool = False) -> Path:
        """Write the model to directory `path` atomically (temporary name, then rename)."""
        self._check_fitted()
        d = AtomicDirectory(Path(path), force=force)
        try:
            names = {}
            for name, arr in self._arrays().items():
                np.save(d.tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
                names[name] = f"{name}.npy"
            meta = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "created_by": f"funnelrec {__version__}",
                "config": self.config(),
                "num_items": self.num_items,
                "fit_seconds": self.fit_seconds,
                "arrays": names,
                **self._meta(),
            }
            write_json_atomic(d.tmp / META, meta)
            return d.commit()
        except BaseException:
            d.abort()
            raise

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Read a model saved by `save`; the directory must hold this class's kind."""
        # the package imports every kind to map names to classes, and every kind imports this
        from funnelrec.baselines import load_baseline

        model = load_baseline(path)
        if not isinstance(model, cls):
            raise ArtifactError(f"{path}: holds a '{model.kind}' model, not '{cls.kind}'")
        return model


def _top_of(
    s: np.ndarray, k: int, exclude: ArrayLike | None, floor: float, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    s = s.copy()
    s[0] = -np.inf
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
        _check_ids(ex, num_items, "exclude")
        s[ex] = -np.inf
    ok = np.flatnonzero(s > floor)
    ids, scores = top_k_by_score(ok, s[ok], k)
    return ids.astype(np.int64), scores.astype(np.float32)


def top_k_by_score(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of `ids` [n] by `scores` [n], best first, ties by smaller id: the first
    k of a full sort, in time linear in n (the k rows chosen alone are sorted)."""
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)
        # Many rows can share the k-th score (fresh items all at their full boost): the
        # smallest ids among them, found by partition, so that they are not all sorted.
        need = k - len(above)  # at least 1: the k-th row itself is tied
        if len(tied) > need:
            tied = tied[np.argpartition(ids[tied], need - 1)[:need]]
        top = np.concatenate([above, tied])
        ids, scores = ids[top], scores[top]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """[n] bool: which of `values` are in `sorted_set` (sorted ascending): `np.isin` by
    binary search, cheaper for the few hundred ids of a request."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return np.asarray(sorted_set[at] == values)


def _with_padding_column(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    scores[:, 0] = -np.inf
    return scores
