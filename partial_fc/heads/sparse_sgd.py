"""SGD with momentum and weight decay applied to the sampled rows of the center shard alone.

`SparseRowsOptimizer` holds what every sparse center optimizer shares (SparseSGD here, SparseAdamW).

As in the MXNet Partial FC and PLSC's sparse momentum, a center that was not sampled in a step is frozen:
no decay, no momentum. No gradient of the whole shard is ever formed. By default the update is applied
during backward, a chunk of rows at a time, as soon as their gradient is known; with gradient
accumulation (`update_in_backward=False`) the sampled rows' gradients are kept and summed until `step()`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from partial_fc.heads.sampling import RowUpdater, SampledRows, gather_rows


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


def write_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """target[index] = rows, rounded to target's (storage) dtype."""
    target.index_copy_(0, index, rows.to(target.dtype))


class SparseRowsOptimizer(torch.optim.Optimizer):
    """The machinery shared by the sparse center optimizers: a torch Optimizer over the head's shard alone.

    It registers itself as the head's row updater (`update_in_backward`) or collects the kept gradients
    in `step()`, and hands each chunk of sampled rows to `update_rows`, which subclasses implement.
    Call `step()` after every backward in either mode: it applies kept gradients and closes the step.
    """

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
    buffer has the shard's shape and storage dtype. Arithmetic is float32 (float64 for float64 shards).
    Call `step()` after every backward in either mode: it applies kept gradients and closes the step.
    """

    def __init__(
        self,
        head: SampledRowsSource,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        update_in_backward: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, momentum={momentum}, weight_decay={weight_decay} must not be negative")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), update_in_backward)
        if momentum > 0:
            self.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
        self._velocity = torch.empty_like(head.workspace)

    @torch.no_grad()
    def update_rows(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """rows -= lr * velocity, velocity = momentum * velocity + grad + weight_decay * rows; written back."""
        group = self.param_groups[0]
        weight = group["params"][0]
        if group["weight_decay"]:
            grad.add_(rows, alpha=group["weight_decay"])
        if group["momentum"] > 0:
            momentum_buffer = self.state[weight]["momentum_buffer"]
            velocity = gather_rows(momentum_buffer, index, self._velocity)
            torch.add(grad, velocity, alpha=group["momentum"], out=velocity)
            write_rows(momentum_buffer, index, velocity)
            grad = velocity
        rows.add_(grad, alpha=-group["lr"])
        write_rows(weight, index, rows)
