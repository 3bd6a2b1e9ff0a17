"""Choosing which of a shard's class centers take part in a step: every positive, plus random negatives."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from partial_fc.heads.row_copy import take_rows


class SampledCenters(NamedTuple):
    """`index`: sorted local rows of the shard in use; (`rows`, `cols`): each held positive's batch row and column."""

    index: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def sample_centers(
    labels: torch.Tensor,
    class_start: int,
    num_local: int,
    num_sample: int,
    generator: torch.Generator | None,
) -> SampledCenters:
    """Keep every positive class of this shard found in `labels`, fill up to `num_sample` with uniform negatives.

    When there are more positives than `num_sample`, all positives are kept and no negative is drawn.
    """
    local = labels - class_start
    held = (local >= 0) & (local < num_local)
    rows = held.nonzero().squeeze(1)
    positives = local[rows]
    if num_sample >= num_local:
        return SampledCenters(torch.arange(num_local, device=labels.device), rows, positives)
    unique_positives = positives.unique()
    count = max(num_sample, unique_positives.numel())
    scores = torch.rand(num_local, generator=generator, device=labels.device)
    scores[unique_positives] = 2.0
    index = rows_of_largest(scores, count)
    return SampledCenters(index, rows, torch.searchsorted(index, positives))


def rows_of_largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The rows of the `count` largest of `scores` (uniform in [0, 1), or 2 to force a row), in ascending order.

    On a CPU, a top-k over the whole shard is most of the sampling's cost. The rows above a cutoff that keeps more
    than `count` uniform scores with six standard deviations to spare are found in one pass, and the top-k runs over
    them; should too few pass (about one draw in 10^9), over all rows.
    """
    cutoff = 1.0 - (count + 6.0 * count**0.5 + 64) / scores.numel()
    if scores.device.type == "cpu" and cutoff > 0:
        candidates = (scores >= cutoff).nonzero().squeeze(1)
        if candidates.numel() >= count:
            return candidates[scores[candidates].topk(count, sorted=False).indices.sort().values]
    return scores.topk(count, sorted=False).indices.sort().values


class RowUpdater(Protocol):
    """Applies an optimizer update to shard rows as soon as their gradient is known (during backward)."""

    grad_workspace: torch.Tensor

    def update_rows(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update shard rows `index`, whose current values are `rows` (a float working copy), by `grad`."""


class SampledRows:
    """The shard rows one forward pass used, and what backward does with their gradient.

    Without an updater the gradient is kept (`grad`, [S, D]) for the optimizer's step. With one, each
    chunk's gradient is written into the updater's small workspace and applied at once, so no [S, D]
    gradient ever exists and the rows are read from the shard once fewer.
    """

    __slots__ = ("index", "grad", "updater")

    def __init__(self, index: torch.Tensor, updater: RowUpdater | None = None) -> None:
        self.index = index
        self.grad: torch.Tensor | None = None
        self.updater = updater

    def gradient_buffer(self, part: slice, like: torch.Tensor) -> torch.Tensor:
        """Where backward writes the gradient of the sampled rows `part` (dtype and width of `like`)."""
        if self.updater is not None:
            return self.updater.grad_workspace[: part.stop - part.start]
        if self.grad is None:
            self.grad = like.new_empty((self.index.numel(), like.shape[1]))
        return self.grad[part]

    def gradient_done(self, part: slice, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """The gradient of rows `part` is complete: apply it now if an updater is attached."""
        if self.updater is not None:
            self.updater.update_rows(self.index[part], rows, grad)


def gather_rows(source: torch.Tensor, index: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """source[index] in `workspace`'s dtype, written into the front of the reusable `workspace` buffer.

    Reusing one buffer per chunk keeps the allocator out of the hot loop (no page faults, no heap growth).
    """
    return take_rows(source, index, workspace[: index.numel()])
