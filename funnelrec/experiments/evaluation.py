"""Held-out retrieval ranks for experiments: per example, so metrics split by any group.

`metrics.evaluate_split` gives means over a split; experiments also need metrics by user
group, bootstrap intervals and recall curves, so this keeps each example's exact rank:

    sample = ExampleSample.draw(feats, "test", n=4000, seed=0)   # the same for all models
    ranks = example_ranks({"model": ModelScorer(m)}, feats, sample)
    summary(ranks["model"])             # recall@K, ndcg@K, map@K, mrr (metrics.py's rules)

Ranks are computed exactly as `metrics.evaluate_split` does: every item of the training
vocabulary is scored, the items the user watched before the target are excluded (never
the target), ties are broken by a fixed random permutation, out-of-vocabulary targets rank
at infinity (a miss). `BaselineScorer` puts the models of `baselines` behind the same
`metrics.Scorer` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
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
) -> ExampleRanks:
    """Exact target rank of every sampled example for every scorer (seen excluded)."""
    n1 = len(feats.vocab("item"))
    keys = tie_keys(n1, seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    users, ts, labels = [], [], []
    for batch, seen, seen_off in batches if batches is not None else sample_batches(feats, sample):
        target = batch.label.reshape(-1, 1)
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


def paired_diff_ci(
    a: np.ndarray, b: np.ndarray, *, draws: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a - b over the same examples and its percentile bootstrap interval
    (examples resampled in pairs, so what both models share cancels out)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise FunnelrecError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    lo, hi = bootstrap_ci(a - b, draws=draws, seed=seed, level=level)
    return float((a - b).mean()) if a.size else float("nan"), lo, hi


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
