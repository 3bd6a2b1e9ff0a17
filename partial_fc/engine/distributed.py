"""Data parallelism for the backbone: same start on every rank, gradients averaged over ranks every step.

Horovod's DistributedOptimizer on the Horovod backend, DistributedDataParallel on torch.distributed,
nothing on a single process. Parameters and optimizer state are broadcast from rank 0 first.
"""

from __future__ import annotations

import torch
from torch import nn

from partial_fc.comm import Communicator
from partial_fc.engine.sync_batchnorm import convert_sync_batchnorm


def broadcast_start(model: nn.Module, optimizer: torch.optim.Optimizer, comm: Communicator) -> None:
    """Make every rank start from rank 0's parameters, buffers and optimizer state."""
    for tensor in model.state_dict().values():
        comm.broadcast(tensor)
    optimizer.load_state_dict(comm.broadcast_object(optimizer.state_dict()))


def distribute_backbone(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    comm: Communicator,
    accumulation_steps: int = 1,
    sync_batchnorm: bool = False,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Return (model, optimizer) whose backward/step *average* the backbone gradients over `comm`'s ranks.

    Averaging is exact with `PartialFC`, whose backward scales each rank's embedding gradient by the world
    size: the average is the gradient of the global-batch loss, so a step on W ranks moves every parameter as
    one process would on the concatenated batch (BatchNorm statistics aside, unless `sync_batchnorm` turns
    them into global ones). With `accumulation_steps` > 1 Horovod reduces once per that many backward passes;
    under DDP the caller wraps the passes before the last in `model.no_sync()`.
    """
    if sync_batchnorm:
        convert_sync_batchnorm(model, comm)
    broadcast_start(model, optimizer, comm)
    if comm.world_size == 1:
        return model, optimizer
    if comm.name == "horovod":
        hvd = comm.hvd
        return model, hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average,
                                                backward_passes_per_step=accumulation_steps)
    if comm.name == "torch":
        device_ids = [comm.device.index] if comm.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=comm.group), optimizer
    raise ValueError(f"no data-parallel wrapper for communicator {comm.name!r}")
