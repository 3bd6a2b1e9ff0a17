"""What a run reports: rank 0's progress line every `frequent` steps, TensorBoard scalars, per-phase timing.

The line carries samples per second (all ranks), loss and backbone gradient norm (means over the window),
learning rate, epoch, step, loss scale and the time left at the window's pace; the same numbers, unrounded,
go to `metrics.jsonl`. A full or read-only disk does not stop training: each writer warns once and goes quiet
(see `run_files`). Phase timing (data, backbone, head, communication) is collected in perf mode only,
where each phase is closed with a device synchronisation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from partial_fc.engine.run_files import MetricsFile, TensorBoardFile
from partial_fc.fileio import os_error_cause
from partial_fc.progress import print_line

PHASES = ("data", "backbone", "head", "communication", "optimizer")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PhaseTimer:
    """Wall time per phase, a nested phase's time counted in it and not in its parent; ``enabled=False``
    makes every call free (the normal training mode)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open phase: seconds spent in phases opened inside it
        self._open: list[str] = []  # names of the open phases, innermost last

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (synchronising the device before and after); the name is kept as
        ``current`` even when timing is off (the stall watchdog reports it)."""
        self._open.append(name)
        try:
            if not self.enabled:
                yield
                return
            self._sync()
            start = time.perf_counter()
            self._nested.append(0.0)
            try:
                yield
            finally:
                self._sync()
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed - self._nested.pop()
                if self._nested:
                    self._nested[-1] += elapsed
        finally:
            self._open.pop()

    @property
    def current(self) -> str:
        """The innermost open phase, or "between phases"."""
        return self._open[-1] if self._open else "between phases"

    def shares(self) -> dict[str, float]:
        """Each phase's share of the timed total."""
        total = sum(self.seconds.values()) or 1.0
        return {name: self.seconds.get(name, 0.0) / total for name in PHASES}

    def reset(self) -> None:
        self.seconds.clear()


class TrainMonitor:
    """Rank 0's log lines and TensorBoard scalars; other ranks only count."""

    def __init__(
        self, rank: int, world_size: int, total_steps: int, frequent: int, output: Path | None, resuming: bool = False
    ):
        """Rank 0 writes TensorBoard events to ``output/tensorboard`` and lines to ``output/metrics.jsonl``
        (continued when ``resuming``, started afresh otherwise)."""
        self.rank, self.world_size = rank, world_size
        self.total_steps, self.frequent = total_steps, frequent
        self.writer: TensorBoardFile | None = None
        self.metrics: MetricsFile | None = None
        self._print_failed = False
        if rank == 0 and output is not None:
            self.writer = TensorBoardFile(output / "tensorboard")
            self.metrics = MetricsFile(output / "metrics.jsonl", append=resuming)
        self._window_start = time.perf_counter()
        self._window_samples = 0
        self._losses: list[float] = []
        self._grad_norms: list[float] = []

    def print(self, message: str) -> None:
        """One line on rank 0; a log file on a full disk is warned about once (on stderr), not a crash."""
        if self.rank != 0:
            return
        try:
            print(message, flush=True)
        except OSError as error:
            if not self._print_failed:
                self._print_failed = True
                print_line(
                    f"partial-fc: warning: cannot write the log (standard output): {os_error_cause(error)}; "
                    "training goes on"
                )

    def scalars(self, step: int, **values: float) -> None:
        """TensorBoard scalars on rank 0."""
        if self.writer is not None:
            self.writer.scalars(step, values)

    def step(
        self, step: int, epoch: int, loss: float, lr: float, samples: int, grad_norm: float, loss_scale: float | None
    ) -> None:
        """Count one optimizer step of ``samples`` per rank; every ``frequent`` steps print and log the window.

        ``grad_norm`` is the backbone's global gradient norm before clipping (logged as the window's mean)."""
        self._window_samples += samples * self.world_size
        self._losses.append(loss)
        self._grad_norms.append(grad_norm)
        if step % self.frequent and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self._window_start
        speed = self._window_samples / max(elapsed, 1e-9)
        mean_loss = sum(self._losses) / len(self._losses)
        grad_norm = sum(self._grad_norms) / len(self._grad_norms)
        seconds_per_step = elapsed / len(self._losses)
        left = _duration(seconds_per_step * (self.total_steps - step))
        scale = "" if loss_scale is None else f" | loss scale {loss_scale:g}"
        self.print(
            f"step {step}/{self.total_steps} | epoch {epoch} | {speed:,.1f} samples/s | loss {mean_loss:.4f} "
            f"| lr {lr:.6f} | grad norm {grad_norm:.3g}{scale} | {left} left"
        )
        values = {"loss": mean_loss, "learning_rate": lr, "grad_norm": grad_norm, "samples_per_second": speed}
        if loss_scale is not None:
            values["loss_scale"] = loss_scale
        self.scalars(step, **values)
        if self.metrics is not None:
            self.metrics.write({"step": step, "epoch": epoch, **values})
        self._window_start, self._window_samples, self._losses, self._grad_norms = time.perf_counter(), 0, [], []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
