"""bags.weighted_bag_sum and mean_bag: the same sums and table gradients as nn.EmbeddingBag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from funnelrec.kernels.bags import mean_bag, stable_order, weighted_bag_sum


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (9,), generator=g)
    lengths[3] = 0  # an empty bag
    ids = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    ids[::5] = 0  # padding
    offsets = torch.cumsum(lengths, 0) - lengths
    per_id = torch.rand(ids.shape[0], generator=g) * (ids != 0)
    return ids, offsets, per_id


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sums_and_gradients_equal_embedding_bag(sparse: bool, seed: int) -> None:
    ids, offsets, per_id = _batch(seed)
    ref = nn.EmbeddingBag(20, 6, mode="sum", padding_idx=0, sparse=sparse)
    ours = nn.Parameter(ref.weight.detach().clone())
    upstream = torch.randn(offsets.shape[0], 6, generator=torch.Generator().manual_seed(9))

    want = ref(ids, offsets, per_sample_weights=per_id)
    got = weighted_bag_sum(ours, ids, offsets, per_id, sparse_grad=sparse)
    torch.testing.assert_close(got, want)
    assert got[3].abs().sum() == 0

    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert ref.weight.grad is not None and ours.grad is not None
    assert ours.grad.is_sparse == sparse
    if sparse:
        rows = ours.grad._indices()[0].tolist()
        assert len(rows) == len(set(rows))  # one entry per row
        assert set(rows) == set(ids[per_id != 0].tolist())  # only the rows the batch used
    torch.testing.assert_close(ours.grad.to_dense(), ref.weight.grad.to_dense())
    assert ours.grad.to_dense()[0].abs().sum() == 0  # padding row untouched


def test_gradient_is_deterministic() -> None:
    ids = torch.randint(1, 50, (4000,), generator=torch.Generator().manual_seed(3))
    offsets = torch.arange(0, 4000, 40)
    per_id = torch.rand(4000, generator=torch.Generator().manual_seed(4))
    grads = []
    for _ in range(2):
        w = nn.Parameter(torch.ones(50, 8))
        weighted_bag_sum(w, ids, offsets, per_id, sparse_grad=False).pow(2).sum().backward()
        assert w.grad is not None
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("sparse", [False, True])
def test_mean_bag_is_embedding_bags_mean(sparse: bool) -> None:
    ids, offsets, _ = _batch(4)
    table = nn.Embedding(20, 5, padding_idx=0, sparse=sparse)
    ours = nn.Parameter(table.weight.detach().clone())
    upstream = torch.randn(offsets.shape[0], 5, generator=torch.Generator().manual_seed(2))
    want = F.embedding_bag(ids, table.weight, offsets, mode="mean", padding_idx=0, sparse=sparse)
    got = mean_bag(ours, ids, offsets, sparse_grad=sparse)
    torch.testing.assert_close(got, want)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert table.weight.grad is not None and ours.grad is not None
    torch.testing.assert_close(ours.grad.to_dense(), table.weight.grad.to_dense())


@pytest.mark.parametrize(
    ("n", "bound"), [(10, 7), (5_000, 32_768), (20_480, 5_001), (40_000, 70_000), (6_000, 2**31)]
)
def test_stable_order_is_a_stable_argsort(n: int, bound: int) -> None:
    """The narrow keys and the padding up to the radix sort's size change nothing: ties
    (including ids equal to the padding key) keep their order."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, min(bound, 50), (n,), generator=g) * ((bound - 1) // 49)
    ids[: n // 3] = bound - 1  # the largest id, which the padding equals for int16 keys
    want = torch.argsort(ids, stable=True)
    assert torch.equal(stable_order(ids, bound), want)
