"""Held-out retrieval ranks for experiments: per example, so metrics split by any group.

`metrics.evaluate_split` gives means over a split; experiments also need metrics by user
group, bootstrap intervals and recall curves, so this keeps each example's exact rank:

    sample = ExampleSample.draw(feats, "test", n=4000, seed=0)   # the same for all models
    ranks = example_ranks({"model": ModelScorer(m)}, feats, sample)
    summary(ranks.ranks["model"])       # recall@K, ndcg@K, map@K, mrr (metrics.py's rules)
    paired_interval(hits_a, hits_b)     # [seeds, examples] each: the paired 95% interval

Ranks are computed exactly as `metrics.evaluate_split` does: every item of the training
vocabulary is scored, the items the user watched before the target are excluded (never
the target; `exclude_seen=False` keeps them), ties are broken by a fixed random
permutation, out-of-vocabulary targets rank at infinity (a miss). `BaselineScorer` puts
the models of `baselines` behind the same `metrics.Scorer` interface.

Intervals (`paired_interval`, `mean_interval`) resample the training seeds and the
examples together: every arm of an experiment is trained with the same seeds and scored
on the same examples, so seed s of one arm is paired with seed s of the other and example
i with example i, and a draw's difference carries both the spread over seeds and the
sampling of examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from funnelrec.baselines import Baseline, Jagged
from funnelrec.baselines.factorisation import _MatrixFactorisation
from funnelrec.candidates.metrics import (
    RetrievalMetrics,
    Scorer,
    exclusion_mask,
    target_ranks,
    tie_keys,
)
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features
from funnelrec.features.batch import CandidateBatch
from funnelrec.features.loader import candidate_loader, seen_items

KS = (10, 50, 100)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


@dataclass(frozen=True)
class ExampleSample:
    """Which held-out examples of a split are scored: positions in loader order [n]."""

    split: str
    positions: np.ndarray
    total: int

    @classmethod
    def draw(cls, feats: Features, split: str, n: int | None, seed: int = 0) -> ExampleSample:
        """A uniform random sample of n examples (None or n >= all: every example)."""
        total = feats.num_examples("candidates", split)
        if total == 0:
            raise FunnelrecError(f"{feats.path}: the {split} split has no candidate examples")
        if n is None or n >= total:
            pos = np.arange(total, dtype=np.int64)
        else:
            pos = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        return cls(split, pos.astype(np.int64), total)


@dataclass
class ExampleRanks:
    """ranks[name]: [n] float64 exact rank of each sampled example's target (inf = miss);
    user_id, ts, label [n]: the examples (label = item vocabulary id, 0 = OOV)."""

    ranks: dict[str, np.ndarray]
    user_id: np.ndarray
    ts: np.ndarray
    label: np.ndarray


def _select(batch: CandidateBatch, rows: Tensor) -> CandidateBatch:
    """The examples `rows` of a batch (jagged bags re-cut)."""

    def bag(ids: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        ends = torch.cat([offsets[1:], offsets.new_tensor([ids.shape[0]])])
        lengths = (ends - offsets)[rows]
        starts = offsets[rows]
        idx = torch.cat(
            [torch.arange(int(s), int(s) + int(n)) for s, n in zip(starts, lengths, strict=True)]
            or [torch.zeros(0, dtype=torch.int64)]
        )
        new_off = torch.cumsum(lengths, 0) - lengths
        return ids[idx], new_off

    hist, hist_off = bag(batch.history, batch.history_offsets)
    search, search_off = bag(batch.search, batch.search_offsets)
    return CandidateBatch(
        history=hist,
        history_offsets=hist_off,
        search=search,
        search_offsets=search_off,
        region=batch.region[rows],
        device=batch.device[rows],
        dense=batch.dense[rows],
        example_age=batch.example_age[rows],
        label=batch.label[rows],
        user_id=batch.user_id[rows],
        ts=batch.ts[rows],
    )


def sample_batches(
    feats: Features, sample: ExampleSample, batch_size: int = 1024
) -> list[tuple[CandidateBatch, Tensor, Tensor]]:
    """The sampled examples as batches, each with its seen items (flat ids, offsets)."""
    flat, offsets = seen_items(feats, sample.split)
    wanted = np.zeros(sample.total, dtype=bool)
    wanted[sample.positions] = True
    out: list[tuple[CandidateBatch, Tensor, Tensor]] = []
    start = 0
    for batch in candidate_loader(feats, sample.split, batch_size=batch_size):
        b = len(batch)
        local = np.flatnonzero(wanted[start : start + b])
        if local.size:
            rows = torch.from_numpy(local)
            sub = _select(batch, rows)
            pos = local + start
            lengths = offsets[pos + 1] - offsets[pos]
            idx = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in pos])
            seen = torch.from_numpy(flat[idx.astype(np.int64)])
            seen_off = torch.from_numpy((np.cumsum(lengths) - lengths).astype(np.int64))
            out.append((sub, seen, seen_off))
        start += b
    return out


def example_ranks(
    scorers: dict[str, Scorer],
    feats: Features,
    sample: ExampleSample,
    *,
    batches: list[tuple[CandidateBatch, Tensor, Tensor]] | None = None,
    seed: int = 0,
    exclude_seen: bool = True,
) -> ExampleRanks:
    """Exact target rank of every sampled example for every scorer; `exclude_seen`: the
    items watched before the target (never the target) are left out of the ranking."""
    n1 = len(feats.vocab("item"))
    keys = tie_keys(n1, seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    users, ts, labels = [], [], []
    for batch, seen, seen_off in batches if batches is not None else sample_batches(feats, sample):
        target = batch.label.reshape(-1, 1)
        if not exclude_seen:
            seen = seen[:0]
        exclude = exclusion_mask(seen, seen_off, n1)
        for name, scorer in scorers.items():
            s = scorer.scores(scorer.queries(batch)).float()
            if s.shape[1] != n1:
                raise FunnelrecError(f"scorer '{name}': {s.shape[1]} scores, vocabulary {n1}")
            parts[name].append(target_ranks(s, target, exclude, keys)[:, 0].numpy())
        users.append(batch.user_id.numpy())
        ts.append(batch.ts.numpy())
        labels.append(batch.label.numpy())
    return ExampleRanks(
        ranks={k: np.concatenate(v) for k, v in parts.items()},
        user_id=np.concatenate(users),
        ts=np.concatenate(ts),
        label=np.concatenate(labels),
    )


def summary(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """recall/hr/ndcg/map@K and mrr of one-target examples (`metrics.RetrievalMetrics`)."""
    acc = RetrievalMetrics(ks)
    r = torch.from_numpy(np.asarray(ranks, dtype=np.float64)).reshape(-1, 1)
    acc.update(r, torch.ones(r.shape[0]))
    return acc.compute()


def per_example(ranks: np.ndarray, metric: str) -> np.ndarray:
    """[n] each example's contribution to `metric` ("recall@K", "map@K", "ndcg@K", "mrr")."""
    r = np.asarray(ranks, dtype=np.float64)
    if metric == "mrr":
        return np.where(np.isfinite(r), 1.0 / r, 0.0)
    name, _, k_text = metric.partition("@")
    k = int(k_text)
    hit = r <= k
    if name in ("recall", "hr"):
        return hit.astype(np.float64)
    if name == "map":
        return np.where(hit, 1.0 / r, 0.0)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(np.where(hit, r, 1.0) + 1.0), 0.0)
    raise FunnelrecError(f"unknown metric '{metric}'")


