"""Weighted sums of embedding bags and their gradients (the CPU training path).

A batch of bags (flat ids [n] + start offsets [B], the `nn.EmbeddingBag` form) with one
weight per id is the sparse matrix S [B, V] (row b holds bag b's weights at its ids), and
the bag sums are S @ W for the table W [V, d]. Its gradient is S^T @ G.

Where the C row sums are built (`funnelrec.kernels.rowsum`, CPU float32), the forward puts
the ids in order of table row once (a stable counting sort), reads the table row by row
into the bags' sums, and the backward sums each table row's terms and writes it once: each
direction goes over the table once, in order, where the torch path below makes extra
passes over it from memory (the training step's timing: docs/candidates.md, "Throughput").
Otherwise the forward is EmbeddingBag's own kernel and the gradient a CSR sparse-dense
matmul, which beats `nn.EmbeddingBag`'s backward (a per-id scatter; docs/candidates.md,
"Training"). S^T is built by a stable sort of the ids. Both ways the gradient is
deterministic.

    out = weighted_bag_sum(table.weight, ids, offsets, weights, sparse_grad=False)  # [B, d]

With `sparse_grad` the table's gradient is a coalesced sparse tensor holding only the rows
the batch touched (for lazy Adam and the sparse all-gather of data-parallel training),
as `nn.EmbeddingBag(sparse=True)` gives.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from funnelrec.kernels import rowsum

# torch sorts integer keys with a radix sort from this many on, and fewer by comparison.
RADIX_SORT_MIN = 32_768


def stable_order(ids: Tensor, bound: int) -> Tensor:
    """argsort(ids, stable=True) for ids in 0..bound-1, the fast way on the CPU.

    The narrowest key type sorts fastest (a radix sort's passes grow with the key's
    bytes), and below RADIX_SORT_MIN keys torch falls back to a comparison sort, much
    slower than its radix sort: so a batch a little short of it is padded up to it with
    the largest key, which sorts after every real one (the timings: docs/candidates.md,
    "Kernel choices")."""
    n = int(ids.shape[0])
    key_type = torch.int16 if bound <= 2**15 else torch.int32 if bound <= 2**31 else torch.int64
    keys = ids.to(key_type)
    if RADIX_SORT_MIN // 8 <= n < RADIX_SORT_MIN and keys.device.type == "cpu":
        pad = keys.new_full((RADIX_SORT_MIN - n,), torch.iinfo(key_type).max)
        return torch.argsort(torch.cat([keys, pad]), stable=True)[:n]
    return torch.argsort(keys, stable=True)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the products used are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


class _WeightedBagSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        weight: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_id: Tensor,
        sparse_grad: bool,
        c_row_sums: bool,
    ) -> Tensor:
        ctx.shape = tuple(weight.shape)
        ctx.sparse_grad = sparse_grad
        ctx.c_row_sums = c_row_sums
        weights = per_id.to(weight.dtype)
        ctx.bags = 0  # > 0: the terms by row are saved
        if c_row_sums and rowsum.usable(weight, weights):
            if not sparse_grad and weight.shape[0] <= 2 * ids.shape[0]:
                # the ids in order of table row: the forward reads the table once, in
                # order, and the backward sums each row's terms
                terms = rowsum.terms_by_row(ids, int(weight.shape[0]), offsets, weights)
                ctx.save_for_backward(ids, offsets, per_id, *terms.tensors())
                ctx.bags = terms.sources
                return rowsum.bag_sums(weight, terms)
            # a table much larger than the batch: gather by bag (and sort in backward)
            ctx.save_for_backward(ids, offsets, per_id)
            return rowsum.bag_sums_by_bag(weight, ids, offsets, weights)
        ctx.save_for_backward(ids, offsets, per_id)
        # the same sums as the CSR product S @ W, but EmbeddingBag's kernel runs faster
        # (docs/candidates.md, "Kernel choices")
        return F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        ids, offsets, per_id, *saved = ctx.saved_tensors
        rows_count, dim = ctx.shape
        if not ctx.sparse_grad and ctx.c_row_sums and rowsum.usable(grad_out, per_id):
            terms = (
                rowsum.Terms.of(tuple(saved), ctx.bags)
                if saved
                else rowsum.terms_by_row(ids, rows_count, offsets, per_id.to(grad_out.dtype))
            )
            return rowsum.gradient(terms, grad_out), None, None, None, None, None
        b, n = offsets.shape[0], ids.shape[0]
        lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
        bag_of = torch.repeat_interleave(torch.arange(b, device=ids.device), lengths)
        keep = per_id != 0  # padding and zero-weight ids add nothing
        if not bool(keep.all()):
            ids, bag_of, per_id = ids[keep], bag_of[keep], per_id[keep]
        # 32-bit indices where they fit, and index_select rather than advanced indexing:
        # both faster (docs/candidates.md, "Kernel choices")
        index_type = torch.int32 if max(rows_count, b, n) < 2**31 else torch.int64
        order = stable_order(ids, rows_count)
        sorted_ids = ids.index_select(0, order)
        values = per_id.index_select(0, order).to(grad_out.dtype)
        col = bag_of.index_select(0, order).to(index_type)
        g = grad_out.contiguous()
        if ctx.sparse_grad:
            touched, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
            crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(index_type)
            st = _csr(crow, col, values, (int(touched.shape[0]), b))
            rows = torch.sparse.mm(st, g)  # [U, d]
            grad = torch.sparse_coo_tensor(
                touched[None], rows, (rows_count, dim), is_coalesced=True, check_invariants=False
            )
        else:
            counts = torch.bincount(sorted_ids, minlength=rows_count)
            crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(index_type)
            st = _csr(crow, col, values, (rows_count, b))
            # into a fresh buffer, beta 0 (its contents ignored): torch.sparse.mm zero-fills
            # its result and then copies it: two passes over the [V, d] table that this
            # saves (docs/candidates.md, "Training")
            grad = g.new_empty(rows_count, dim).addmm_(st, g, beta=0)  # [V, d]
        return grad, None, None, None, None, None


def weighted_bag_sum(
    weight: Tensor,
    ids: Tensor,
    offsets: Tensor,
    per_id: Tensor,
    *,
    sparse_grad: bool,
    c_row_sums: bool = True,
) -> Tensor:
    """sum_i per_id[i] * weight[ids[i]] over each bag: [B, d].

    weight [V, d]; ids [n] int64 in 0..V-1; offsets [B] int64, non-decreasing starts of
    the bags in `ids` (the first 0); per_id [n] (no gradient flows to it). sparse_grad: the
    gradient of `weight` as a coalesced sparse tensor of the touched rows. c_row_sums: use
    the C row sums where they are built (False: the torch path, for A/B runs and tests).
    """
    out: Tensor = _WeightedBagSum.apply(
        weight, ids, offsets, per_id.detach(), sparse_grad, c_row_sums
    )
    return out


def mean_bag(
    weight: Tensor, ids: Tensor, offsets: Tensor, *, sparse_grad: bool, c_row_sums: bool = True
) -> Tensor:
    """Mean embedding of each bag [B, d], padding (id 0) left out, an empty bag -> 0: the
    numbers of `F.embedding_bag(mode="mean", padding_idx=0)`, as CSR products."""
    n = ids.shape[0]
    real = (ids != 0).to(weight.dtype)
    lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
    rows = torch.repeat_interleave(torch.arange(offsets.shape[0], device=ids.device), lengths)
    count = torch.zeros(offsets.shape[0], dtype=real.dtype, device=ids.device)
    count.index_add_(0, rows, real)
    per_id = real / count.clamp(min=1.0).index_select(0, rows)
    return weighted_bag_sum(
        weight, ids, offsets, per_id, sparse_grad=sparse_grad, c_row_sums=c_row_sums
    )
