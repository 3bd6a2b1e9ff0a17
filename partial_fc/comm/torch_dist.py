"""The torch.distributed backend: gloo on CPU, NCCL on GPU, bootstrapped from torchrun's or mpirun's variables."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from partial_fc.comm.base import Communicator, ReduceOp
from partial_fc.comm.launch import LaunchInfo, detect_launch

_TORCH_OPS = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.MAX: dist.ReduceOp.MAX}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _rendezvous_address(launch: LaunchInfo) -> str:
    """tcp:// address of rank 0: from MASTER_ADDR/MASTER_PORT, or agreed over MPI when mpirun started us."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if launch.launcher != "mpirun":
        raise RuntimeError("torch.distributed needs MASTER_ADDR and MASTER_PORT, or a launch by mpirun or torchrun")
    from mpi4py import MPI

    address = None
    if launch.rank == 0:
        address = f"tcp://{socket.gethostbyname(socket.gethostname())}:{_free_port()}"
    return MPI.COMM_WORLD.bcast(address, root=0)


class TorchDistributedCommunicator(Communicator):
    """Collectives through torch.distributed's default process group (or one passed in)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 1800.0) -> None:
        launch = detect_launch()
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend,
                init_method=_rendezvous_address(launch),
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._local_rank = launch.local_rank
        if torch.cuda.is_available():
            torch.cuda.set_device(self.device)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group the collectives run on (None: the default group)."""
        return self._group

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=_TORCH_OPS[op], group=self._group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        tensor = tensor.contiguous()
        if sizes is None:
            sizes = self.gather_sizes(tensor.shape[0])
        longest = max(sizes)
        padded = tensor
        if tensor.shape[0] < longest:
            padded = tensor.new_zeros((longest, *tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self._group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=root, group=self._group)
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj if self._rank == root else None]
        dist.broadcast_object_list(box, src=root, group=self._group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def close(self) -> None:
        """Tear the process group down explicitly: gloo left to interpreter shutdown may abort the process."""
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
