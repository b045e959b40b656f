"""RowSparseAdam: SparseAdam's update, row block by row block."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import FunnelrecError
from funnelrec.training.sparse_adam import RowSparseAdam


def _grads(seed: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        rows = torch.randint(0, 30, (25,), generator=g)  # repeats: not coalesced
        out.append(
            torch.sparse_coo_tensor(
                rows[None], torch.randn(25, 4, generator=g), (30, 4), check_invariants=True
            )
        )
    out.append(
        torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4), (30, 4), check_invariants=True
        )
    )
    return out


@pytest.mark.parametrize("lr", [1e-3, 0.05])
def test_same_updates_as_sparse_adam(lr: float) -> None:
    init = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.Parameter(init.clone())
    ours = torch.nn.Parameter(init.clone())
    opt_ref = torch.optim.SparseAdam([ref], lr=lr, betas=(0.8, 0.99))
    opt = RowSparseAdam([ours], lr=lr, betas=(0.8, 0.99))
    for grad in _grads(0, 8):
        ref.grad, ours.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[ours][key], opt_ref.state[ref][key])
    assert opt.state[ours]["step"] == opt_ref.state[ref]["step"] == 9
    untouched = torch.ones(30, dtype=torch.bool)
    for grad in _grads(0, 8):
        untouched[grad.coalesce().indices()[0]] = False
    assert torch.equal(ours.detach()[untouched], init[untouched])


def test_state_round_trips_and_resumes_identically() -> None:
    grads = _grads(3, 6)
    a = torch.nn.Parameter(torch.ones(30, 4))
    opt_a = RowSparseAdam([a], lr=0.01)
    for grad in grads:
        a.grad = grad.clone()
        opt_a.step()
    b = torch.nn.Parameter(torch.ones(30, 4))
    opt_b = RowSparseAdam([b], lr=0.01)
    for grad in grads[:3]:
        b.grad = grad.clone()
        opt_b.step()
    state = opt_b.state_dict()
    c = torch.nn.Parameter(b.detach().clone())
    opt_c = RowSparseAdam([c], lr=0.01)
    opt_c.load_state_dict(state)
    for grad in grads[3:]:
        c.grad = grad.clone()
        opt_c.step()
    assert torch.equal(c.detach(), a.detach())


def test_dense_gradients_and_bad_settings_are_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(FunnelrecError, match="sparse gradients only"):
        RowSparseAdam([p]).step()
    with pytest.raises(FunnelrecError, match="bad lr"):
        RowSparseAdam([p], lr=0.0)
