"""Sampled softmax with the logQ correction, against the full softmax as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from funnelrec.errors import FunnelrecError
from funnelrec.kernels import softmax as softmax_module
from funnelrec.kernels.softmax import Proposal, SampledSoftmax, full_softmax_loss

torch.set_num_threads(1)


def zipf_counts(n: int, s: float = 1.2) -> torch.Tensor:
    """[n + 1] label counts, id 1 the most frequent (counts[0] unused)."""
    c = 10_000.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return torch.cat([torch.zeros(1, dtype=torch.float64), c.round().clamp(min=1)])


def test_proposal_kinds() -> None:
    counts = zipf_counts(100)
    for kind in ("unigram", "log_uniform", "uniform"):
        q = Proposal.from_counts(counts, kind=kind, alpha=0.75)
        assert q.probs[0] == 0
        assert q.probs.sum().item() == pytest.approx(1.0)
        assert (q.probs[1:] > 0).all()
    uni = Proposal.from_counts(counts, kind="unigram", alpha=0.75).probs
    w = counts[1:] ** 0.75
    torch.testing.assert_close(uni[1:], w / w.sum())
    lu = Proposal.from_counts(counts, kind="log_uniform").probs
    assert lu[1].item() == pytest.approx(math.log(2) / math.log(101))
    assert (lu[1:-1] > lu[2:]).all()  # decreasing with the id
    u = Proposal.from_counts(counts, kind="uniform").probs
    torch.testing.assert_close(u[1:], torch.full((100,), 0.01, dtype=torch.float64))


def test_unigram_floors_unseen_items_so_log_q_is_finite() -> None:
    counts = torch.tensor([0.0, 5.0, 0.0, 3.0])
    q = Proposal.from_counts(counts, kind="unigram", alpha=1.0)
    assert q.probs[2] > 0
    loss_fn = SampledSoftmax(q, num_negatives=8)
    assert torch.isfinite(loss_fn.log_q[1:]).all()


def test_bad_proposal_is_a_clear_error() -> None:
    with pytest.raises(FunnelrecError, match="unknown proposal"):
        Proposal.from_counts(zipf_counts(5), kind="zipf")
    with pytest.raises(FunnelrecError, match="num_negatives"):
        SampledSoftmax(Proposal.from_counts(zipf_counts(5)), num_negatives=0)


def test_samples_follow_q_and_never_padding() -> None:
    q = Proposal.from_counts(zipf_counts(20), kind="unigram", alpha=0.75)
    loss_fn = SampledSoftmax(q, num_negatives=10)
    torch.manual_seed(0)
    s = loss_fn.sample(200_000)
    assert s.min() >= 1 and s.max() <= 20
    freq = torch.bincount(s, minlength=21).double() / s.numel()
    torch.testing.assert_close(freq, q.probs, atol=4e-3, rtol=0)
    torch.manual_seed(0)
    assert torch.equal(loss_fn.sample(1000), s[:1000])


def test_full_softmax_matches_cross_entropy_by_hand() -> None:
    torch.manual_seed(0)
    u, w = torch.randn(3, 4), torch.randn(6, 4)
    labels = torch.tensor([1, 5, 2])
    logits = u @ w.T
    manual = torch.stack([-(logits[i, 1:].log_softmax(-1)[labels[i] - 1]) for i in range(3)]).mean()
    assert full_softmax_loss(u, w, labels).item() == pytest.approx(manual.item(), rel=1e-6)


def _reference_loss(
    u: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    negatives: list[list[int]],
    log_count: torch.Tensor,
) -> torch.Tensor:
    """Per-example loop: the label exact, each listed negative corrected by log_count."""
    losses = []
    for i in range(labels.shape[0]):
        o_y = u[i] @ w[labels[i]]
        terms = [o_y] + [u[i] @ w[j] - log_count[j] for j in negatives[i]]
        losses.append(torch.logsumexp(torch.stack(terms), 0) - o_y)
    return torch.stack(losses).mean()


def test_full_option_matches_the_oracle_in_value_and_gradient() -> None:
    torch.manual_seed(4)
    q = Proposal.from_counts(zipf_counts(50))
    loss_fn = SampledSoftmax(q, full=True)
    u = torch.randn(7, 6, requires_grad=True)
    w = torch.randn(51, 6, requires_grad=True)
    labels = torch.randint(1, 51, (7,))
    got = loss_fn(u, w, labels)
    g_got = torch.autograd.grad(got, [u, w])
    want = full_softmax_loss(u, w, labels)
    g_want = torch.autograd.grad(want, [u, w])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_accidental_hits_never_appear_as_negatives() -> None:
    torch.manual_seed(1)
    n_items = 10
    q = Proposal.from_counts(zipf_counts(n_items), kind="unigram")
    loss_fn = SampledSoftmax(q, num_negatives=6)
    u, w = torch.randn(3, 5), torch.randn(n_items + 1, 5, requires_grad=True)
    labels = torch.tensor([2, 7, 2])
    negatives = torch.tensor([2, 3, 7, 2, 9, 1])  # hits for every example
    got = loss_fn.sampled_loss(u, w, labels, negatives)
    log_count = loss_fn.log_q.double() + math.log(6)
    kept = [[j for j in negatives.tolist() if j != y] for y in labels.tolist()]
    want = _reference_loss(u.double(), w.double(), labels, kept, log_count)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g_got,) = torch.autograd.grad(got, w)
    (g_want,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(g_got, g_want.float(), rtol=1e-4, atol=1e-6)
    # the label's embedding gets only the positive's pull: its gradient is -(1 - p) u, never
    # a push from being drawn as its own negative
    (g,) = torch.autograd.grad(loss_fn.sampled_loss(u[:1], w, labels[:1], negatives), w)
    assert torch.all(g[2] @ u[0] < 0)


def test_in_batch_negatives_mask_equal_labels_and_use_the_combined_correction() -> None:
    torch.manual_seed(2)
    n_items = 8
    counts = zipf_counts(n_items)
    q = Proposal.from_counts(counts, kind="uniform")
    loss_fn = SampledSoftmax(q, label_counts=counts, num_negatives=3, in_batch_negatives=True)
    u, w = torch.randn(4, 3), torch.randn(n_items + 1, 3)
    labels = torch.tensor([1, 4, 1, 6])
    negatives = torch.tensor([5, 4, 8])
    got = loss_fn.sampled_loss(u, w, labels, negatives)
    p = counts / counts[1:].sum()
    expected_count = 3 * q.probs + 3 * p  # n Q(j) + (B - 1) P(j)
    kept = [
        [j for j in negatives.tolist() if j != y]
        + [labels[k].item() for k in range(4) if labels[k].item() != y]
        for y in labels.tolist()
    ]
    want = _reference_loss(u.double(), w.double(), labels, kept, expected_count.log())
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    only_in_batch = SampledSoftmax(q, label_counts=counts, num_negatives=0, in_batch_negatives=True)
    got = only_in_batch.sampled_loss(u, w, labels, torch.zeros(0, dtype=torch.long))
    kept = [[labels[k].item() for k in range(4) if labels[k].item() != y] for y in labels.tolist()]
    want = _reference_loss(u.double(), w.double(), labels, kept, (3 * p).log())
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def _grad_error(loss_fn: SampledSoftmax, n: int, seeds: int = 3) -> float:
    """Relative error of the sampled gradient (w.r.t. u and the item table) vs the full one."""
    gen = torch.Generator().manual_seed(3)
    n_items, d = loss_fn.num_items, 8
    u = torch.randn(16, d, generator=gen, dtype=torch.float64)
    w = (0.7 * torch.randn(n_items + 1, d, generator=gen, dtype=torch.float64)).requires_grad_()
    uu = u.clone().requires_grad_()
    labels = torch.randint(1, n_items + 1, (16,), generator=gen)
    full = torch.autograd.grad(full_softmax_loss(uu, w, labels), [uu, w])
    ref = torch.cat([g.flatten() for g in full])
    errs = []
    for s in range(seeds):
        torch.manual_seed(100 + s)
        loss = loss_fn.sampled_loss(uu, w, labels, loss_fn.sample(n))
        got = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [uu, w])])
        errs.append(((got - ref).norm() / ref.norm()).item())
    return sum(errs) / len(errs)


def test_sampled_gradient_approaches_full_gradient_as_negatives_grow() -> None:
    n_items = 200
    q = Proposal.from_counts(zipf_counts(n_items), kind="unigram", alpha=0.75)
    corrected = SampledSoftmax(q, num_negatives=1)
    errors = [_grad_error(corrected, n) for n in (20, 200, 2000, 20_000)]
    assert errors[0] > errors[1] > errors[2] > errors[3]  # about 1 / sqrt(n)
    assert errors[-1] < 0.05
    # without the correction the estimate converges to something else
    plain = SampledSoftmax(q, num_negatives=1, correction=False)
    assert _grad_error(plain, 20_000) > 4 * errors[-1]


@pytest.mark.parametrize(
    ("num_negatives", "in_batch"), [(128, False), (0, True), (32, True)], ids=str
)
def test_logq_correction_recovers_the_true_item_distribution(
    num_negatives: int, in_batch: bool
) -> None:
    """Labels from a known, skewed distribution P; a model that can represent any
    distribution (one free logit per item) is trained with negatives from the default
    Q = P^0.75 (and/or in-batch, i.e. from P itself). With the correction it learns P;
    without it, popular items are over-sampled as negatives and pushed down."""
    n_items = 30
    true_p = torch.arange(n_items, 0, -1, dtype=torch.float64) ** 2.0
    true_p = true_p / true_p.sum()  # id 1 the most likely, 900 times id 30
    counts = torch.cat([torch.zeros(1, dtype=torch.float64), (true_p * 1e6).round()])
    q = Proposal.from_counts(counts, kind="unigram", alpha=0.75)

    def learned(correction: bool) -> torch.Tensor:
        torch.manual_seed(0)
        loss_fn = SampledSoftmax(
            q,
            label_counts=counts,
            num_negatives=num_negatives,
            in_batch_negatives=in_batch,
            correction=correction,
        )
        w = torch.zeros(n_items + 1, 1, requires_grad=True)  # logit of item j = w_j
        opt = torch.optim.Adam([w], lr=0.03)
        u = torch.ones(256, 1)
        for _ in range(200):
            labels = torch.multinomial(true_p, 256, replacement=True) + 1
            loss = loss_fn(u, w, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.softmax(w.detach()[1:, 0].double(), 0)

    tv_with = 0.5 * (learned(True) - true_p).abs().sum().item()
    tv_without = 0.5 * (learned(False) - true_p).abs().sum().item()
    assert tv_with < 0.08
    assert tv_without > 0.2


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_row_chunks_give_the_same_loss_and_gradients(
    chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from funnelrec.kernels import softmax

    g = torch.Generator().manual_seed(5)
    b, c, d = 13, 11, 4
    labels = torch.randint(1, 9, (b,), generator=g)
    cand_ids = torch.randint(1, 9, (c,), generator=g)  # with accidental hits
    tensors = [torch.randn(*s, generator=g) for s in ((b, d), (b, d), (c, d))]
    bias = torch.randn(c, generator=g)

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in tensors]
        loss = softmax.softmax_cross_entropy(*leaves, bias, labels, cand_ids)
        loss.backward()
        return [loss.detach()] + [leaf.grad for leaf in leaves if leaf.grad is not None]

    whole = run()  # one chunk: b * c is far below CHUNK_ELEMENTS
    monkeypatch.setattr(softmax, "CHUNK_ELEMENTS", chunk_rows * c)
    for got, want in zip(run(), whole, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("normalize", [False, True])
def test_one_block_of_rows_gives_the_general_paths_loss_and_gradients(normalize: bool) -> None:
    """Without in-batch negatives the labels' and negatives' rows are one gathered block
    (one gradient, gathered by index_add_); the same numbers as the general path, with
    separate positive and candidate tensors gathered by F.embedding."""
    import torch.nn.functional as F

    from funnelrec.kernels import softmax

    g = torch.Generator().manual_seed(3)
    n_items, b, n, d = 40, 9, 25, 6
    q = Proposal.from_counts(torch.rand(n_items + 1, generator=g) * 10, alpha=0.75)
    loss_fn = SampledSoftmax(q, num_negatives=n, normalize_items=normalize)
    labels = torch.randint(1, n_items + 1, (b,), generator=g)
    negatives = torch.randint(1, n_items + 1, (n,), generator=g)  # repeats and hits
    u0 = torch.randn(b, d, generator=g)
    w0 = torch.randn(n_items + 1, d, generator=g)

    u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    fast = loss_fn.sampled_loss(u, w, labels, negatives)
    fast.backward()

    u2, w2 = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    pos_v, cand_v = F.embedding(labels, w2), F.embedding(negatives, w2)
    if normalize:
        pos_v, cand_v = F.normalize(pos_v, dim=1), F.normalize(cand_v, dim=1)
    bias = -(loss_fn.log_q[negatives] + math.log(n)).float()
    general = softmax.softmax_cross_entropy(u2, pos_v, cand_v, bias, labels, negatives)
    general.backward()

    torch.testing.assert_close(fast, general)
    torch.testing.assert_close(u.grad, u2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_a_scaled_loss_scales_the_gradients() -> None:
    """The gradients are computed in forward; backward must still apply the incoming
    scalar when it is not 1 (a loss weight, an averaged sum of losses)."""
    g = torch.Generator().manual_seed(4)
    q = Proposal.from_counts(torch.rand(31, generator=g) + 0.1, alpha=0.75)
    loss_fn = SampledSoftmax(q, num_negatives=12)
    labels = torch.randint(1, 31, (5,), generator=g)
    negatives = torch.randint(1, 31, (12,), generator=g)
    u0, w0 = torch.randn(5, 3, generator=g), torch.randn(31, 3, generator=g)
    grads = []
    for scale in (1.0, -2.5):
        u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
        (scale * loss_fn.sampled_loss(u, w, labels, negatives)).backward()
        grads.append((u.grad, w.grad))
    (u1, w1), (u2, w2) = grads
    torch.testing.assert_close(u2, -2.5 * u1)
    torch.testing.assert_close(w2, -2.5 * w1)


_FUSED = pytest.mark.skipif(
    softmax_module._ROWS is None, reason="the C row pass was not built (no compiler at install)"
)


def _loss_and_grads_both_ways(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[torch.Tensor, ...]]:
    """Loss and gradients of a sampled loss with hits, in row chunks, through the C row
    pass and through torch's element-wise ops."""
    from funnelrec.kernels import softmax

    g = torch.Generator().manual_seed(5)
    n_items, b, n, d = 300, 150, 700, 16
    q = Proposal.from_counts(torch.rand(n_items + 1, generator=g) * 10, alpha=0.75)
    labels = torch.randint(1, n_items + 1, (b,), generator=g)
    negatives = torch.randint(1, n_items + 1, (n,), generator=g)  # repeats and hits
    u0, w0 = torch.randn(b, d, generator=g) * 2, torch.randn(n_items + 1, d, generator=g)
    monkeypatch.setattr(softmax, "CHUNK_ELEMENTS", 64 * n)  # three row chunks
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    out = []
    for fused in (True, False):
        loss_fn = SampledSoftmax(q, num_negatives=n, c_softmax_rows=fused)
        u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = loss_fn.sampled_loss(u, w, labels, negatives)
        loss.backward()
        assert u.grad is not None and w.grad is not None
        out.append((loss.detach(), u.grad, w.grad))
    return out


