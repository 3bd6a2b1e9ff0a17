"""SGD with momentum and weight decay applied to the sampled rows of the center shard alone.

`SparseRowsOptimizer` holds what every sparse center optimizer shares (SparseSGD here, SparseAdamW).

As in the MXNet Partial FC and PLSC's sparse momentum, a center that was not sampled in a step is frozen:
no decay, no momentum. No gradient of the whole shard is ever formed. By default the update is applied
during backward, a chunk of rows at a time, as soon as their gradient is known; with gradient
accumulation (`update_in_backward=False`) the sampled rows' gradients are kept and summed until `step()`.

SparseSGD keeps its momentum in the shard's storage dtype (`momentum_dtype="storage"`, as torch's SGD), or
compactly (`momentum_dtype="int8"`): one int8 code per element and one float32 scale per row, a quarter of
float32's bytes (half of bfloat16's). The code is square-root companded: c = sign(v) round(127 sqrt(|v| / a))
with a the row's largest |v|, decoded as v = sign(c) (c / 127)^2 a, so that the error of an element is at most
sqrt(|v| a) / 127 + a / 64516 (measured on Partial FC momentum rows: 0.73% of the row's norm, as linear int8's
0.74%, but 7.5% at most for elements of 1% of the row's maximum where linear int8 errs by up to 33%, and
none of them flushed to zero; float8 e4m3 errs by 2.6% of the norm). Each step decodes the sampled rows'
momentum, updates the rows with the exact new velocity and stores its code, so the update is the float
one up to the stored momentum's rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from partial_fc.heads.row_copy import put_rows, take_rows, update_int8_momentum, update_sgd_rows
from partial_fc.heads.row_tables import new_row_table
from partial_fc.heads.sampling import RowUpdater, SampledRows, gather_rows

# How SparseSGD may keep its momentum: in the shard's storage dtype, or as int8 codes with a scale per row.
MOMENTUM_DTYPES = ("storage", "int8")
# What a run may ask for the centers' momentum: one of those, or none (plain SGD for the centers).
CENTER_MOMENTUM_CHOICES = (*MOMENTUM_DTYPES, "none")
INT8_LEVELS = 127
# Rows whose largest |velocity| is below this are stored as zero (their gain 127^2 / max would overflow).
INT8_SMALLEST_ROW_MAX = 1e-30


def encode_int8_rows(velocity: torch.Tensor, codes: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Write `velocity`'s square-root companded int8 codes into `codes`; returns each row's largest |value|.

    c = sign(v) round(127 sqrt(|v| / a)), a the row's largest |v| (float32, [rows]). `scratch` is a buffer of
    velocity's shape and dtype; velocity itself is left as it is.
    """
    magnitude = torch.abs(velocity, out=scratch)
    row_max = magnitude.amax(dim=1)
    gain = torch.where(row_max >= INT8_SMALLEST_ROW_MAX, INT8_LEVELS**2 / row_max, 0.0)
    magnitude.mul_(gain.unsqueeze(1)).sqrt_().round_()
    torch.copysign(magnitude, velocity, out=magnitude)
    codes.copy_(magnitude)
    return row_max.to(torch.float32)


