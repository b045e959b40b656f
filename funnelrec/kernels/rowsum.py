"""Weighted sums of table rows by index lists in C (funnelrec/kernels/_rowsum.c): bag sums, and the
dense gradients of gathers and bag sums, each one pass that writes every output row once.

    rows = gather(table, ids)                             # table[ids]
    grad = gradient(terms_by_row(ids, len(table)), grad_rows)         # its table gradient
    terms = terms_by_row(ids, len(table), offsets, weights)
    sums = bag_sums(table, terms)            # F.embedding_bag(mode="sum", weights), [B, d]
    grad = gradient(terms, grad_sums)                                 # its table gradient

torch builds a gather's dense gradient as a zero-filled table plus a scatter-add, and a
bag sum's as a sort, a CSR matrix and a sparse-dense product: passes over the table from
memory. Here the ids are put in order of table row by a counting sort (stable, so each
row's terms are added in their order in `ids`: the same numbers on every run, whatever
the threads); each table row of a gradient is summed in registers and written once,
zeros included, and bag sums read the table once, in order. Timed in the training step:
see docs/candidates.md.

CPU, float32, contiguous tensors only; `usable` says whether a call can run here (the
kernel built and on, the tensors as it needs). Callers fall back to torch otherwise.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from funnelrec.errors import FunnelrecError
from funnelrec.kernels import native

_LIB: Any = native.load("funnelrec.kernels._rowsum")
if _LIB is not None:
    _p, _i = ctypes.c_void_p, ctypes.c_int64
    _LIB.rsum_rows.argtypes = [_p, _i, _i, _i, _p, _p, _p, _p]
    _LIB.rsum_rows.restype = None
    _LIB.rsum_order.argtypes = [_p, _i, _i, _p, _i, _p, _p, _p, _p]
    _LIB.rsum_order.restype = _i
    _LIB.rsum_scatter.argtypes = [_p, _i, _i, _i, _i, _i, _p, _p, _p, _p]
    _LIB.rsum_scatter.restype = None


def level() -> str:
    """What sums the rows where a model asks for the C row sums: "C (AVX-512)" (or AVX2 /
    portable C), or "torch" where the kernel was not built."""
    if _LIB is None:
        return "torch"
    return f"C ({native.LEVELS[int(_LIB.rsum_level())]})"


def usable(*tensors: Tensor) -> bool:
    """Whether the kernel can take these tensors: built, all on the CPU; float ones float32
    (integer ones are converted)."""
    return _LIB is not None and all(
        t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32)
        for t in tensors
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _sum_rows(
    out: Tensor, start: Tensor, source_row: Tensor | None, weights: Tensor | None, src: Tensor
) -> Tensor:
    """out[r] = sum_k weights[k] * src[source_row[k]] over k in start[r]..start[r + 1] (see
    _rowsum.c), rows split over torch's threads."""
    rows, d = out.shape
    args = (_ptr(start), _ptr(source_row), _ptr(weights), _ptr(src))

    def run(lo: int, hi: int) -> None:
        _LIB.rsum_rows(out.data_ptr(), d, lo, hi, *args)

    native.split_rows(run, rows)
    return out


