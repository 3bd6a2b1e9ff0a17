"""Data parallelism for the backbone: same start on every rank, gradients all-reduced every step.

Horovod's DistributedOptimizer on the Horovod backend, DistributedDataParallel on torch.distributed,
nothing on a single process. Parameters and optimizer state are broadcast from rank 0 first.
"""

from __future__ import annotations

import torch
from torch import nn

from partial_fc.comm import Communicator

REDUCTIONS = ("average", "sum")


def broadcast_start(model: nn.Module, optimizer: torch.optim.Optimizer, comm: Communicator) -> None:
    """Make every rank start from rank 0's parameters, buffers and optimizer state."""
    for tensor in model.state_dict().values():
        comm.broadcast(tensor)
    optimizer.load_state_dict(comm.broadcast_object(optimizer.state_dict()))


def _sum_hook(process_group, bucket):
    """A DDP communication hook that sums gradients instead of averaging them."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def distribute_backbone(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    comm: Communicator,
    reduction: str = "average",
    accumulation_steps: int = 1,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Return (model, optimizer) whose backward/step all-reduce the backbone gradients over `comm`'s ranks.

    `reduction='average'` is the Horovod and arcface_torch convention; 'sum' gives the gradient of the
    global-batch loss, matching a single process that sees the whole gathered batch. With
    `accumulation_steps` > 1 Horovod reduces once per that many backward passes; under DDP the caller
    wraps the passes before the last in `model.no_sync()`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {REDUCTIONS}")
    broadcast_start(model, optimizer, comm)
    if comm.world_size == 1:
        return model, optimizer
    if comm.name == "horovod":
        hvd = comm.hvd
        op = hvd.Average if reduction == "average" else hvd.Sum
        return model, hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=op,
                                                backward_passes_per_step=accumulation_steps)
    if comm.name == "torch":
        device_ids = [comm.device.index] if comm.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=comm.group)
        if reduction == "sum":
            wrapped.register_comm_hook(comm.group, _sum_hook)
        return wrapped, optimizer
    raise ValueError(f"no data-parallel wrapper for communicator {comm.name!r}")