@_FUSED
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_row_pass_gives_torchs_loss_and_gradients(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused, plain = _loss_and_grads_both_ways(threads, monkeypatch)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    again, _ = _loss_and_grads_both_ways(threads, monkeypatch)
    for a, b in zip(fused, again, strict=True):  # the same numbers every run
        assert torch.equal(a, b)


@_FUSED
def test_every_instruction_set_of_the_row_pass_agrees() -> None:
    """AVX-512, AVX2 and portable C: the row maxima exactly, E and z to rounding; hits
    (-inf) give 0."""
    from funnelrec.kernels import softmax

    lib = softmax._ROWS
    g = torch.Generator().manual_seed(6)
    logits0 = torch.randn(70, 301, generator=g) * 8  # columns not a multiple of 32
    logits0[3, 7] = logits0[50, 300] = float("-inf")
    bias, pos = -torch.rand(301, generator=g) * 30, torch.randn(70, generator=g) * 8
    got = {}
    try:
        for level in range(lib.rs_level(), -1, -1):
            assert lib.rs_force_level(level) == level
            logits = logits0.clone()
            top, z = softmax._fused_rows(logits, bias, pos)
            got[level] = (logits, top, z)
    finally:
        lib.rs_force_level(-1)
    corrected = logits0 + bias
    e_ref = torch.exp((corrected - got[0][1][:, None]).clamp(min=-50.0))
    e_ref[3, 7] = e_ref[50, 300] = 0.0
    for logits, top, z in got.values():
        torch.testing.assert_close(top, torch.maximum(corrected.amax(1), pos), rtol=0, atol=0)
        torch.testing.assert_close(logits, e_ref, rtol=3e-7, atol=0)
        torch.testing.assert_close(z, e_ref.sum(1), rtol=2e-6, atol=0)
        assert logits[3, 7] == 0 and logits[50, 300] == 0


def _sampled_loss_as_it_was(
    sm: SampledSoftmax, u: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    negatives: torch.Tensor, sparse: bool,
) -> torch.Tensor:  # fmt: skip
    """`SampledSoftmax.sampled_loss` before it was split into gather_rows + rows_loss."""
    b, n = labels.shape[0], int(negatives.shape[0])
    m = b - 1 if sm.in_batch_negatives else 0
    all_ids = torch.cat([labels, negatives])
    if sparse:
        rows = torch.nn.functional.embedding(all_ids, weight, sparse=True)
    else:
        rows = softmax_module._GatherRows.apply(weight, all_ids, sm.c_row_sums)
    if sm.normalize_items:
        rows = torch.nn.functional.normalize(rows, dim=1)
    pos_v = rows[:b]
    ids_parts, v_parts = [], []
    if n > 0:
        ids_parts.append(negatives)
        v_parts.append(rows[b:])
    if m > 0:
        ids_parts.append(labels)
        v_parts.append(pos_v)
    ids = torch.cat(ids_parts) if len(ids_parts) > 1 else ids_parts[0]
    cand_v = torch.cat(v_parts) if len(v_parts) > 1 else v_parts[0]
    terms = []
    if n > 0:
        terms.append(sm.log_q[ids] + math.log(n))
    if m > 0:
        terms.append(sm.log_p_label[ids] + math.log(m))
    log_count = terms[0] if len(terms) == 1 else torch.logaddexp(terms[0], terms[1])
    bias = -log_count.to(u.dtype)
    if m == 0 and n > 0:
        out: torch.Tensor = softmax_module._FusedSoftmaxCERows.apply(
            u, rows, bias, labels, ids, sm.c_softmax_rows
        )
        return out
    return softmax_module.softmax_cross_entropy(
        u, pos_v, cand_v, bias, labels, ids, c_softmax_rows=sm.c_softmax_rows
    )


@pytest.mark.parametrize(
    ("in_batch", "normalize", "sparse"),
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_the_sampled_loss_split_in_two_is_the_one_it_was(
    in_batch: bool, normalize: bool, sparse: bool
) -> None:
    """gather_rows + rows_loss (what the id-only model runs) give the numbers of the
    single function they were cut from, bit for bit, loss and gradients."""
    n_items, d = 50, 8
    q = Proposal.from_counts(zipf_counts(n_items))
    sm = SampledSoftmax(q, num_negatives=16, in_batch_negatives=in_batch, normalize_items=normalize)
    g = torch.Generator().manual_seed(0)
    u0 = torch.randn(6, d, generator=g)
    w0 = torch.randn(n_items + 1, d, generator=g)
    labels = torch.randint(1, n_items + 1, (6,), generator=g)
    negatives = sm.sample(16)
    grads = []
    for fn in (sm.sampled_loss, lambda *a: _sampled_loss_as_it_was(sm, *a)):
        u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(u, w, labels, negatives, sparse)
        loss.backward()
        assert u.grad is not None and w.grad is not None
        wg = w.grad.to_dense() if w.grad.is_sparse else w.grad
        grads.append((loss.detach(), u.grad, wg))
    for new, old in zip(grads[0], grads[1], strict=True):
        assert torch.equal(new, old)


def test_rows_loss_scores_rows_that_are_not_one_tables() -> None:
    """The content tower's rows (an id row plus a content vector, for just the scored
    ids) give the loss of the table they would form, and its gradient reaches both."""
    n_items, d = 40, 8
    sm = SampledSoftmax(Proposal.from_counts(zipf_counts(n_items)), num_negatives=12)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(5, d, generator=g)
    ids_w = torch.randn(n_items + 1, d, generator=g).requires_grad_()
    content = torch.randn(n_items + 1, d, generator=g).requires_grad_()
    labels = torch.randint(1, n_items + 1, (5,), generator=g)
    negatives = sm.sample(12)
    scored = torch.cat([labels, negatives])
    rows = sm.gather_rows(ids_w, scored) + content[scored]
    loss = sm.rows_loss(u, rows, labels, negatives)
    loss.backward()
    assert ids_w.grad is not None and content.grad is not None
    torch.testing.assert_close(ids_w.grad, content.grad)  # d loss / d row, either part
    table = (ids_w + content).detach().requires_grad_()
    whole = sm.sampled_loss(u, table, labels, negatives)
    whole.backward()
    torch.testing.assert_close(loss, whole)
    assert table.grad is not None
    torch.testing.assert_close(ids_w.grad, table.grad)
