"""Retrieval metrics against values computed by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates.metrics import (
    IndexRetriever,
    ModelScorer,
    PopularityScorer,
    RetrievalMetrics,
    SequentialSeen,
    evaluate_retrieval,
    exclusion_mask,
    list_ranks,
    target_ranks,
    tie_keys,
)
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import CandidateBatch

INF = math.inf


def test_rank_counts_higher_scores_and_ignores_padding_column() -> None:
    #                      pad  1    2    3    4
    scores = torch.tensor([[9.0, 3.0, 1.0, 2.0, 5.0]])
    assert target_ranks(scores, torch.tensor([[3]])).item() == 3  # below items 4 and 1
    assert target_ranks(scores, torch.tensor([[4]])).item() == 1  # column 0 never ranked
    assert target_ranks(scores, torch.tensor([[2]])).item() == 4


def test_exclusion_removes_seen_items_but_never_the_target() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0]])
    exclude = torch.tensor([[False, False, False, True, True]])  # 3 and 4 were seen
    assert target_ranks(scores, torch.tensor([[3]]), exclude).item() == 2  # 3 is the target
    assert target_ranks(scores, torch.tensor([[2]]), exclude).item() == 2
    assert target_ranks(scores, torch.tensor([[1]]), exclude).item() == 1


def test_oov_and_empty_targets_are_misses() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 1.0]])
    r = target_ranks(scores, torch.tensor([[0, 1], [2, -1]]))
    assert r[0, 0] == INF and r[0, 1] == 1 and r[1, 0] == 2 and r[1, 1] == INF


def test_ties_break_by_key_and_ranks_form_a_strict_order() -> None:
    n = 12
    scores = torch.zeros(1, n + 1)
    scores[0, 5:9] = 1.0  # a tie group on top, the rest tied below
    keys = tie_keys(n + 1, seed=3)
    ranks = target_ranks(scores, torch.arange(1, n + 1)[None, :], keys=keys)[0]
    assert sorted(ranks.tolist()) == list(range(1, n + 1))
    assert set(ranks[4:8].tolist()) == {1.0, 2.0, 3.0, 4.0}  # items 5..8 first
    # default keys: by id
    assert target_ranks(torch.zeros(1, 6), torch.tensor([[3]])).item() == 3


@pytest.mark.parametrize("seed", range(4))
def test_ranks_equal_the_definition_with_ties_and_exclusions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, n1 = 7, 12
    scores = torch.randint(0, 4, (q, n1), generator=g).float()  # many ties
    keys = torch.randperm(n1, generator=g)
    exclude = torch.rand(q, n1, generator=g) < 0.3
    targets = torch.randint(-1, n1, (q, 3), generator=g)

    def definition(i: int, t: int) -> float:
        if t <= 0:
            return math.inf
        row_targets = {int(x) for x in targets[i] if x > 0}  # never excluded
        ranked = [j for j in range(1, n1) if j in row_targets or not bool(exclude[i, j])]
        order = sorted(ranked, key=lambda j: (-float(scores[i, j]), int(keys[j])))
        return float(order.index(t) + 1)

    got = target_ranks(scores, targets, exclude, keys)
    want = [[definition(i, int(t)) for t in targets[i]] for i in range(q)]
    assert got.tolist() == want


def test_single_target_metrics_by_hand() -> None:
    m = RetrievalMetrics(ks=(1, 5, 20))
    m.update(torch.tensor([[1.0], [3.0], [12.0], [INF]]), torch.ones(4))
    got = m.compute()
    assert got["recall@1"] == pytest.approx(1 / 4)
    assert got["recall@5"] == pytest.approx(2 / 4)
    assert got["recall@20"] == pytest.approx(3 / 4)
    assert got["hr@5"] == got["recall@5"]
    assert got["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert got["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(13)) / 4)
    assert got["map@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert got["map@20"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert m.queries == 4


def test_multi_target_metrics_by_hand() -> None:
    m = RetrievalMetrics(ks=(1, 5))
    # query 1: three relevant items at ranks 5, 2 and one unretrievable; query 2: ranks 1, 2
    m.update(torch.tensor([[5.0, 2.0, INF], [1.0, 2.0, INF]]), torch.tensor([3, 2]))
    got = m.compute()
    assert got["recall@5"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["recall@1"] == pytest.approx((0 + 1 / 2) / 2)
    assert got["hr@1"] == pytest.approx(1 / 2)
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    q1 = (1 / math.log2(3) + 1 / math.log2(6)) / idcg3
    assert got["ndcg@5"] == pytest.approx((q1 + 1.0) / 2)
    assert got["ndcg@1"] == pytest.approx((0 + 1.0) / 2)  # ideal DCG@1 = 1
    assert got["map@5"] == pytest.approx(((1 / 2 + 2 / 5) / 3 + (1 + 1) / 2) / 2)
    assert got["map@1"] == pytest.approx((0 + 1.0) / 2)
    assert got["mrr"] == pytest.approx((1 / 2 + 1) / 2)


def test_metric_cutoffs_must_be_positive() -> None:
    with pytest.raises(FunnelrecError, match="cut-offs"):
        RetrievalMetrics(ks=(0, 10))


def test_exclusion_mask_from_jagged_ids() -> None:
    mask = exclusion_mask(torch.tensor([1, 3, 2]), torch.tensor([0, 2, 2]), 4)
    assert mask.tolist() == [
        [False, True, False, True],
        [False, False, False, False],
        [False, False, True, False],
    ]


def _batch(labels: list[int], histories: list[list[int]]) -> CandidateBatch:
    b = len(labels)
    flat = [i for h in histories for i in h]
    offs = np.cumsum([0] + [len(h) for h in histories[:-1]])
    return CandidateBatch(
        history=torch.tensor(flat, dtype=torch.long),
        history_offsets=torch.tensor(offs, dtype=torch.long),
        search=torch.zeros(0, dtype=torch.long),
        search_offsets=torch.zeros(b, dtype=torch.long),
        region=torch.zeros(b, dtype=torch.long),
        device=torch.zeros(b, dtype=torch.long),
        dense=torch.zeros(b, 1),
        example_age=torch.zeros(b),
        label=torch.tensor(labels),
        user_id=torch.arange(b),
        ts=torch.zeros(b, dtype=torch.long),
    )


class _FixedScorer:
    """Each query's scores given explicitly by the user id."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def queries(self, batch: CandidateBatch) -> torch.Tensor:
        return batch.user_id[:, None].float()

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        return self.table[queries[:, 0].long()]