def decode_int8_rows(
    codes: torch.Tensor, row_max: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """`out` = sign(c) (c / 127)^2 * row_max, the values `encode_int8_rows` coded; `scratch` is like `out`."""
    out.copy_(codes)
    out.mul_(torch.abs(out, out=scratch))
    return out.mul_((row_max.to(out.dtype) / INT8_LEVELS**2).unsqueeze(1))


class SampledRowsSource(Protocol):
    """What the optimizer needs from a head: its shard, a [chunk, D] workspace, the rows each forward used."""

    weight: torch.Tensor
    workspace: torch.Tensor
    row_updater: RowUpdater | None

    def take_sampled(self) -> list[SampledRows]:
        """The sampled rows of every forward since the last call."""


def merge_sampled(records: list[SampledRows]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One (index, gradient) from the kept gradients of a step: with accumulation, a row's gradients are summed."""
    records = [record for record in records if record.grad is not None]
    if not records:
        return None
    if len(records) == 1:
        return records[0].index, records[0].grad
    index, inverse = torch.cat([record.index for record in records]).unique(return_inverse=True)
    grad = records[0].grad.new_zeros((index.numel(), records[0].grad.shape[1]))
    grad.index_add_(0, inverse, torch.cat([record.grad for record in records]))
    return index, grad


class SparseRowsOptimizer(torch.optim.Optimizer):
    """The machinery shared by the sparse center optimizers: a torch Optimizer over the head's shard alone.

    It registers itself as the head's row updater (`update_in_backward`) or collects the kept gradients
    in `step()`, and hands each chunk of sampled rows to `update_rows`, which subclasses implement.
    Call `step()` after every backward in either mode: it applies kept gradients and closes the step.
    Its per-row state is allocated whole at construction (`row_state_is_fixed`), so a checkpoint loaded into
    it must hold exactly those tensors.
    """

    row_state_is_fixed = True

    def __init__(self, head: SampledRowsSource, defaults: dict, update_in_backward: bool) -> None:
        super().__init__([head.weight], defaults)
        self.head = head
        self.grad_workspace = torch.empty_like(head.workspace) if update_in_backward else None
        head.row_updater = self if update_in_backward else None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply the gradients kept since the last step (none when updating during backward); returns closure()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        merged = merge_sampled(self.head.take_sampled())
        if merged is None:
            return loss
        index, grad = merged
        chunk = self.head.workspace.shape[0]
        for start in range(0, index.numel(), chunk):
            part = slice(start, start + chunk)
            self.update_rows(index[part], gather_rows(self.head.weight, index[part], self.head.workspace), grad[part])
        return loss

    def update_rows(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update shard rows `index`, whose current values are `rows` (a working copy), by `grad`; written back."""
        raise NotImplementedError


class SparseSGD(SparseRowsOptimizer):
    """torch.optim.SGD's update (momentum, no dampening, L2 weight decay) restricted to the sampled rows.

    A torch Optimizer over the head's shard, so LR schedulers and state_dict work as usual; the momentum
    buffer has the shard's shape and storage dtype (`momentum_buffer`), or with `momentum_dtype="int8"` it is
    kept as int8 codes `momentum_code` [rows, D] and a float32 scale per row `momentum_absmax` [rows] (see the
    module's notes). `momentum=0` keeps no state at all. Arithmetic is float32 (float64 for float64 shards).
    Call `step()` after every backward in either mode: it applies kept gradients and closes the step.
    """

    def __init__(
        self,
        head: SampledRowsSource,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        update_in_backward: bool = True,
        momentum_dtype: str = "storage",
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, momentum={momentum}, weight_decay={weight_decay} must not be negative")
        if momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(f"momentum_dtype={momentum_dtype!r} must be one of {', '.join(MOMENTUM_DTYPES)}")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), update_in_backward)
        self.momentum_dtype = momentum_dtype
        weight = head.weight
        if momentum > 0 and momentum_dtype == "int8":
            self.state[weight]["momentum_code"] = new_row_table(weight.shape, torch.int8, weight.device, zero=True)
            self.state[weight]["momentum_absmax"] = torch.zeros(
                weight.shape[0], dtype=torch.float32, device=weight.device
            )
            self._codes = torch.empty(head.workspace.shape, dtype=torch.int8, device=weight.device)
            self._scratch = torch.empty_like(head.workspace)
        elif momentum > 0:
            self.state[weight]["momentum_buffer"] = new_row_table(weight.shape, weight.dtype, weight.device, zero=True)
        self._velocity = torch.empty_like(head.workspace)

    @torch.no_grad()
    def update_rows(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """rows -= lr * velocity, velocity = momentum * velocity + grad + weight_decay * rows; written back.

        One C pass per row does all of it where it can (`row_copy.update_sgd_rows`), the torch ops below elsewhere.
        """
        group = self.param_groups[0]
        weight, lr, momentum, weight_decay = group["params"][0], group["lr"], group["momentum"], group["weight_decay"]
        int8 = momentum > 0 and self.momentum_dtype == "int8"
        momentum_buffer = self.state[weight]["momentum_buffer"] if momentum > 0 and not int8 else None
        velocity = self._velocity[: index.numel()]
        if not int8 and update_sgd_rows(
            weight, momentum_buffer, index, rows, grad, velocity, lr, momentum, weight_decay
        ):
            return
        if weight_decay:
            grad.add_(rows, alpha=weight_decay)
        if int8:
            grad = self._int8_velocity(self.state[weight], index, grad, momentum)
        elif momentum_buffer is not None:
            velocity = gather_rows(momentum_buffer, index, self._velocity)
            torch.add(grad, velocity, alpha=momentum, out=velocity)
            put_rows(momentum_buffer, index, velocity)
            grad = velocity
        rows.add_(grad, alpha=-lr)
        put_rows(weight, index, rows)

    def _int8_velocity(self, state: dict, index: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
        """momentum * velocity + grad of rows `index` from their int8 momentum, whose codes and scales it updates.

        The decoding is fused into the sum: velocity = grad + c * (|c| * momentum * row_max / 127^2). One C pass
        per row does all of it where it can (`row_copy.update_int8_momentum`), the torch ops below elsewhere.
        """
        count = index.numel()
        velocity, scratch, codes = self._velocity[:count], self._scratch[:count], self._codes[:count]
        if update_int8_momentum(
            state["momentum_code"],
            state["momentum_absmax"],
            index,
            grad,
            momentum / INT8_LEVELS**2,
            INT8_LEVELS**2,
            INT8_SMALLEST_ROW_MAX,
            velocity,
        ):
            return velocity
        take_rows(state["momentum_code"], index, codes)
        gain = state["momentum_absmax"].index_select(0, index).to(velocity.dtype).mul_(momentum / INT8_LEVELS**2)
        velocity.copy_(codes)
        torch.abs(velocity, out=scratch).mul_(gain.unsqueeze(1))
        torch.addcmul(grad, velocity, scratch, out=velocity)
        state["momentum_absmax"].index_copy_(0, index, encode_int8_rows(velocity, codes, scratch))
        put_rows(state["momentum_code"], index, codes)
        return velocity


def center_sgd(
    head: SampledRowsSource,
    lr: float,
    momentum: float,
    weight_decay: float,
    update_in_backward: bool,
    momentum_dtype: str = "storage",
) -> SparseSGD:
    """SparseSGD for the centers as a run configures them: `momentum_dtype` is one of `CENTER_MOMENTUM_CHOICES`,
    "none" meaning plain SGD for the centers, with no momentum state (the 20M-class setting on a small box)."""
    if momentum_dtype not in CENTER_MOMENTUM_CHOICES:
        raise ValueError(f"momentum_dtype={momentum_dtype!r} must be one of {', '.join(CENTER_MOMENTUM_CHOICES)}")
    plain = momentum_dtype == "none"
    return SparseSGD(
        head,
        lr=lr,
        momentum=0.0 if plain else momentum,
        weight_decay=weight_decay,
        update_in_backward=update_in_backward,
        momentum_dtype="storage" if plain else momentum_dtype,
    )
