"""Adam for embedding tables with sparse gradients, one gathered block of rows per step.

The update is `torch.optim.SparseAdam`'s (lazy Adam: only the rows a batch touched move,
their moments decay only when touched, the bias correction counts the table's steps), the
same numbers to float rounding. It works on the touched rows as one dense block: gather
the rows' moments, update them in place, scatter them back, add the step to the weights.
SparseAdam instead builds sparse tensors and masks the dense moments with them, which
was slower on one thread, and at 1M items the optimizer dominated the candidate model's
step (docs/candidates.md, "Training").

    opt = RowSparseAdam([table.weight], lr=1e-3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from funnelrec.errors import FunnelrecError


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam over the rows of sparse gradients (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise FunnelrecError(f"RowSparseAdam: bad lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "maximize": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise FunnelrecError(
                        "RowSparseAdam takes sparse gradients only (use AdamW for dense ones)"
                    )
                grad = grad.coalesce()
                state: dict[str, Any] = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                rows = grad._indices()[0]
                values = grad._values()
                if values.numel() == 0:
                    continue
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                m = exp_avg.index_select(0, rows)
                v = exp_avg_sq.index_select(0, rows)
                m.lerp_(values, 1 - beta1)
                v.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                step = state["step"]
                step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                update = m.div_(v.sqrt_().add_(eps)).mul_(-step_size)
                p.index_add_(0, rows, update)
        return loss
