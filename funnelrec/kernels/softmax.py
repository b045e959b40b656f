"""The candidate-generation loss: a softmax over the item vocabulary, full or sampled.

The paper (Covington et al. 2016, section 3.1) frames retrieval as extreme multiclass
classification, P(w = i | u) = exp(v_i . u) / sum_j exp(v_j . u). The full denominator
touches every item; the paper instead samples thousands of negatives from a background
distribution Q and corrects for the sampling ("logQ" / importance correction), which keeps
a step's cost independent of the vocabulary's size. With label y, shared negatives
s_1..s_n ~ Q (with replacement) and o_j = v_j . u:

    loss = -o_y + log( exp(o_y) + sum_{k: s_k != y} exp(o_{s_k} - log(n Q(s_k))) )

The second term is an importance-sampling estimate of sum_{j != y} exp(o_j): each
negative's logit is corrected by subtracting log of its expected count n Q(j) in the sample,
and negatives equal to the label (accidental hits) are masked. The label's own term is
known exactly and so is not corrected. As n grows, the loss and its gradient converge to
the full softmax's (tested). In-batch negatives (the other examples' labels, a sample of
the training label distribution P) can be mixed in; then every negative, sampled or
in-batch, is corrected by its expected count under the combined draw, n Q(j) + m P(j) with
m = B - 1 (multiple importance sampling with the balance heuristic), which keeps the
estimate unbiased.

Item ids are vocabulary ids 1..N; id 0 is padding / out of vocabulary and never drawn.

Example:
    q = Proposal.from_counts(train_label_counts, kind="unigram", alpha=0.75)
    loss_fn = SampledSoftmax(q, num_negatives=4096)
    loss = loss_fn(u, item_table.weight, labels)        # u [B, d], weight [N+1, d], labels [B]

Item vectors that are not the rows of one table (the candidate model's content tower:
id row + content vector) are computed for the scored ids only and handed over as rows:
    negatives = loss_fn.sample(4096)
    ids = torch.cat([labels, negatives])
    rows = loss_fn.gather_rows(item_table.weight, ids) + content_vectors(ids)   # [B + n, d]
    loss = loss_fn.rows_loss(u, rows, labels, negatives)
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.errors import FunnelrecError
from funnelrec.kernels import native, rowsum

ProposalKind = Literal["unigram", "log_uniform", "uniform"]
PROPOSAL_KINDS: tuple[str, ...] = ("unigram", "log_uniform", "uniform")


@dataclass(frozen=True)
class Proposal:
    """A proposal distribution Q over vocabulary ids 1..N (id 0 has probability 0).

    probs: [N + 1] float64, probs[0] = 0, sums to 1. Kept in float64 so that the CDF of a
    million-item vocabulary stays exact enough for inverse-CDF sampling.
    """

    probs: Tensor
    kind: str
    alpha: float

    @property
    def num_items(self) -> int:
        return int(self.probs.shape[0]) - 1

    @classmethod
    def from_counts(cls, counts: Tensor, kind: str = "unigram", alpha: float = 0.75) -> Proposal:
        """Q from training label frequencies.

        counts: [N + 1] occurrences of each vocabulary id as a training label (counts[0] is
            ignored). kind:
            - "unigram": Q(j) proportional to count_j ** alpha (alpha = 0.75 flattens the
              head, as in word2vec); counts are floored at 1 so that every item in the
              vocabulary can be drawn and its log Q stays finite;
            - "log_uniform": the Zipfian Q(j) = log((j + 1) / j) / log(N + 1), which
              assumes ids are numbered by decreasing frequency (as vocabularies built by
              frequency are); counts only give N;
            - "uniform": Q(j) = 1 / N.
        """
        if kind not in PROPOSAL_KINDS:
            raise FunnelrecError(
                f"unknown proposal '{kind}' (expected one of {', '.join(PROPOSAL_KINDS)})"
            )
        n = int(counts.shape[0]) - 1
        if n < 1:
            raise FunnelrecError("proposal needs a vocabulary of at least one item")
        ids = torch.arange(1, n + 1, dtype=torch.float64)
        if kind == "unigram":
            if alpha < 0:
                raise FunnelrecError(f"proposal alpha must be >= 0, got {alpha}")
            w = counts[1:].to(torch.float64).clamp(min=1.0) ** alpha
        elif kind == "log_uniform":
            w = torch.log1p(1.0 / ids)
        else:
            w = torch.ones(n, dtype=torch.float64)
        probs = torch.cat([torch.zeros(1, dtype=torch.float64), w / w.sum()])
        return cls(probs=probs, kind=kind, alpha=float(alpha))


class SampledSoftmax(nn.Module):
    """Softmax loss over the item vocabulary: full, or sampled with the logQ correction.

    Buffers (saved in the state dict, so a resumed run samples from the same Q):
        cdf:         [N]      cumulative Q over ids 1..N, float64 (inverse-CDF sampling)
        log_q:       [N + 1]  log Q(j), float32 (-inf for id 0)
        log_p_label: [N + 1]  log P(j) of the training label distribution (in-batch
                              negatives), float32

    Sampling uses the global torch RNG, so the training loop's seeding and checkpointed RNG
    state make it reproducible.
    """

    cdf: Tensor
    log_q: Tensor
    log_p_label: Tensor

    def __init__(
        self,
        proposal: Proposal,
        *,
        label_counts: Tensor | None = None,
        num_negatives: int = 4096,
        in_batch_negatives: bool = False,
        correction: bool = True,
        full: bool = False,
        normalize_items: bool = False,
        c_row_sums: bool = True,
        c_softmax_rows: bool = True,
    ) -> None:
        super().__init__()
        if num_negatives < 0:
            raise FunnelrecError(f"num_negatives must be >= 0, got {num_negatives}")
        if not full and num_negatives == 0 and not in_batch_negatives:
            raise FunnelrecError("sampled softmax needs num_negatives > 0 or in-batch negatives")
        n = proposal.num_items
        self.num_negatives = int(num_negatives)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.correction = bool(correction)
        self.full = bool(full)
        # L2-normalise the item rows a batch uses (cosine scoring; the model normalises u)
        self.normalize_items = bool(normalize_items)
        # the C kernels where they are built (False: torch, for A/B runs and tests)
        self.c_row_sums = bool(c_row_sums)
        self.c_softmax_rows = bool(c_softmax_rows)
        probs = proposal.probs.to(torch.float64)
        cdf = torch.cumsum(probs[1:], 0)
        cdf[-1] = 1.0  # guard against rounding so that a uniform draw < 1 always lands
        self.register_buffer("cdf", cdf)
        self.register_buffer("log_q", torch.log(probs).to(torch.float32))
        if label_counts is None:
            label_counts = torch.ones(n + 1)
        if int(label_counts.shape[0]) != n + 1:
            raise FunnelrecError(
                f"label_counts has {label_counts.shape[0]} entries, proposal {n + 1}"
            )
        p = label_counts.to(torch.float64).clone()
        p[0] = 0.0
        p[1:] = p[1:].clamp(min=1.0)
        self.register_buffer("log_p_label", torch.log(p / p.sum()).to(torch.float32))

    @property
    def num_items(self) -> int:
        return int(self.cdf.shape[0])

    def sample(self, n: int) -> Tensor:
        """n vocabulary ids drawn i.i.d. from Q (with replacement): [n] int64 in 1..N."""
        cdf = self.cdf
        r = torch.rand(n, dtype=torch.float64).to(cdf.device)
        idx = torch.searchsorted(cdf, r, right=True).clamp_(max=cdf.shape[0] - 1)
        return idx + 1

    def forward(
        self, u: Tensor, item_weight: Tensor, labels: Tensor, *, sparse: bool = False
    ) -> Tensor:
        """Mean loss over the batch.

        u:           [B, d]      user vectors
        item_weight: [N + 1, d]  output item embeddings (row 0 = padding, never scored)
        labels:      [B]         vocabulary ids in 1..N
        sparse:      gather rows with sparse gradients (for large tables)
        """
        if self.full:
            # every item is a candidate, uncorrected; the label's column is masked as a hit
            # and scored as the positive instead: exactly the full softmax, in row chunks
            ids = torch.arange(1, item_weight.shape[0], device=labels.device)
            pos_v = F.embedding(labels, item_weight, sparse=sparse)
            cand_v = F.embedding(ids, item_weight, sparse=sparse)
            if self.normalize_items:
                pos_v, cand_v = F.normalize(pos_v, dim=1), F.normalize(cand_v, dim=1)
            bias = torch.zeros(ids.shape[0], device=u.device, dtype=u.dtype)
            return softmax_cross_entropy(
                u, pos_v, cand_v, bias, labels, ids, c_softmax_rows=self.c_softmax_rows
            )
        return self.sampled_loss(u, item_weight, labels, self.sample(self.num_negatives), sparse)

    def sampled_loss(
        self,
        u: Tensor,
        item_weight: Tensor,
        labels: Tensor,
        negatives: Tensor,
        sparse: bool = False,
    ) -> Tensor:
        """The sampled loss for given shared negatives [n] (drawn from Q); see the module doc."""
        # one gather for labels and negatives: one [N + 1, d] gradient to build, not two
        rows = self.gather_rows(item_weight, torch.cat([labels, negatives]), sparse)
        return self.rows_loss(u, rows, labels, negatives)

    def gather_rows(self, item_weight: Tensor, ids: Tensor, sparse: bool = False) -> Tensor:
        """item_weight[ids] [n, d], its gradient going to the table: the rows a sampled
        loss scores. sparse: a sparse gradient (large tables)."""
        if sparse or item_weight.device.type != "cpu":
            # (_GatherRows' index_add_ is not deterministic on a GPU)
            out: Tensor = F.embedding(ids, item_weight, sparse=sparse)
            return out
        rows: Tensor = _GatherRows.apply(item_weight, ids, self.c_row_sums)
        return rows

    def rows_loss(
        self,
        u: Tensor,
        rows: Tensor,
        labels: Tensor,
        negatives: Tensor,
        *,
        extra: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The sampled loss from the scored rows themselves: rows [B + n, d] are the
        labels' [B] vectors, then the shared negatives' [n] (negatives: their vocabulary
        ids, for the logQ correction and the accidental hits). A model whose item vectors
        are not rows of one table (the content tower's: id row + content) computes the
        rows of just these ids and passes them here; `sampled_loss` gathers them.

        extra: (added to the labels' logits [B], added to each (example, negative)
        logit [B, n], -inf to leave a pair out), for a term that is no dot product of one
        user vector with one item row (the content tower's item age at the example's
        time); gradients flow to both."""
        b = labels.shape[0]
        n = int(negatives.shape[0])
        m = b - 1 if self.in_batch_negatives else 0
        if extra is not None and (m > 0 or n == 0):
            raise FunnelrecError("sampled softmax: per-pair terms need shared negatives only")
        if self.normalize_items:
            rows = F.normalize(rows, dim=1)
        pos_v = rows[:b]  # [B, d]
        ids_parts, v_parts = [], []
        if n > 0:
            ids_parts.append(negatives)
            v_parts.append(rows[b:])  # [n, d]
        if m > 0:
            # example i against example k's label; the diagonal (the positive itself) and
            # equal labels elsewhere are masked as accidental hits
            ids_parts.append(labels)
            v_parts.append(pos_v)
        ids = torch.cat(ids_parts) if len(ids_parts) > 1 else ids_parts[0]
        cand_v = torch.cat(v_parts) if len(v_parts) > 1 else v_parts[0]
        if self.correction:
            # log of the expected number of times id j occurs among this batch's negatives
            terms = []
            if n > 0:
                terms.append(self.log_q[ids] + math.log(n))
            if m > 0:
                terms.append(self.log_p_label[ids] + math.log(m))
            log_count = terms[0] if len(terms) == 1 else torch.logaddexp(terms[0], terms[1])
            bias = -log_count.to(u.dtype)
        else:
            bias = torch.zeros(ids.shape[0], device=u.device, dtype=u.dtype)
        if m == 0 and n > 0:  # the candidates are rows[B:]: one gradient for the block
            pos_extra, pair_extra = extra if extra is not None else (None, None)
            out: Tensor = _FusedSoftmaxCERows.apply(
                u, rows, bias, labels, ids, self.c_softmax_rows, pos_extra, pair_extra
            )
            return out
        return softmax_cross_entropy(
            u, pos_v, cand_v, bias, labels, ids, c_softmax_rows=self.c_softmax_rows
        )


