"""The communicator interface every backend implements, and the collectives built on top of it."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch


class ReduceOp(enum.Enum):
    """Element-wise reductions the head needs: sums (softmax denominators) and maxima (row maxima)."""

    SUM = "sum"
    MAX = "max"


class Communicator(ABC):
    """Collectives over all ranks of the job; every rank must call them in the same order."""

    name: str = "abstract"

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's global rank."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Number of processes in the job."""

    @property
    @abstractmethod
    def local_rank(self) -> int:
        """This process's rank among the processes of its host (picks the GPU)."""

    @property
    def device(self) -> torch.device:
        """The device this rank computes on: its own GPU when CUDA is present, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` over ranks in place and return it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0; first dimensions may differ between ranks.

        `sizes` (every rank's first dimension, when the caller already knows them) saves a collective.
        """

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `tensor` in place with root's copy and return it."""

    @abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Return root's picklable `obj` on every rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank arrives."""

    def close(self) -> None:
        """Release the backend's resources once every rank is done with them."""

    def all_gather_with_grad(
        self, tensor: torch.Tensor, sizes: Sequence[int] | None = None, grad_scale: float = 1.0
    ) -> torch.Tensor:
        """Differentiable all-gather: backward hands each rank the sum over ranks of its own rows' gradient,
        times `grad_scale`."""
        if self.world_size == 1 and grad_scale == 1.0:
            return tensor
        if sizes is None:
            sizes = self.gather_sizes(tensor.shape[0])
        return _AllGatherWithGrad.apply(tensor, self, tuple(int(s) for s in sizes), float(grad_scale))

    def gather_sizes(self, size: int) -> list[int]:
        """Every rank's value of the integer `size`, in rank order."""
        local = torch.tensor([size], dtype=torch.int64, device=self.device)
        return [int(v) for v in self.all_gather(local, sizes=[1] * self.world_size).tolist()]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward is a reduce-scatter (sum the gradient over ranks, keep this rank's rows), scaled."""

    @staticmethod
    def forward(
        ctx, tensor: torch.Tensor, comm: Communicator, sizes: tuple[int, ...], grad_scale: float
    ) -> torch.Tensor:
        ctx.comm, ctx.grad_scale = comm, grad_scale
        ctx.start = sum(sizes[: comm.rank])
        ctx.size = sizes[comm.rank]
        return comm.all_gather(tensor.contiguous(), sizes=sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = ctx.comm.all_reduce(grad.contiguous().clone(), ReduceOp.SUM)
        mine = summed[ctx.start : ctx.start + ctx.size]
        return mine.mul_(ctx.grad_scale), None, None, None
