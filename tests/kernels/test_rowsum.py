"""The C row sums (funnelrec/kernels/_rowsum.c): gathers, their gradients and bag sums against
torch's own, at every instruction set the CPU has, with any thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from funnelrec.errors import FunnelrecError
from funnelrec.kernels import rowsum
from funnelrec.kernels.bags import weighted_bag_sum

pytestmark = pytest.mark.skipif(rowsum._LIB is None, reason="the C row sums were not built")


@contextmanager
def _level(level: int) -> Iterator[None]:
    assert rowsum._LIB.rsum_force_level(level) == level
    try:
        yield
    finally:
        rowsum._LIB.rsum_force_level(-1)


def _levels() -> list[int]:
    return list(range(int(rowsum._LIB.rsum_level()) + 1)) if rowsum._LIB is not None else []


def _bags(
    g: torch.Generator, rows: int, bags: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A table and bags of 0-9 ids (empty bags, repeats, zero weights)."""
    lengths = torch.randint(0, 10, (bags,), generator=g)
    lengths[3] = 0
    offsets = torch.cumsum(lengths, 0) - lengths
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    weights = torch.rand(ids.shape[0], generator=g)
    weights[::7] = 0.0
    return torch.randn(rows, d, generator=g), ids, offsets, weights


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("d", [16, 20, 130, 256])  # widths off the 16- and 128-lane blocks
def test_bag_sums_and_their_gradient_match_embedding_bag(level: int, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    table, ids, offsets, weights = _bags(g, 37, 60, d)
    grad = torch.randn(60, d, generator=g)
    t = table.clone().requires_grad_()
    ref = F.embedding_bag(ids, t, offsets, mode="sum", per_sample_weights=weights)
    ref.backward(grad)
    with _level(level):
        terms = rowsum.terms_by_row(ids, 37, offsets, weights)
        sums = rowsum.bag_sums(table, terms)
        by_bag = rowsum.bag_sums_by_bag(table, ids, offsets, weights)
        table_grad = rowsum.gradient(terms, grad)
    torch.testing.assert_close(sums, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_bag, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table_grad, t.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(sums[3], torch.zeros(d))  # the empty bag


@pytest.mark.parametrize("level", _levels())
def test_a_gather_and_its_gradient_are_index_select_and_index_add_exactly(level: int) -> None:
    g = torch.Generator().manual_seed(1)
    table, ids = torch.randn(50, 70, generator=g), torch.randint(0, 50, (300,), generator=g)
    grad = torch.randn(300, 70, generator=g)
    with _level(level):
        rows = rowsum.gather(table, ids)
        table_grad = rowsum.gradient(rowsum.terms_by_row(ids, 50), grad)
    assert torch.equal(rows, table.index_select(0, ids))
    # each row's terms added one by one in index order: index_add_'s numbers, untouched rows 0
    assert torch.equal(table_grad, torch.zeros(50, 70).index_add_(0, ids, grad))


def test_terms_are_in_order_of_row_then_position_without_zero_weights() -> None:
    ids = torch.tensor([2, 0, 2, 1, 2, 0])
    offsets = torch.tensor([0, 2, 2, 5])  # bags [2, 0], [], [2, 1, 2], [0]
    weights = torch.tensor([1.0, 2.0, 0.0, 4.0, 5.0, 6.0])
    terms = rowsum.terms_by_row(ids, 4, offsets, weights)
    assert terms.start.tolist() == [0, 2, 3, 5, 5]
    assert terms.source.tolist()[: int(terms.start[-1])] == [0, 3, 2, 0, 2]  # bags
    assert terms.weights is not None
    assert terms.weights.tolist()[:5] == [2.0, 6.0, 4.0, 1.0, 5.0]
    plain = rowsum.terms_by_row(ids, 4)
    assert plain.source.tolist() == [1, 5, 3, 0, 2, 4] and plain.weights is None  # positions


def test_threads_split_the_work_and_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    table, ids, offsets, weights = _bags(g, 500, 400, 48)
    grad = torch.randn(400, 48, generator=g)
    got = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        terms = rowsum.terms_by_row(ids, 500, offsets, weights)
        got.append((rowsum.bag_sums(table, terms), rowsum.gradient(terms, grad)))
    for sums, table_grad in got[1:]:
        assert torch.equal(sums, got[0][0]) and torch.equal(table_grad, got[0][1])


def test_ids_out_of_the_table_and_bad_offsets_are_errors() -> None:
    with pytest.raises(FunnelrecError, match="row id 9 at position 1 is outside the table's 5"):
        rowsum.terms_by_row(torch.tensor([1, 9, 2]), 5)
    with pytest.raises(FunnelrecError, match="row id -1"):
        rowsum.terms_by_row(torch.tensor([-1]), 5)
    with pytest.raises(FunnelrecError, match="row id 5 is outside"):
        rowsum.gather(torch.zeros(5, 4), torch.tensor([0, 5]))
    with pytest.raises(FunnelrecError, match="row id -2 is outside"):
        rowsum.bag_sums_by_bag(
            torch.zeros(5, 4), torch.tensor([-2]), torch.tensor([0]), torch.ones(1)
        )
    with pytest.raises(FunnelrecError, match="offsets must start at 0"):
        rowsum.terms_by_row(torch.tensor([1, 2]), 5, torch.tensor([1]), torch.ones(2))
    terms = rowsum.terms_by_row(torch.tensor([1, 2]), 5, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(FunnelrecError, match="the terms read 2 source rows"):
        rowsum.gradient(terms, torch.zeros(3, 4))
    with pytest.raises(FunnelrecError, match="a table of 5 rows"):
        rowsum.bag_sums(torch.zeros(6, 4), terms)


@pytest.mark.parametrize("rows", [80, 2000])  # read in order of row; gathered by bag
def test_the_bag_function_gives_torchs_sums_and_gradient_both_ways(rows: int) -> None:
    """`bags.weighted_bag_sum` through the C sums and through torch (the fallback)."""
    g = torch.Generator().manual_seed(3)
    table, ids, offsets, weights = _bags(g, rows, 50, 24)
    grad = torch.randn(50, 24, generator=g)
    out = []
    for c_row_sums in (True, False):
        t = table.clone().requires_grad_()
        sums = weighted_bag_sum(t, ids, offsets, weights, sparse_grad=False, c_row_sums=c_row_sums)
        sums.backward(grad)
        out.append((sums.detach(), t.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
