"""Stopping on SIGTERM or SIGINT at a step boundary, the way SLURM, Kubernetes and people stop jobs.

A signal to any rank only sets a flag; at the end of each step the ranks agree (one all-reduce of the flag), so
all of them stop after the same step, write a checkpoint and exit with `PREEMPTED_STATUS`. Later signals while
stopping are ignored: the checkpoint being written is atomic, and a launcher's final SIGKILL leaves the previous
one in place.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from partial_fc.comm import Communicator, ReduceOp
from partial_fc.errors import PartialFCError
from partial_fc.progress import print_line

PREEMPTED_STATUS = 75  # sysexits' EX_TEMPFAIL: try again later (here: resume)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingPreempted(PartialFCError):
    """The run stopped on a signal after a checkpoint; `exit_status` is `PREEMPTED_STATUS`."""

    exit_status = PREEMPTED_STATUS


class StopSignals:
    """While installed, SIGTERM and SIGINT request a stop instead of killing the process."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the stop signals (from the main thread; a no-op elsewhere, where Python cannot)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._request)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _request(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number
            print_line(
                f"rank {self.rank}: {signal.Signals(number).name} received, stopping after this step with a checkpoint"
            )

    def agreed(self, comm: Communicator) -> str | None:
        """The name of the signal some rank received, the same on every rank (a collective), or None."""
        flag = torch.tensor([float(self.received or 0)], device=comm.device)
        number = int(comm.all_reduce(flag, ReduceOp.MAX).item())
        return signal.Signals(number).name if number else None