@dataclass(frozen=True)
class Terms:
    """The terms of row sums into a [rows, d] table, in order of row: row r's terms are
    k in start[r]..start[r + 1], each weights[k] (1 when None) times row source[k] of a
    source of `sources` rows (the bags, or the gathered positions). From `terms_by_row`."""

    start: Tensor  # [rows + 1] int64
    source: Tensor  # [m] int64
    weights: Tensor | None  # [m] float32
    sources: int

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors, for `save_for_backward`; `of` puts them back together."""
        return (self.start, self.source) + (() if self.weights is None else (self.weights,))

    @classmethod
    def of(cls, tensors: tuple[Tensor, ...], sources: int) -> Terms:
        return cls(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None, sources)


def terms_by_row(
    ids: Tensor, rows: int, offsets: Tensor | None = None, weights: Tensor | None = None
) -> Terms:
    """The terms of a gradient into a [rows, d] table from the positions that gathered its
    rows (ids [n] in 0..rows-1), by a stable counting sort: position i contributes
    weights[i] (1 when None) times the gradient's row of its bag (offsets [B] given, the
    EmbeddingBag form) or its own row i. Positions of weight 0 are left out."""
    ids = ids.to(torch.int64).contiguous()
    n = int(ids.shape[0])
    start = torch.empty(rows + 1, dtype=torch.int64)
    source = torch.empty(n, dtype=torch.int64)
    w_out = None if weights is None else torch.empty(n, dtype=torch.float32)
    bags = 0
    if offsets is not None:
        offsets = offsets.to(torch.int64).contiguous()
        bags = int(offsets.shape[0])
        if n and (bags == 0 or int(offsets[0]) != 0):
            raise FunnelrecError("bag offsets must start at 0")
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
    bad = _LIB.rsum_order(
        ids.data_ptr(), n, rows, _ptr(offsets), bags, _ptr(weights),
        start.data_ptr(), source.data_ptr(), _ptr(w_out),
    )  # fmt: skip
    if bad:
        raise FunnelrecError(
            f"row id {int(ids[bad - 1])} at position {bad - 1} is outside the table's {rows} rows"
        )
    return Terms(start, source, w_out, bags if offsets is not None else n)


def gradient(terms: Terms, grad: Tensor) -> Tensor:
    """The dense [rows, d] table of `terms`' sums over the rows of grad [sources, d]."""
    if grad.dim() != 2 or grad.shape[0] != terms.sources:
        raise FunnelrecError(
            f"the terms read {terms.sources} source rows, the gradient is {tuple(grad.shape)}"
        )
    out = grad.new_empty(int(terms.start.shape[0]) - 1, grad.shape[1])
    return _sum_rows(out, terms.start, terms.source, terms.weights, grad.contiguous())


def gather(table: Tensor, ids: Tensor) -> Tensor:
    """table[ids] [n, d], the rows copied exactly (as `index_select`)."""
    ids = ids.to(torch.int64).contiguous()
    _check_ids(ids, int(table.shape[0]))
    start = torch.arange(ids.shape[0] + 1, dtype=torch.int64)
    out = table.new_empty(ids.shape[0], table.shape[1])
    return _sum_rows(out, start, ids, None, table.contiguous())


def _check_ids(ids: Tensor, rows: int) -> None:
    if ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= rows:
            bad = int(low) if int(low) < 0 else int(high)
            raise FunnelrecError(f"row id {bad} is outside the table's {rows} rows")


def bag_sums_by_bag(table: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """The same sums as `bag_sums`, each bag's rows gathered and added in its order: for
    tables much larger than a batch's ids, where reading the table in order would walk
    mostly untouched rows."""
    ids = ids.to(torch.int64).contiguous()
    _check_ids(ids, int(table.shape[0]))
    n = ids.new_tensor([ids.shape[0]])
    start = torch.cat([offsets.to(torch.int64), n])
    out = table.new_empty(offsets.shape[0], table.shape[1])
    return _sum_rows(out, start, ids, weights.to(torch.float32).contiguous(), table.contiguous())


def bag_sums(table: Tensor, terms: Terms) -> Tensor:
    """The bag sums [B, d] sum_i weights[i] * table[ids[i]] of the bags `terms` were made
    from (`terms_by_row(ids, len(table), offsets, weights)`): the numbers, to rounding, of
    `F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights)`, added
    in order of table row. The table is read once, row by row, while the bags' sums stay
    in cache; columns are split over torch's threads."""
    rows = int(terms.start.shape[0]) - 1
    if table.dim() != 2 or table.shape[0] != rows:
        raise FunnelrecError(f"the terms are for a table of {rows} rows, not {tuple(table.shape)}")
    table = table.contiguous()
    d, bags = int(table.shape[1]), terms.sources
    out = table.new_empty(bags, d)
    args = (rows, _ptr(terms.start), _ptr(terms.source), _ptr(terms.weights))

    def run(lo: int, hi: int) -> None:  # in blocks of 16 columns (one AVX-512 register)
        _LIB.rsum_scatter(
            out.data_ptr(), d, lo * 16, min(hi * 16, d), bags, *args, table.data_ptr()
        )

    native.split_rows(run, -(-d // 16), min_rows=2)
    return out
