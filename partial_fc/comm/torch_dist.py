"""The torch.distributed backend: gloo on CPU, NCCL on GPU, bootstrapped from torchrun's or mpirun's variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from partial_fc.comm.base import Communicator, ReduceOp
from partial_fc.comm.launch import LaunchInfo, detect_launch
from partial_fc.comm.network import choose_interface, rendezvous_host

_TORCH_OPS = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.MAX: dist.ReduceOp.MAX}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _rendezvous_address(launch: LaunchInfo) -> str:
    """tcp:// address of rank 0: from MASTER_ADDR/MASTER_PORT, or agreed over MPI when mpirun started us.

    Either way, a job across hosts gets Gloo's and NCCL's interface set to the one that reaches rank 0."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        choose_interface(os.environ, os.environ["MASTER_ADDR"])
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if launch.launcher != "mpirun":
        raise RuntimeError("torch.distributed needs MASTER_ADDR and MASTER_PORT, or a launch by mpirun or torchrun")
    from mpi4py import MPI

    host = None
    if launch.rank == 0:
        host = rendezvous_host(os.environ)
    host = MPI.COMM_WORLD.bcast(host, root=0)
    choose_interface(os.environ, host)
    port = _free_port() if launch.rank == 0 else None
    return f"tcp://{host}:{MPI.COMM_WORLD.bcast(port, root=0)}"


def _elastic_store(launch: LaunchInfo, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, its rendezvous store with a prefix of the restart count, or None elsewhere.

    torchrun keeps its store across worker restarts, so without the prefix a restarted group can read the
    addresses its killed predecessor published and fail to connect (seen as "Connection refused" at start)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    choose_interface(os.environ, os.environ["MASTER_ADDR"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        launch.world_size,
        is_master=launch.rank == 0 and not hosted_by_agent,
        timeout=timeout,
    )
    return dist.PrefixStore(f"partial_fc/attempt_{attempt}", store)


class TorchDistributedCommunicator(Communicator):
    """Collectives through torch.distributed's default process group (or one passed in)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 1800.0) -> None:
        launch = detect_launch()
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = timedelta(seconds=timeout_s)
            store = _elastic_store(launch, timeout)
            rendezvous = {"store": store} if store is not None else {"init_method": _rendezvous_address(launch)}
            dist.init_process_group(
                backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **rendezvous
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
