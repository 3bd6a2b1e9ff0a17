"""Failures every rank agrees on: an action that fails on one rank raises the same error on every rank, so that
no rank is left waiting in a collective the others have abandoned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from partial_fc.comm.base import Communicator
from partial_fc.errors import PartialFCError

Fallback = type[PartialFCError]


def agree(comm: Communicator, error: BaseException | None, fallback: Fallback = PartialFCError) -> None:
    """Raise on every rank when any rank failed (one all-gather when none did).

    Every rank raises the first failing rank's error class with its message; an error that is not a
    PartialFCError becomes `fallback("rank <k>: <error>")`. Error classes take their message as sole argument."""
    flag = torch.tensor([[0 if error is None else 1]], dtype=torch.int64, device=comm.device)
    flags = comm.all_gather(flag, sizes=[1] * comm.world_size).reshape(-1).tolist()
    if not any(flags):
        return
    culprit = flags.index(1)
    described = None
    if comm.rank == culprit:
        described = (
            (type(error), str(error)) if isinstance(error, PartialFCError) else (fallback, f"rank {culprit}: {error}")
        )
    kind, message = comm.broadcast_object(described, culprit)
    if comm.rank == culprit and isinstance(error, PartialFCError):
        raise error
    if error is not None:
        raise kind(message) from error
    raise kind(message)


def run_on_root(comm: Communicator, action: Callable[[], Any], fallback: Fallback = PartialFCError) -> Any:
    """Call `action()` on rank 0 only and return its (picklable) result on every rank; its failure fails every rank."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = action()
        except Exception as caught:  # noqa: BLE001 - handed to every rank by agree
            error = caught
    agree(comm, error, fallback)
    return comm.broadcast_object(result, 0)


def on_every_rank(comm: Communicator, action: Callable[[], Any], fallback: Fallback = PartialFCError) -> Any:
    """Call `action()` on every rank; a failure on any rank fails every rank instead of leaving some waiting."""
    result, error = None, None
    try:
        result = action()
    except Exception as caught:  # noqa: BLE001 - handed to every rank by agree
        error = caught
    agree(comm, error, fallback)
    return result