def test_evaluate_retrieval_popularity_and_exclusion() -> None:
    counts = torch.tensor([0.0, 50.0, 40.0, 30.0, 20.0, 10.0])  # popularity 1 > 2 > ... > 5
    batches = [
        _batch([3, 1], [[1, 2], [1]]),  # user 0 saw 1, 2; user 1 re-watches 1
        _batch([0], [[4]]),  # out-of-vocabulary target
    ]
    report = evaluate_retrieval(
        {"popularity": PopularityScorer(counts)}, batches, num_items=5, ks=(1, 3)
    )
    excl, incl = report.metrics["popularity"], report.metrics["popularity_seen_included"]
    # included: ranks 3, 1, miss; excluded: 1 (1 and 2 removed), 1 (re-watch kept), miss
    assert incl["hr@1"] == pytest.approx(1 / 3)
    assert incl["hr@3"] == pytest.approx(2 / 3)
    assert incl["mrr"] == pytest.approx((1 / 3 + 1) / 3)
    assert excl["hr@1"] == pytest.approx(2 / 3)
    assert excl["mrr"] == pytest.approx(2 / 3)
    assert (report.queries, report.oov_targets, report.seen_targets) == (3, 1, 1)


def test_evaluate_retrieval_scores_every_scorer_on_the_same_queries() -> None:
    table = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 2.0, 1.0]])
    batches = [_batch([3, 3], [[], []])]
    report = evaluate_retrieval(
        {"a": _FixedScorer(table), "b": PopularityScorer(torch.tensor([0.0, 1, 1, 1]))},
        batches,
        num_items=3,
        ks=(1,),
        seen=None,
    )
    assert set(report.metrics) == {"a_seen_included", "b_seen_included"}
    assert report.metrics["a_seen_included"]["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    # popularity: all tied, so the rank comes from the fixed random tie-break keys
    assert 0 < report.metrics["b_seen_included"]["mrr"] <= 1


def test_evaluate_retrieval_rejects_a_scorer_of_the_wrong_width() -> None:
    with pytest.raises(FunnelrecError, match="vocabulary has 4 ids"):
        evaluate_retrieval(
            {"p": PopularityScorer(torch.ones(3))}, [_batch([1], [[]])], num_items=3, seen=None
        )


def test_sequential_seen_follows_the_loader_order() -> None:
    flat = np.array([1, 2, 5, 3], dtype=np.int64)
    offsets = np.array([0, 2, 2, 4], dtype=np.int64)  # 3 examples: {1, 2}, {}, {5, 3}
    seen = SequentialSeen(flat, offsets)
    ids, offs = seen(_batch([1, 1], [[], []]))
    assert ids.tolist() == [1, 2] and offs.tolist() == [0, 2]
    ids, offs = seen(_batch([1], [[]]))
    assert ids.tolist() == [5, 3] and offs.tolist() == [0]
    with pytest.raises(FunnelrecError, match="more examples"):
        seen(_batch([1], [[]]))


# --------------------------------------------------------------------------- ANN retrieval


def test_list_ranks_are_places_in_the_list_or_misses() -> None:
    lists = torch.tensor([[3, 1, 2], [2, 0, 0], [4, 5, 6]])
    ranks = list_ranks(lists, torch.tensor([[1], [5], [0]]))
    assert ranks[:, 0].tolist() == [2.0, INF, INF]  # absent and out-of-vocabulary: misses


class _TableModel(torch.nn.Module):
    """A retrieval model in its simplest form: a learned vector per user, one per item."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        super().__init__()
        self.users = torch.nn.Parameter(users)
        self.items = torch.nn.Parameter(items)  # [N + 1, d], row 0 padding

    def forward(self, batch: CandidateBatch) -> torch.Tensor:
        return self.users[batch.user_id]

    def item_embeddings(self) -> torch.Tensor:
        return self.items


def test_ann_retrieval_through_an_exact_index_reproduces_the_exact_metrics() -> None:
    n, d = 9, 4
    g = torch.Generator().manual_seed(0)
    items = torch.randn(n + 1, d, generator=g)
    model = _TableModel(torch.randn(6, d, generator=g), items)
    # dataset ids of vocabulary ids 1..n, deliberately not in vocabulary order
    item_ids = np.array([70, 10, 50, 90, 20, 80, 30, 60, 40], dtype=np.int64)
    index = ItemIndex.build(items[1:].detach().numpy(), item_ids, "exact", threads=1)
    scorer = ModelScorer(model)
    # user 1 re-watches item 2 (a seen target stays retrievable); user 3's target is OOV
    batches = [
        _batch([2, 2, 5], [[2, 3], [1, 4, 6], []]),
        dataclasses.replace(_batch([0, 7, 9], [[5], [7, 8, 1], [9]]), user_id=torch.arange(3, 6)),
    ]
    report = evaluate_retrieval(
        {"model": scorer},
        batches,
        num_items=n,
        ks=(1, 3, 5),
        retrievers={"model_ann": IndexRetriever(scorer, index, item_ids)},
    )
    for variant in ("", "_seen_included"):
        exact, ann = report.metrics["model" + variant], report.metrics["model_ann" + variant]
        for name, value in exact.items():
            if name == "mrr":  # cut at max(K) = 5 for the list; at most the exact value
                assert ann[name] <= value + 1e-12
            else:
                assert ann[name] == pytest.approx(value), (variant, name)
    # The lists themselves: vocabulary ids, seen items excluded but never the target.
    retriever = IndexRetriever(scorer, index, item_ids)
    u = scorer.queries(batches[0])
    lists = retriever.retrieve(u, 5, [np.array([3]), np.array([1, 4, 6]), np.array([0])])
    scores = (u @ items.T).detach()
    scores[:, 0] = -torch.inf
    scores[0, 3] = scores[1, [1, 4, 6]] = -torch.inf
    assert lists.tolist() == torch.argsort(scores, dim=1, descending=True)[:, :5].tolist()
    assert retriever.retrieve(u, 12, None)[:, n:].eq(0).all()  # past the corpus: 0


def test_retrievers_and_scorers_need_distinct_names() -> None:
    table = torch.zeros(1, 4)
    with pytest.raises(FunnelrecError, match="share the name"):
        evaluate_retrieval(
            {"a": _FixedScorer(table)},
            [_batch([1], [[]])],
            num_items=3,
            retrievers={"a": IndexRetriever(ModelScorer(_TableModel(table, table)), None, [])},  # type: ignore[arg-type]
        )


def test_query_batch_bounds_the_score_matrix() -> None:
    from funnelrec.candidates.metrics import SCORE_BYTES, query_batch

    assert query_batch(10_000) == 1024  # small corpora: the usual batch
    b = query_batch(1_000_000)
    assert b * 1_000_000 * 4 <= SCORE_BYTES < (b + 1) * 1_000_000 * 4
    assert query_batch(10**12) == 16
