"""Retrieval metrics by exact full-corpus scoring: Recall, HR, NDCG, MAP at K, and MRR.

Every query (a held-out example) is scored against every item of the vocabulary; from the
scores we take the exact rank of each target, and every metric follows from the ranks:

    rank(t) = 1 + #{j : s_j > s_t} + #{j : s_j == s_t and key_j < key_t}

over the items j still in the ranking. `key` is a fixed random permutation of the items
(seeded), so ties are broken at random but reproducibly, and the ranks of one query are a
strict order. Column 0 (padding / out of vocabulary) is never ranked; a target that is out
of vocabulary (id 0) cannot be retrieved and counts as a miss.

Exclusion of already-seen items: the items a user watched before the target are removed
from the ranking, except the target itself (a re-watch stays retrievable), the protocol
the peers' figures in benchmarks/README.md were measured with. Both variants are computed
from the same scores.

With R relevant items of a query and target ranks r_1 < r_2 < ... (one target per
query in next-watch evaluation, where HR@K = Recall@K and MAP@K = MRR cut at K):
    recall@K = #{r_i <= K} / R
    hr@K     = 1 if r_1 <= K else 0
    ndcg@K   = sum_{r_i <= K} 1 / log2(r_i + 1) / sum_{i <= min(R, K)} 1 / log2(i + 1)
    map@K    = sum_{r_i <= K} (i / r_i) / min(R, K)
    mrr      = 1 / r_1 (no cut-off)
each averaged over queries.

    scorers = {"model": ModelScorer(model), "popularity": PopularityScorer(counts)}
    report = evaluate_retrieval(scorers, batches, num_items=N, seen=history_seen)
    report.metrics["model"]["recall@10"], report.metrics["model_seen_included"]["recall@10"]

Approximate retrieval (an ANN index, `funnelrec.ann`) is scored by the same metrics from a ranked
list instead of full scores: a `Retriever` returns the top max(K) vocabulary ids of each
query, the seen items excluded in the search itself (as serving does), and a target's rank
is its place in that list, or inf (a miss) when it is not there. So every metric at K
compares directly with the exact one; only MRR is cut at max(K) (a target outside the
list adds 0, not 1 / its exact rank).

    retrievers = {"model_ann": IndexRetriever(ModelScorer(model), index, item_ids)}
    report = evaluate_retrieval(scorers, batches, num_items=N, retrievers=retrievers)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.progress import progress_bar

if TYPE_CHECKING:
    from funnelrec.ann.index import ItemIndex
    from funnelrec.features import Features

KS: tuple[int, ...] = (10, 50, 100, 200, 500)
SEEN_INCLUDED = "_seen_included"

# Scores of at most this many (query, item) pairs are held at once.
SCORE_BUDGET = 1 << 24


class Scorer(Protocol):
    """Scores every vocabulary id for a batch of queries."""

    def queries(self, batch: CandidateBatch) -> Tensor:
        """A batch -> whatever `scores` needs per query, [B, ...]."""
        ...

    def scores(self, queries: Tensor) -> Tensor:
        """[b, ...] queries -> [b, N + 1] scores over vocabulary ids (column 0 ignored)."""
        ...


class ModelScorer:
    """Dot products of the model's user vector with every output item embedding.

    model: anything with `forward(batch) -> u [B, d]` (serving mode, example age 0) and
    `item_embeddings() -> [N + 1, d]`, i.e. `candidates.CandidateModel`.
    time_range: (t_min, t_max) of the training window: feed each query the example age of
    its target's time, (t_max - ts) / (t_max - t_min) clamped to >= 0, through
    `model.user_vector(batch, age)`, instead of serving's 0. For held-out targets spread
    over the window (leave-last-out), 0 asks for the end of the window's popularity.
    """

    def __init__(
        self,
        model: nn.Module,
        time_range: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device)
        self.time_range = time_range
        self._items: Tensor | None = None

    def queries(self, batch: CandidateBatch) -> Tensor:
        """User vectors [B, d] on the CPU (the batch runs through the model's device)."""
        batch = batch.to(self.device)
        with torch.no_grad():
            if self.time_range is None:
                u: Tensor = self.model(batch)
            else:
                t_min, t_max = self.time_range
                age = (t_max - batch.ts).double() / max(t_max - t_min, 1)
                u = self.model.user_vector(batch, age.clamp(min=0).float())  # type: ignore[operator]
                u = self.model.query(u)  # type: ignore[operator]
        return u.cpu()

    def scores(self, queries: Tensor) -> Tensor:
        """[B, N + 1] dot products, computed on the model's device, returned on the CPU."""
        return (queries.to(self.device) @ self._item_table().T).cpu()

    def num_items(self) -> int:
        """N, the vocabulary items scored."""
        return int(self._item_table().shape[0]) - 1

    def _item_table(self) -> Tensor:
        if self._items is None:
            with torch.no_grad():
                self._items = self.model.item_embeddings().detach()  # type: ignore[operator]
        items: Tensor = self._items
        return items


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class PopularityScorer:
    """The same ranking for everyone: items by training frequency (counts [N + 1])."""

    def __init__(self, counts: Tensor | np.ndarray) -> None:
        if isinstance(counts, Tensor):
            self.counts = counts.detach().to(torch.float32).clone()
        else:
            self.counts = torch.from_numpy(np.array(counts, dtype=np.float32))

    def queries(self, batch: CandidateBatch) -> Tensor:
        return torch.zeros(len(batch), 0)

    def scores(self, queries: Tensor) -> Tensor:
        return self.counts.expand(queries.shape[0], -1)


class Retriever(Protocol):
    """Retrieves a ranked list of vocabulary ids per query (e.g. from an ANN index)."""

    def queries(self, batch: CandidateBatch) -> Tensor:
        """A batch -> whatever `retrieve` needs per query, [B, ...]."""
        ...

    def retrieve(self, queries: Tensor, k: int, exclude: list[np.ndarray] | None) -> Tensor:
        """[b, ...] queries -> [b, k] int64 vocabulary ids, best first (0 past the end).

        exclude: per query, vocabulary ids never to return (None: nothing excluded).
        """
        ...


class IndexRetriever:
    """The top k of an ANN index (`ann.ItemIndex`) over the model's item embeddings.

    scorer: gives the user vectors (the model's, as in `ModelScorer.queries`).
    item_ids: the artifact's export (`candidates.load_item_embeddings`), whose first N
    are the dataset item ids of vocabulary ids 1..N: the index returns dataset ids,
    metrics use vocabulary ids. The items an item-content model exports after those (the
    catalogue outside the vocabulary) are retrieved and take their places in the lists,
    as at serving, but no held-out target is one of them (its label is 0, a miss).
    """

    def __init__(self, scorer: ModelScorer, index: ItemIndex, item_ids: np.ndarray) -> None:
        self.scorer = scorer
        self.index = index
        self.item_ids = np.asarray(item_ids, dtype=np.int64)[: scorer.num_items()]
        self._order = np.argsort(self.item_ids, kind="stable")
        self._sorted = self.item_ids[self._order]

    def queries(self, batch: CandidateBatch) -> Tensor:
        return self.scorer.queries(batch)

    def retrieve(self, queries: Tensor, k: int, exclude: list[np.ndarray] | None) -> Tensor:
        q = queries.detach().cpu().numpy().astype(np.float32, copy=False)
        excl = None
        if exclude is not None:  # vocabulary ids -> dataset ids (0 = OOV: not in the index)
            excl = [self.item_ids[e[e > 0] - 1] for e in exclude]
        k_eff = min(k, self.index.count)
        ids, _ = self.index.search(q, k_eff, exclude=excl)
        ids = ids.reshape(len(q), k_eff)
        at = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        found = (ids >= 0) & (self._sorted[at] == ids)
        out = np.zeros((len(q), k), dtype=np.int64)
        out[:, :k_eff] = np.where(found, self._order[at] + 1, 0)
        return torch.from_numpy(out)


def list_ranks(lists: Tensor, targets: Tensor) -> Tensor:
    """1-based place of each target in its query's ranked list; inf when absent.

    lists: [Q, K] vocabulary ids (0 = empty place); targets: [Q, T] as in `target_ranks`.
    Returns [Q, T] float64 ranks.
    """
    out = torch.full(targets.shape, math.inf, dtype=torch.float64)
    for c in range(targets.shape[1]):
        t = targets[:, c : c + 1]
        match = (lists == t) & (t > 0)
        place = match.to(torch.int64).argmax(dim=1) + 1
        out[:, c] = torch.where(match.any(dim=1), place.to(torch.float64), math.inf)
    return out


def tie_keys(num_ids: int, seed: int = 0) -> Tensor:
    """[num_ids] a fixed random permutation: the tie-break order of items."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_ids, generator=g)


def target_ranks(
    scores: Tensor,
    targets: Tensor,
    exclude: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Exact 1-based rank of each target among all ranked ids.

    scores:  [Q, N + 1] scores over vocabulary ids (column 0 never ranked)
    targets: [Q, T] vocabulary ids; -1 = no target in this slot, 0 = out of vocabulary
    exclude: [Q, N + 1] bool, ids removed from the ranking (targets never are)
    keys:    [N + 1] tie-break order (default: by id)
    Returns [Q, T] float ranks; inf for out-of-vocabulary targets and empty slots.
    """
    q, n1 = scores.shape
    if keys is None:
        keys = torch.arange(n1, device=scores.device)
    valid = targets > 0
    safe = targets.clamp(min=0)
    body, body_keys = scores[:, 1:], keys[1:]  # column 0 is never ranked
    # Counted over every id, then corrected for the excluded ones: two passes over the
    # [Q, N] scores per target column instead of building a masked copy (the exclusions
    # are a few ids per query).
    ex_rows = ex_ids = None
    if exclude is not None:
        ex_rows, ex_ids = exclude[:, 1:].nonzero(as_tuple=True)
        ex_ids = ex_ids + 1
        # the row's targets stay in the ranking
        is_target = ((safe[ex_rows] == ex_ids[:, None]) & valid[ex_rows]).any(1)
        ex_rows, ex_ids = ex_rows[~is_target], ex_ids[~is_target]
    out = torch.full(targets.shape, math.inf, dtype=torch.float64, device=scores.device)
    for c in range(targets.shape[1]):
        t = safe[:, c : c + 1]  # [Q, 1]
        s_t, k_t = scores.gather(1, t), keys[t]  # [Q, 1] each
        above = _row_counts(body > s_t)
        # ties broken by key; only rows where another id equals the target's score pay
        # for the key comparison (the target itself is one of the equal ones)
        equal = _row_counts(body == s_t) - (t[:, 0] > 0).to(torch.int64)
        tied = torch.zeros_like(above)
        rows = (equal > 0).nonzero(as_tuple=True)[0]
        if rows.numel():
            eq = body[rows] == s_t[rows]
            tied[rows] = _row_counts(eq & (body_keys[None, :] < k_t[rows]))
        if ex_rows is not None and ex_ids is not None and ex_rows.numel():
            s_e, s_te = scores[ex_rows, ex_ids], s_t[ex_rows, 0]
            ahead = (s_e > s_te) | ((s_e == s_te) & (keys[ex_ids] < k_t[ex_rows, 0]))
            above -= torch.bincount(ex_rows[ahead], minlength=q)
        r = (1 + above + tied).to(torch.float64)
        out[:, c] = torch.where(valid[:, c], r, math.inf)
    return out


def _row_counts(mask: Tensor) -> Tensor:
    """[Q] int64 number of True per row of a [Q, N] bool mask (numpy's count on the CPU:
    torch's bool sum dominated evaluation over large corpora; docs/candidates.md,
    "Evaluation")."""
    if mask.device.type != "cpu":
        return mask.sum(1)
    return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1).astype(np.int64))


