"""The one-process backend: every collective is the identity, so plain `python` runs the same code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from partial_fc.comm.base import Communicator, ReduceOp


class SingleProcessCommunicator(Communicator):
    """A world of one rank."""

    name = "single"

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def local_rank(self) -> int:
        return 0

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        return None
