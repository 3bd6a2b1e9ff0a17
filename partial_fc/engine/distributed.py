"""Data parallelism for the backbone: same start on every rank, gradients averaged over ranks every step.

Horovod's DistributedOptimizer on the Horovod backend, DistributedDataParallel on torch.distributed,
nothing on a single process, behind one `DataParallelBackbone`. Parameters and optimizer state are broadcast from
rank 0 first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from partial_fc.comm import Communicator
from partial_fc.engine.sync_batchnorm import convert_sync_batchnorm


@dataclass
class DataParallelBackbone:
    """A backbone replicated on every rank: forward through `module`, step `optimizer`. The methods are what a
    training step does differently per backend; on one process they do nothing."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's forward and backward; gradients are averaged over the ranks in the step's `last`."""
        return contextlib.nullcontext()

    def wait_for_gradients(self) -> None:
        """Return once the step's gradients are averaged over the ranks."""

    def stepping(self) -> contextlib.AbstractContextManager:
        """Around `optimizer.step()` once `wait_for_gradients` returned."""
        return contextlib.nullcontext()


class _HorovodBackbone(DataParallelBackbone):
    """Horovod's DistributedOptimizer: it counts the backward passes itself and averages asynchronously."""

    def wait_for_gradients(self) -> None:
        self.optimizer.synchronize()

    def stepping(self) -> contextlib.AbstractContextManager:
        return self.optimizer.skip_synchronize()  # already synchronized: step() must not average again


class _DDPBackbone(DataParallelBackbone):
    """DistributedDataParallel: it averages in every backward unless told not to."""

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()


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
) -> DataParallelBackbone:
    """The model and optimizer whose backward/step *average* the backbone gradients over `comm`'s ranks.

    Averaging is exact with `PartialFC`, whose backward scales each rank's embedding gradient by the world
    size: the average is the gradient of the global-batch loss, so a step on W ranks moves every parameter as
    one process would on the concatenated batch (BatchNorm statistics aside, unless `sync_batchnorm` turns
    them into global ones). With `accumulation_steps` > 1 gradients are averaged once per that many backward
    passes, in the one `micro_step(last=True)`.
    """
    if sync_batchnorm:
        convert_sync_batchnorm(model, comm)
    broadcast_start(model, optimizer, comm)
    if comm.world_size == 1:
        return DataParallelBackbone(model, optimizer)
    if comm.name == "horovod":
        hvd = comm.hvd
        averaged = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            op=hvd.Average,
            backward_passes_per_step=accumulation_steps,
        )
        return _HorovodBackbone(model, averaged)
    if comm.name == "torch":
        device_ids = [comm.device.index] if comm.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=comm.group)
        return _DDPBackbone(ddp, optimizer)
    raise ValueError(f"no data-parallel wrapper for communicator {comm.name!r}")