class RetrievalMetrics:
    """Accumulates per-query metrics from target ranks; `compute()` gives the means."""

    def __init__(self, ks: Sequence[int] = KS) -> None:
        if not ks or any(k < 1 for k in ks):
            raise FunnelrecError(f"metric cut-offs must be positive integers, got {list(ks)}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.sums: dict[str, float] = {name: 0.0 for name in self.names()}
        self.queries = 0

    def names(self) -> list[str]:
        out = [f"{m}@{k}" for m in ("recall", "hr", "ndcg", "map") for k in self.ks]
        return [*out, "mrr"]

    def update(self, ranks: Tensor, num_relevant: Tensor) -> None:
        """ranks: [Q, T] target ranks (inf = not retrievable / empty slot);
        num_relevant: [Q] relevant items per query (>= 1; counts unretrievable targets)."""
        if ranks.shape[0] == 0:
            return
        r = torch.sort(ranks.to(torch.float64), dim=1).values  # [Q, T], ascending
        n_rel = num_relevant.to(torch.float64)
        pos = torch.arange(1, r.shape[1] + 1, dtype=torch.float64)  # i of r_i
        for k in self.ks:
            hit = r <= k
            ideal_n = torch.clamp(n_rel, max=k)
            self.sums[f"recall@{k}"] += (hit.sum(1) / n_rel).sum().item()
            self.sums[f"hr@{k}"] += hit[:, 0].double().sum().item()
            gains = torch.where(hit, 1.0 / torch.log2(r + 1), 0.0).sum(1)
            ideal = _ideal_dcg(ideal_n)
            self.sums[f"ndcg@{k}"] += (gains / ideal).sum().item()
            prec = torch.where(hit, pos[None, :] / r, 0.0).sum(1)
            self.sums[f"map@{k}"] += (prec / ideal_n).sum().item()
        self.sums["mrr"] += torch.where(torch.isinf(r[:, 0]), 0.0, 1.0 / r[:, 0]).sum().item()
        self.queries += int(ranks.shape[0])

    def compute(self) -> dict[str, float]:
        if self.queries == 0:
            return {name: float("nan") for name in self.names()}
        return {name: v / self.queries for name, v in self.sums.items()}


def _ideal_dcg(n: Tensor) -> Tensor:
    """[Q] sum_{i=1..n} 1 / log2(i + 1) for each n (n >= 1)."""
    top = int(n.max().item())
    cum = torch.cumsum(1.0 / torch.log2(torch.arange(2, top + 2, dtype=torch.float64)), 0)
    return cum[n.long() - 1]


def exclusion_mask(ids: Tensor, offsets: Tensor, num_ids: int) -> Tensor:
    """Jagged item ids per query (flat [M], offsets [Q]) -> [Q, num_ids] bool mask."""
    q = offsets.shape[0]
    mask = torch.zeros(q, num_ids, dtype=torch.bool)
    if ids.numel():
        lengths = torch.diff(offsets, append=torch.tensor([ids.shape[0]]))
        rows = torch.repeat_interleave(torch.arange(q), lengths)
        mask[rows, ids.clamp(0, num_ids - 1)] = True
    return mask


SeenProvider = Callable[[CandidateBatch], tuple[Tensor, Tensor]]


def history_seen(batch: CandidateBatch) -> tuple[Tensor, Tensor]:
    """The seen items of a batch as its own history bag (the last N watches only)."""
    return batch.history, batch.history_offsets


def _rows(ids: Tensor, offsets: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Rows lo..hi-1 of a jagged (flat ids [M], offsets [Q]) pair."""
    end = int(offsets[hi]) if hi < offsets.shape[0] else int(ids.shape[0])
    start = int(offsets[lo]) if lo < offsets.shape[0] else end
    return ids[start:end], offsets[lo:hi] - start


@dataclass
class RetrievalReport:
    """Metrics per scorer: `metrics[name]` with seen items excluded,
    `metrics[name + "_seen_included"]` without; and counts over the queries."""

    metrics: dict[str, dict[str, float]]
    queries: int
    oov_targets: int
    seen_targets: int


def evaluate_retrieval(
    scorers: dict[str, Scorer],
    batches: Iterable[CandidateBatch],
    *,
    num_items: int,
    ks: Sequence[int] = KS,
    seen: SeenProvider | None = history_seen,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    retrievers: dict[str, Retriever] | None = None,
) -> RetrievalReport:
    """Full-corpus retrieval metrics of every scorer on the same held-out batches.

    num_items: N, the vocabulary ids being 1..N. seen: the items to exclude for each
    example of a batch, jagged (None: only the seen-included metrics). One target per
    example: its label. `progress` is called with each batch's size.
    retrievers: scored from their top max(ks) lists (see the module docstring), under
    their own names, beside the scorers.
    """
    n1 = num_items + 1
    keys = tie_keys(n1, seed)
    retrievers = retrievers or {}
    clash = set(retrievers) & set(scorers)
    if clash:
        raise FunnelrecError(f"scorer and retriever share the name(s) {sorted(clash)}")
    suffixes = ([""] if seen is not None else []) + [SEEN_INCLUDED]
    names = [*scorers, *retrievers]
    acc = {name + sfx: RetrievalMetrics(ks) for name in names for sfx in suffixes}
    depth = max(ks)
    queries = oov = seen_targets = 0
    rows = max(1, SCORE_BUDGET // n1)
    for batch in batches:
        b = len(batch)
        targets = batch.label.reshape(b, 1)
        seen_ids, seen_offs = seen(batch) if seen is not None else (None, None)
        queries += b
        oov += int((targets == 0).sum())
        qs = {name: scorer.queries(batch) for name, scorer in scorers.items()}
        rqs = {name: r.queries(batch) for name, r in retrievers.items()}
        for lo in range(0, b, rows):
            hi = min(b, lo + rows)
            tgt = targets[lo:hi]
            n_rel = torch.ones(hi - lo)
            exclude = None
            if seen_ids is not None and seen_offs is not None:
                exclude = exclusion_mask(*_rows(seen_ids, seen_offs, lo, hi), n1)
                t = tgt.clamp(min=0)
                seen_targets += int((exclude.gather(1, t) & (t > 0)).sum())
            for name, scorer in scorers.items():
                s = scorer.scores(qs[name][lo:hi]).float()
                if s.shape[1] != n1:
                    raise FunnelrecError(
                        f"scorer '{name}' gives {s.shape[1]} scores per query, "
                        f"the vocabulary has {n1} ids"
                    )
                acc[name + SEEN_INCLUDED].update(target_ranks(s, tgt, None, keys), n_rel)
                if exclude is not None:
                    acc[name].update(target_ranks(s, tgt, exclude, keys), n_rel)
            excl: list[np.ndarray] | None = None
            if retrievers and seen_ids is not None and seen_offs is not None:
                flat, offs = _rows(seen_ids, seen_offs, lo, hi)
                per_row = np.split(flat.numpy(), offs.numpy()[1:])
                # the protocol's exclusion: seen items, but never the target itself
                excl = [e[e != t] for e, t in zip(per_row, tgt[:, 0].tolist(), strict=True)]
            for name, retriever in retrievers.items():
                rq = rqs[name][lo:hi]
                lists = retriever.retrieve(rq, depth, None)
                acc[name + SEEN_INCLUDED].update(list_ranks(lists, tgt), n_rel)
                if excl is not None:
                    lists = retriever.retrieve(rq, depth, excl)
                    acc[name].update(list_ranks(lists, tgt), n_rel)
        if progress is not None:
            progress(b)
    return RetrievalReport(
        metrics={k: v.compute() for k, v in acc.items()},
        queries=queries,
        oov_targets=oov,
        seen_targets=seen_targets,
    )


class SequentialSeen:
    """Seen items of a whole split (flat [M], offsets [E + 1], e.g. `loader.seen_items`),
    handed out batch by batch in the order of an unshuffled loader of that split."""

    def __init__(self, flat: np.ndarray | Tensor, offsets: np.ndarray | Tensor) -> None:
        self.flat = torch.as_tensor(np.asarray(flat), dtype=torch.int64)
        self.offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.int64)
        self.cursor = 0

    def __call__(self, batch: CandidateBatch) -> tuple[Tensor, Tensor]:
        b = len(batch)
        lo, hi = self.cursor, self.cursor + b
        if hi >= self.offsets.shape[0]:
            raise FunnelrecError(
                f"the loader gave more examples ({hi}) than the split's seen items cover "
                f"({self.offsets.shape[0] - 1})"
            )
        start, end = int(self.offsets[lo]), int(self.offsets[hi])
        self.cursor = hi
        return self.flat[start:end], self.offsets[lo:hi] - start


# Queries scored at once against every item: a batch's [B, items] float32 scores (and the
# masks beside them) stay near this many bytes, so a million-item corpus is scored ~250
# queries at a time instead of 1,024 (4 GB).
SCORE_BYTES = 1 << 30


def query_batch(num_items: int, most: int = 1024) -> int:
    """How many queries to score at once against `num_items` items (see SCORE_BYTES)."""
    return max(16, min(most, SCORE_BYTES // (4 * max(num_items, 1))))


def evaluate_split(
    scorers: dict[str, Scorer],
    feats: Features,
    split: str = "test",
    *,
    ks: Sequence[int] = KS,
    batch_size: int = 1024,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = False,
    retrievers: dict[str, Retriever] | None = None,
) -> RetrievalReport:
    """`evaluate_retrieval` on a features split's held-out examples (next watches), with
    each user's previously watched items (`loader.seen_items`) as the exclusion set.

    limit: score only the first `limit` examples (e.g. for validation during training).
    retrievers: as in `evaluate_retrieval`."""
    from funnelrec.features.loader import candidate_loader, seen_items

    total = feats.num_examples("candidates", split)
    if limit is not None:
        total = min(total, limit)
    bs = min(batch_size, query_batch(len(feats.vocab("item"))), max(total, 1))
    n_batches = math.ceil(total / bs)
    # whole batches are scored: the last one may run past `limit`
    flat, offsets = seen_items(feats, split, limit=n_batches * bs)
    loader = candidate_loader(feats, split, batch_size=bs)
    batches: Iterable[CandidateBatch] = itertools.islice(iter(loader), n_batches)
    bar = progress_bar("examples", enabled=progress, transient=True)
    with bar:
        task = bar.add_task(f"evaluate {split}", total=total)
        return evaluate_retrieval(
            scorers,
            batches,
            num_items=len(feats.vocab("item")) - 1,
            ks=ks,
            seen=SequentialSeen(flat, offsets),
            seed=seed,
            progress=lambda n: bar.advance(task, n),
            retrievers=retrievers,
        )


def protocol(
    feats: Features, split: str, ks: Sequence[int], report: RetrievalReport
) -> dict[str, Any]:
    """The evaluation protocol, for metrics.json: what was ranked, for whom, how."""
    return {
        "split": split,
        "split_kind": feats.split,
        "ks": sorted(set(ks)),
        "targets": "the held-out next watch of each example (one per example)",
        "ranking": f"exact scoring of all {len(feats.vocab('item')) - 1} items of the "
        "training item vocabulary (out-of-vocabulary targets count as misses)",
        "exclusion": {
            "<name>": "items the user watched before the target are removed from the "
            "ranking, except the target itself",
            "<name>_seen_included": "nothing removed",
        },
        "ties": "broken at random, by a fixed permutation of items (seed 0)",
        "example_age": "0 (serving)",
        "popularity": "training watch counts of each item",
        "data": {"fingerprint": feats.fingerprint, "features": str(feats.path)},
        "queries": report.queries,
        "oov_targets": report.oov_targets,
        "seen_targets": report.seen_targets,
    }