# Rows of the [B, C] logits handled at once: chunks of ~CHUNK_ELEMENTS floats keep the
# element-wise passes over the logits in cache (L3) while the matmuls stay large enough to
# run near peak. At the throughput benchmark's shape (C = 4,096) a chunk is the whole
# batch of 1,024 rows, which timed faster in the training step than 512- or 256-row
# chunks (docs/candidates.md, "Throughput").
CHUNK_ELEMENTS = 1 << 22

# The element-wise pass over a row chunk (bias, row maxima, shift, floor, exp, row sums)
# in C, one pass per row while it is in cache (funnelrec/kernels/_rowsoftmax.c), where it
# is built: torch makes six passes over the chunk, each reading it from memory. How much
# that saves in the training step: docs/candidates.md, "Throughput".
# CPU float32 only; `c_softmax_rows=False` gives torch's passes (A/B runs, tests).
_ROWS: Any = native.load("funnelrec.kernels._rowsoftmax")
if _ROWS is not None:
    _ROWS.rs_softmax_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    _ROWS.rs_softmax_rows.restype = None


def _fused_rows(logits: Tensor, bias: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """(top [c], z [c]) of a logits chunk [c, C] (without the bias [C]; accidental hits
    -inf), which becomes E [c, C]: top_i = max(max_j (o_ij + bias_j), pos_i),
    E_ij = exp(max(o_ij + bias_j - top_i, -50)) (0 at hits), z_i = sum_j E_ij.
    The torch code in `_loss_and_grads` computes the same (to ~1e-7 relative)."""
    c, cols = logits.shape
    top, z = torch.empty(c), torch.empty(c)

    def run(lo: int, hi: int) -> None:
        _ROWS.rs_softmax_rows(
            logits.data_ptr() + lo * cols * 4, hi - lo, cols, bias.data_ptr(),
            pos.data_ptr() + lo * 4, top.data_ptr() + lo * 4, z.data_ptr() + lo * 4,
        )  # fmt: skip

    native.split_rows(run, c)
    return top, z


def row_pass() -> str:
    """What runs the element-wise pass over CPU logits where a model asks for the C row
    pass: "C (AVX-512)" (or AVX2 / portable C), or "torch" where it was not built."""
    if _ROWS is None:
        return "torch"
    return f"C ({native.LEVELS[int(_ROWS.rs_level())]})"


def _can_fuse(*tensors: Tensor) -> bool:
    return _ROWS is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def softmax_cross_entropy(
    u: Tensor,
    pos_v: Tensor,
    cand_v: Tensor,
    cand_bias: Tensor,
    labels: Tensor,
    cand_ids: Tensor,
    *,
    c_softmax_rows: bool = True,
) -> Tensor:
    """Mean of -o_pos + log(exp(o_pos) + sum_c exp(u . v_c + bias_c)) over the batch, with
    candidate c masked out of row i when cand_ids[c] == labels[i] (accidental hits).

    u [B, d], pos_v [B, d] (the labels' output embeddings), cand_v [C, d] (the shared
    candidates' embeddings), cand_bias [C] (added to their logits: -log expected count),
    labels [B], cand_ids [C]. Gradients flow to u, pos_v and cand_v; the computation is
    fused over row chunks (see CHUNK_ELEMENTS), each chunk's element-wise pass in C where
    it is built and `c_softmax_rows`.
    """
    out: Tensor = _FusedSoftmaxCE.apply(
        u, pos_v, cand_v, cand_bias, labels, cand_ids, c_softmax_rows
    )
    return out


def _hits(labels: Tensor, cand_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every candidate equal to its row's label: [H], [H].

    Found by sorting the candidates and a binary search per label, not by comparing a
    [B, C] matrix: there are few hits (and B of them for in-batch candidates)."""
    ids, order = torch.sort(cand_ids)
    left = torch.searchsorted(ids, labels)
    count = torch.searchsorted(ids, labels, right=True) - left
    rows = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), count)
    # position of each hit within its row's run of equal ids
    starts = torch.cumsum(count, 0) - count
    within = torch.arange(rows.shape[0], device=labels.device) - starts[rows]
    return rows, order[left[rows] + within]


def _loss_and_grads(
    u: Tensor,
    pos_v: Tensor,
    cand_v: Tensor,
    cand_bias: Tensor,
    labels: Tensor,
    cand_ids: Tensor,
    grads: tuple[Tensor, Tensor, Tensor] | None,
    c_softmax_rows: bool,
    extra: tuple[Tensor, Tensor] | None = None,
    extra_grads: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The mean loss of `softmax_cross_entropy`, in row chunks; with `grads` = (grad_u
    [B, d], grad_pos [B, d], grad_cand [C, d]), its gradients written into them. extra:
    (pos_extra [B], pair_extra [B, C]) added to the positives' and the candidates'
    logits (-inf: a pair left out, as a hit), their gradients written into
    `extra_grads`."""
    need_grad = grads is not None
    # (without grads the names are bound to the inputs only to keep one code path; unused)
    grad_u, grad_pos, grad_cand = grads if grads is not None else (u, pos_v, cand_v)
    b, c_count = u.shape[0], cand_v.shape[0]
    hit_rows, hit_cols = _hits(labels, cand_ids)
    pos = (u * pos_v).sum(1)  # [B]: the label's logit, exact
    pair = None
    if extra is not None:
        pos = pos + extra[0].to(pos.dtype)
        pair = extra[1].to(u.dtype)
    cand_bias = cand_bias.contiguous()
    # the C row pass adds the bias to each row while it is in cache; torch adds it in the
    # matmul (a broadcast copy of the bias, then the product accumulated onto it)
    fused = c_softmax_rows and _can_fuse(cand_bias, pos)  # (the logits, from mm, are contiguous)
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    rows = max(1, CHUNK_ELEMENTS // max(c_count, 1))
    if need_grad and b == 0:
        grad_cand.zero_()  # no chunk to write it
    for lo in range(0, b, rows):
        hi = min(b, lo + rows)
        uc, pc = u[lo:hi], pos[lo:hi]
        logits = torch.mm(uc, cand_v.T) if fused else torch.addmm(cand_bias, uc, cand_v.T)
        sel = (hit_rows >= lo) & (hit_rows < hi)
        if pair is not None:
            logits.add_(pair[lo:hi])
        logits[hit_rows[sel] - lo, hit_cols[sel]] = float("-inf")
        # top >= every corrected logit of the row and the positive's (which is finite), so
        # E = exp(o + bias - top) <= 1, with the exponent floored at -50: below ~-87 exp
        # gives denormals, and products of small ones do too, each many times slower to
        # compute on CPU; next to the e^0 term, C terms of e^-50 change the sum by
        # < C * 2e-22
        if fused:
            top, z = _fused_rows(logits, cand_bias, pc)  # adds the bias; hits come out 0
        else:
            top = torch.maximum(logits.amax(1), pc)  # [c]
            logits.sub_(top[:, None]).clamp_(min=-50.0).exp_()
            logits[hit_rows[sel] - lo, hit_cols[sel]] = 0.0  # hits stay out of the sum
            if pair is not None:  # and the pairs left out
                logits.masked_fill_(pair[lo:hi] == float("-inf"), 0.0)
            z = logits.sum(1)
        e_pos = torch.exp(pc - top)
        z = z + e_pos  # [c]
        total += (torch.log(z) + top - pc).sum()
        if need_grad:
            # d(mean loss)/d(logit_ij) = (softmax_ij - onehot(positive)) / B, where
            # softmax_ij = E_ij / z_i
            inv = 1.0 / (z * b)  # [c]
            g_pos = e_pos * inv - 1.0 / b  # [c]
            grad_u[lo:hi] = (
                torch.mm(logits, cand_v).mul_(inv[:, None]).add_(g_pos[:, None] * pos_v[lo:hi])
            )
            grad_pos[lo:hi] = g_pos[:, None] * uc
            if extra_grads is not None:
                extra_grads[0][lo:hi] = g_pos
                torch.mul(logits, inv[:, None], out=extra_grads[1][lo:hi])
            # the first chunk writes grad_cand (beta 0: its contents are ignored), the
            # others add to it
            grad_cand.addmm_(logits.T, uc * inv[:, None], beta=0.0 if lo == 0 else 1.0)
    return (total / b).to(u.dtype)


class _FusedSoftmaxCE(torch.autograd.Function):
    """Loss and its gradients in one pass over row chunks (the gradients are computed in
    forward, as for a scalar loss they are fixed up to the incoming scalar)."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        pos_v: Tensor,
        cand_v: Tensor,
        cand_bias: Tensor,
        labels: Tensor,
        cand_ids: Tensor,
        c_softmax_rows: bool,
    ) -> Tensor:
        grads = None
        if any(ctx.needs_input_grad[:3]):
            grads = (torch.empty_like(u), torch.empty_like(pos_v), torch.empty_like(cand_v))
            ctx.save_for_backward(*grads)
        return _loss_and_grads(u, pos_v, cand_v, cand_bias, labels, cand_ids, grads, c_softmax_rows)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_u, grad_pos, grad_cand = _scaled(ctx.saved_tensors, grad_out)
        return grad_u, grad_pos, grad_cand, None, None, None, None


class _FusedSoftmaxCERows(torch.autograd.Function):
    """`_FusedSoftmaxCE` for positives and candidates that are one gathered block, rows[:B]
    and rows[B:]: its gradient is one [B + C, d] tensor, not two that autograd would
    widen to the block's size with zeros and add. With pos_extra [B] and pair_extra
    [B, C] (`rows_loss`'s `extra`), their gradients too."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        rows: Tensor,
        cand_bias: Tensor,
        labels: Tensor,
        cand_ids: Tensor,
        c_softmax_rows: bool,
        pos_extra: Tensor | None = None,
        pair_extra: Tensor | None = None,
    ) -> Tensor:
        b = u.shape[0]
        grads = None
        extra = None if pos_extra is None or pair_extra is None else (pos_extra, pair_extra)
        extra_grads = None
        saved: list[Tensor] = []
        if any(ctx.needs_input_grad[:2]) or (extra is not None and any(ctx.needs_input_grad[6:])):
            grad_u, grad_rows = torch.empty_like(u), torch.empty_like(rows)
            grads = (grad_u, grad_rows[:b], grad_rows[b:])
            saved = [grad_u, grad_rows]
            if extra is not None:
                extra_grads = (
                    torch.empty(b, dtype=u.dtype, device=u.device),
                    torch.empty(b, rows.shape[0] - b, dtype=u.dtype, device=u.device),
                )
                saved += list(extra_grads)
            ctx.save_for_backward(*saved)
        return _loss_and_grads(
            u, rows[:b], rows[b:], cand_bias, labels, cand_ids, grads, c_softmax_rows,
            extra, extra_grads,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        scaled = _scaled(ctx.saved_tensors, grad_out)
        if len(scaled) == 2:
            return scaled[0], scaled[1], None, None, None, None, None, None
        grad_u, grad_rows, grad_pos_extra, grad_pair = scaled
        return grad_u, grad_rows, None, None, None, None, grad_pos_extra, grad_pair


def _scaled(grads: tuple[Tensor, ...], grad_out: Tensor) -> tuple[Tensor, ...]:
    """The gradients computed in forward times the incoming scalar: as they are when it
    is 1, as for `loss.backward()` (on the CPU, where looking costs no device sync); the
    product would read and write [B + C, d] floats for nothing."""
    if grad_out.device.type == "cpu" and bool(grad_out == 1):
        return grads
    return tuple(g * grad_out for g in grads)


class _GatherRows(torch.autograd.Function):
    """weight[ids] with a dense gradient, deterministic (each row's terms added in index
    order). On the CPU through `rowsum` (funnelrec/kernels/_rowsum.c): the gather and each table
    row's sum in one pass, the ids' order by row found in forward. Else zeros +
    index_add_, which beats `F.embedding`'s backward because that sorts the ids first
    (docs/candidates.md, "Kernel choices")."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor, c_row_sums: bool) -> Tensor:
        ctx.rows = weight.shape[0]
        if c_row_sums and rowsum.usable(weight):
            terms = rowsum.terms_by_row(ids, ctx.rows)
            ctx.save_for_backward(*terms.tensors())
            ctx.sources = terms.sources
            return rowsum.gather(weight, ids)
        ctx.save_for_backward(ids)
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        if len(saved) > 1:
            return rowsum.gradient(rowsum.Terms.of(saved, ctx.sources), grad), None, None
        out = grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, saved[0], grad)
        return out, None, None


def full_softmax_loss(u: Tensor, item_weight: Tensor, labels: Tensor) -> Tensor:
    """Exact softmax cross-entropy over items 1..N (the test oracle and the `full` option).

    u: [B, d], item_weight: [N + 1, d], labels: [B] in 1..N. Returns the mean loss.
    """
    logits = u @ item_weight[1:].T  # [B, N]
    return F.cross_entropy(logits, labels - 1)
