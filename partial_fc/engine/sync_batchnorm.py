"""Batch normalisation whose statistics span every rank's batch, over a `Communicator` (any backend, CPU or GPU).

With it a training step on W ranks equals one process with plain BatchNorm on the concatenated batch. Forward
normalises with the global mean and variance: one all-gather of each rank's count, mean and centred sum of
squares, combined as in Chan et al.'s parallel variance (no cancellation of large sums of squares). Backward
all-reduces the two per-channel sums the input gradient needs. The weight and bias gradients stay this rank's
sums; the backbone's averaging all-reduce makes them global under PartialFC's gradient convention (each rank's
upstream gradient is world_size times its share), exactly as it does for every other parameter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from partial_fc.comm import Communicator, ReduceOp

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an [N, C, ...] input."""
    return values.view(1, -1, *([1] * (like.dim() - 2)))


def global_moments(x: torch.Tensor, comm: Communicator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the batch gathered over every rank, and its size per channel (a
    tensor, so that no layer waits on the device)."""
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.shape[1]
    mean = x.mean(dim=dims)
    centred = (x - _channel_view(mean, x)).square().sum(dim=dims)
    local = torch.stack([torch.full_like(mean, count), mean, centred]).unsqueeze(0)
    every = comm.all_gather(local, sizes=[1] * comm.world_size)  # [W, 3, C]
    counts, means, sums = every[:, 0], every[:, 1], every[:, 2]
    total = counts.sum(dim=0)
    global_mean = (counts * means).sum(dim=0) / total
    spread = (sums + counts * (means - global_mean).square()).sum(dim=0)
    return global_mean, spread / total, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with global statistics; backward sums over every rank."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, comm: Communicator, total: torch.Tensor):
        normalised = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        ctx.save_for_backward(normalised, weight, invstd, total)
        ctx.comm = comm
        if weight is None:
            return normalised.clone()
        return normalised * _channel_view(weight, x) + _channel_view(bias, x)

    @staticmethod
    def backward(ctx, grad):
        normalised, weight, invstd, total = ctx.saved_tensors
        dims = [0, *range(2, grad.dim())]
        sums = torch.stack([grad.sum(dim=dims), (grad * normalised).sum(dim=dims)])
        grad_weight = sums[1].clone() if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sums[0].clone() if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            means = ctx.comm.all_reduce(sums, ReduceOp.SUM) / total
            scale = invstd if weight is None else invstd * weight
            grad_x = grad - _channel_view(means[0], grad) - normalised * _channel_view(means[1], grad)
            grad_x = grad_x * _channel_view(scale, grad)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d with statistics over every rank's batch while training (the same parameter and buffer
    names, so checkpoints and published weights load either way); evaluation and one rank are plain BatchNorm."""

    def __init__(
        self,
        num_features: int,
        comm: Communicator,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.comm = comm

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an [N, C, ...] input, got {x.dim()} dimension(s)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_statistics = self.training or not self.track_running_stats
        if not batch_statistics or self.comm.world_size == 1:
            return super().forward(x)
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 under AMP
        mean, var, total = global_moments(work.detach(), self.comm)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, total)
        invstd = (var + self.eps).rsqrt()
        weight = None if self.weight is None else self.weight.to(work.dtype)
        bias = None if self.bias is None else self.bias.to(work.dtype)
        return _SyncBatchNormFunction.apply(work, weight, bias, mean, invstd, self.comm, total).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        """As BatchNorm does: momentum (or a cumulative average when it is None), the variance unbiased (a global
        batch of one value per channel, which BatchNorm refuses, leaves it biased)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * total / (total - 1).clamp_min(1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module, comm: Communicator) -> nn.Module:
    """Replace every BatchNorm layer inside `module` by a `SyncBatchNorm` over `comm` (in place; returned).

    The new layers hold the old layers' very parameter and buffer tensors, so an optimizer built before the
    conversion still updates them."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features, comm, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, parameter in module.named_parameters(recurse=False):
            setattr(converted, name, parameter)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(converted, name, buffer)
        return converted.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, comm))
    return module
