"""Communication layer: one `Communicator` interface over Horovod, torch.distributed and a single process."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from partial_fc.comm.base import Communicator, ReduceOp
from partial_fc.comm.launch import BACKENDS, LaunchInfo, choose_backend, detect_launch
from partial_fc.comm.single import SingleProcessCommunicator

__all__ = [
    "BACKENDS",
    "Communicator",
    "LaunchInfo",
    "ReduceOp",
    "SingleProcessCommunicator",
    "choose_backend",
    "close_communicator",
    "detect_launch",
    "exit_process",
    "get_communicator",
]

_current: Communicator | None = None


def get_communicator(backend: str = "auto", timeout_s: float = 1800.0) -> Communicator:
    """The process's communicator, created on first use for `backend` ('auto' reads the launch environment).

    A collective that waits longer than `timeout_s` for a peer fails (gloo, NCCL) or shuts Horovod down."""
    global _current
    name = choose_backend(backend)
    if _current is not None:
        if _current.name != name:
            raise RuntimeError(f"communicator already initialised as {_current.name!r}, cannot switch to {name!r}")
        return _current
    if name == "horovod":
        from partial_fc.comm.horovod_backend import HorovodCommunicator

        _current = HorovodCommunicator(timeout_s)
    elif name == "torch":
        from partial_fc.comm.torch_dist import TorchDistributedCommunicator

        _current = TorchDistributedCommunicator(timeout_s=timeout_s)
    else:
        _current = SingleProcessCommunicator()
    return _current


def close_communicator() -> None:
    """Close the process's communicator after a run that every rank finished (normally or by the same error).

    Not for a rank that fails alone: closing may synchronise with ranks that will never arrive.
    """
    global _current
    if _current is not None:
        _current.close()
        _current = None


def exit_process(status: int) -> NoReturn:
    """End the process with ``status``; without interpreter finalisation unless Horovod is loaded.

    torch's and gloo's native threads can abort a finished process while Python tears itself down
    ("terminate called without an active exception"), turning a run that succeeded into a crash on one
    rank. Everything a run writes is closed before this point, so the streams are flushed, MPI (started by
    mpi4py for the torch.distributed bootstrap) is finalised for mpirun's sake, and the process leaves with
    ``os._exit``. Horovod owns MPI's lifetime through its own exit hooks, so its processes exit normally.
    """
    if "horovod.torch" in sys.modules:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(status)