def bootstrap_ci(
    values: np.ndarray, *, draws: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [n]."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(draws, v.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


@dataclass(frozen=True)
class Interval:
    """A statistic over seeds and examples with its percentile bootstrap interval.

    mean: the statistic on all seeds and examples; lo, hi: the interval at `level`;
    seeds, units: how many of each it was drawn from."""

    mean: float
    lo: float
    hi: float
    seeds: int
    units: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0

    def text(self, digits: int = 4, scale: float = 1.0) -> str:
        """'+0.0123 [+0.0045, +0.0201]' (values times `scale`)."""
        f = f"{{:+.{digits}f}}"
        return (
            f"{f.format(self.mean * scale)} "
            f"[{f.format(self.lo * scale)}, {f.format(self.hi * scale)}]"
        )

    def to_list(self) -> list[float]:
        return [self.mean, self.lo, self.hi]


BOOTSTRAP_DRAWS = 1000
_DRAW_CHUNK = 100  # draws whose unit weights are held at once ([chunk, units] floats)


def _per_seed(values: np.ndarray) -> np.ndarray:
    """[S, N] float64: per seed (rows), per unit (columns); a 1-D array is one seed."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] == 0:
        raise FunnelrecError(f"expected [seeds, units] values, got shape {v.shape}")
    return v


def bootstrap_draws(
    seeds: int, units: int, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The resampling of `paired_interval`, in chunks: (unit weights [d, units], how often
    each unit is drawn, and seed picks [d, seeds], indices drawn with replacement). With
    one seed there is nothing to resample over seeds: every pick is seed 0."""
    rng = np.random.default_rng(seed)
    for start in range(0, draws, _DRAW_CHUNK):
        d = min(_DRAW_CHUNK, draws - start)
        weights = rng.multinomial(units, np.full(units, 1.0 / units), size=d).astype(np.float64)
        picks = rng.integers(0, seeds, size=(d, seeds)) if seeds > 1 else np.zeros((d, 1), int)
        yield weights, picks


def _ratio_draws(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[d, S] sum of num / sum of den over each draw's units, per seed."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ num.T) / (weights @ den.T)


def paired_interval(
    a: np.ndarray,
    b: np.ndarray,
    *,
    den_a: np.ndarray | None = None,
    den_b: np.ndarray | None = None,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The difference stat(a) - stat(b) and its paired percentile bootstrap interval.

    a, b: [S, N] values per training seed and unit (example, user), the same seeds and
    units in both (1-D: one seed). stat: the mean over units, averaged over seeds; with
    den_a / den_b (same shapes) a ratio of sums per seed, sum(a) / sum(den_a), averaged
    over seeds (e.g. mispredicted over total watch time). Each draw resamples the units
    (the same ones for both arms and all seeds) and the seeds (the same picks for both
    arms), so what the two arms share cancels out and the spread over seeds stays in.
    """
    a, b = _per_seed(a), _per_seed(b)
    if a.shape != b.shape:
        raise FunnelrecError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    da = np.ones_like(a) if den_a is None else _per_seed(den_a)
    db = np.ones_like(b) if den_b is None else _per_seed(den_b)
    if da.shape != a.shape or db.shape != b.shape:
        raise FunnelrecError("paired_interval: a denominator differs in shape from its values")
    s, n = a.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = float(np.mean(a.sum(1) / da.sum(1)) - np.mean(b.sum(1) / db.sum(1)))
    out: list[np.ndarray] = []
    for weights, picks in bootstrap_draws(s, n, draws=draws, seed=seed):
        ra, rb = _ratio_draws(a, da, weights), _ratio_draws(b, db, weights)
        rows = np.arange(len(picks))[:, None]
        out.append(ra[rows, picks].mean(1) - rb[rows, picks].mean(1))
    diffs = np.concatenate(out)
    q = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(diffs, [q, 1.0 - q])
    return Interval(mean, float(lo), float(hi), s, n, level)


def mean_interval(
    values: np.ndarray, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95
) -> Interval:
    """The mean of `values` [S, N] (seeds x units) and its bootstrap interval, resampled
    as `paired_interval` does (an interval of one arm, not a comparison)."""
    v = _per_seed(values)
    return paired_interval(v, np.zeros_like(v), draws=draws, seed=seed, level=level)


def recall_curve(ranks: np.ndarray, ks: Sequence[int] = CURVE_KS) -> list[float]:
    """Recall@K for each K (one target per example)."""
    r = np.asarray(ranks, dtype=np.float64)
    return [float((r <= k).mean()) if r.size else float("nan") for k in ks]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


class BaselineScorer:
    """A `baselines` model as a `metrics.Scorer` over a features' item vocabulary.

    queries(batch) packs each example's user id and history (vocabulary ids) into one row
    [B, 1 + L] (0-padded); scores() maps the history to dataset ids, scores every dataset
    item with the model and re-indexes the columns to vocabulary ids 1..N (column 0 and
    items the model cannot score: -inf). Matrix factorisation models use the learned vector
    of the example's user.
    """

    def __init__(self, model: Baseline, item_values: np.ndarray) -> None:
        self.model = model
        # vocabulary id v (1..N) is dataset item item_values[v - 1]
        self.item_values = np.asarray(item_values, dtype=np.int64)
        if self.item_values.size and int(self.item_values.max()) > model.num_items:
            raise FunnelrecError(
                f"{type(model).__name__} was fitted for {model.num_items} items, the "
                f"vocabulary names item {int(self.item_values.max())}"
            )

    def queries(self, batch: CandidateBatch) -> Tensor:
        b = len(batch)
        ends = torch.cat([batch.history_offsets[1:], torch.tensor([batch.history.shape[0]])])
        lengths = ends - batch.history_offsets
        width = int(lengths.max()) if b else 0
        out = torch.zeros(b, 1 + width, dtype=torch.int64)
        out[:, 0] = batch.user_id
        for r in range(b):
            lo, n = int(batch.history_offsets[r]), int(lengths[r])
            out[r, 1 : 1 + n] = batch.history[lo : lo + n]
        return out

    def scores(self, queries: Tensor) -> Tensor:
        q = queries.numpy()
        users = q[:, 0]
        hist = q[:, 1:]
        rows = [self.item_values[h[h > 0] - 1] for h in hist]
        kwargs = {"users": users} if isinstance(self.model, _MatrixFactorisation) else {}
        s = self.model.score(Jagged.from_rows(rows), **kwargs)  # [b, num_items + 1]
        out = np.full((q.shape[0], self.item_values.size + 1), -np.inf, dtype=np.float32)
        out[:, 1:] = s[:, self.item_values]
        return torch.from_numpy(out)
