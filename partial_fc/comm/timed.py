"""A communicator that times every collective of another one (perf mode's 'communication' phase)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from partial_fc.comm.base import Communicator, ReduceOp


class TimedCommunicator(Communicator):
    """Runs each collective of `inner` inside `timing()` (a context manager that records the time)."""

    def __init__(self, inner: Communicator, timing: Callable[[], AbstractContextManager]):
        self.inner, self.timing = inner, timing
        self.name = inner.name

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def local_rank(self) -> int:
        return self.inner.local_rank

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
        with self.timing():
            return self.inner.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        with self.timing():
            return self.inner.all_gather(tensor, sizes)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        with self.timing():
            return self.inner.broadcast(tensor, root)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        with self.timing():
            return self.inner.broadcast_object(obj, root)

    def barrier(self) -> None:
        with self.timing():
            self.inner.barrier()

    def __getattr__(self, name: str) -> Any:
        """Backend specifics (Horovod's module, the torch process group) come from the wrapped communicator."""
        return getattr(self.inner, name)
