"""AdamW applied to the sampled rows of the center shard alone (lazy Adam).

A row that is sampled in a step gets exactly torch.optim.AdamW's update (decoupled weight decay, both
moments, bias correction) with its own step count; a row that is not sampled is left as it is: no decay,
its moments do not decay and its step count does not advance. The per-row count `step` [num_local] sits in
the optimizer state next to `exp_avg` and `exp_avg_sq` [num_local, D] (the shard's storage dtype), so a
checkpoint reshards all three by rows. Both update modes of SparseSGD are available.
"""

from __future__ import annotations

import torch

from partial_fc.heads.row_copy import put_rows
from partial_fc.heads.row_tables import new_row_table
from partial_fc.heads.sampling import gather_rows
from partial_fc.heads.sparse_sgd import SampledRowsSource, SparseRowsOptimizer


class SparseAdamW(SparseRowsOptimizer):
    """torch.optim.AdamW (no amsgrad, no maximize) restricted to the sampled rows, with per-row step counts.

    Arithmetic is float32 (float64 for float64 shards) whatever the storage dtype. Call `step()` after
    every backward; `update_in_backward=False` keeps the sampled rows' gradients for gradient accumulation.
    """

    def __init__(
        self,
        head: SampledRowsSource,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        update_in_backward: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, eps={eps}, weight_decay={weight_decay} must not be negative")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas} must be two numbers in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(head, defaults, update_in_backward)
        weight = head.weight
        self.state[weight].update(
            step=torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device),
            exp_avg=new_row_table(weight.shape, weight.dtype, weight.device, zero=True),
            exp_avg_sq=new_row_table(weight.shape, weight.dtype, weight.device, zero=True),
        )
        self._exp_avg = torch.empty_like(head.workspace)
        self._exp_avg_sq = torch.empty_like(head.workspace)

    @torch.no_grad()
    def update_rows(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One AdamW step of rows `index` (working copy `rows`) by `grad`; rows, moments and counts written back.

        `grad` is used as scratch space for the denominator.
        """
        group = self.param_groups[0]
        weight = group["params"][0]
        state = self.state[weight]
        lr, (beta1, beta2) = group["lr"], group["betas"]
        steps = state["step"].index_select(0, index).add_(1)
        state["step"].index_copy_(0, index, steps)
        # bias corrections in float64 per row, as torch computes them in Python floats from its step count.
        exponent = steps.to(torch.float64)
        step_size = (lr / (1.0 - torch.pow(beta1, exponent))).to(rows.dtype).unsqueeze(1)
        bias_correction2_sqrt = (1.0 - torch.pow(beta2, exponent)).sqrt_().to(rows.dtype).unsqueeze(1)
        rows.mul_(1.0 - lr * group["weight_decay"])
        exp_avg = gather_rows(state["exp_avg"], index, self._exp_avg).lerp_(grad, 1.0 - beta1)
        exp_avg_sq = gather_rows(state["exp_avg_sq"], index, self._exp_avg_sq)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        put_rows(state["exp_avg"], index, exp_avg)
        put_rows(state["exp_avg_sq"], index, exp_avg_sq)
        denominator = torch.sqrt(exp_avg_sq, out=grad).div_(bias_correction2_sqrt).add_(group["eps"])
        rows.addcdiv_(exp_avg.mul_(step_size.neg_()), denominator)
        put_rows(weight, index, rows)
