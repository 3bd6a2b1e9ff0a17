"""What the training loop does besides training, after each step, at each epoch's end and once training ends: the
perf window, the profiler's steps, verification and checkpoints on their rhythm."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from partial_fc.engine.checkpoint.layout import step_dir_name
from partial_fc.engine.monitor import PhaseTimer

if TYPE_CHECKING:
    from partial_fc.engine.trainer import TrainResult

WARMUP_PERF_STEPS = 2


class StepHook:
    """A hook overrides the moments it acts at; here each does nothing. `step` counts the optimizer steps done."""

    def after_step(self, step: int, result: TrainResult) -> None:
        """After each optimizer step taken."""

    def after_epoch(self, step: int, result: TrainResult) -> None:
        """When the sampler's epoch has run out."""

    def after_training(self, step: int, result: TrainResult) -> None:
        """After the last step, or the step a stop signal ended the run at."""


class PerfWindow(StepHook):
    """Perf mode's measured stretch: `steps` steps after `WARMUP_PERF_STEPS` untimed ones, ending at step `end`;
    its throughput and time shares are the run's result."""

    def __init__(
        self,
        first_step: int,
        steps: int,
        timer: PhaseTimer,
        samples_per_step: int,
        ranks: int,
        report: Callable[[str], None],
    ):
        self.begin = first_step + WARMUP_PERF_STEPS
        self.end = self.begin + steps
        self.timer, self.samples_per_step, self.ranks, self.report = timer, samples_per_step, ranks, report
        self.started_at = time.perf_counter()

    def after_step(self, step: int, result: TrainResult) -> None:
        if step == self.begin:  # the warm-up is done: start the clock, clear the phase timer
            self.timer.reset()
            self.started_at = time.perf_counter()

    def after_training(self, step: int, result: TrainResult) -> None:
        seconds, steps = time.perf_counter() - self.started_at, max(0, step - self.begin)
        result.samples_per_second = steps * self.samples_per_step / max(seconds, 1e-9)
        result.phases = self.timer.shares()
        self.report(
            f"perf: {steps} steps, {result.samples_per_second:,.1f} samples/s over {self.ranks} ranks; time in "
            + ", ".join(f"{name} {share:.1%}" for name, share in result.phases.items())
        )


class ProfilerSteps(StepHook):
    """Moves a torch.profiler's schedule on with the training steps."""

    def __init__(self, profiler: torch.profiler.profile):
        self.profiler = profiler

    def after_step(self, step: int, result: TrainResult) -> None:
        self.profiler.step()


class Verification(StepHook):
    """Verification every `every` steps and after `last_step`, the plan's last."""

    def __init__(self, every: int, last_step: int, evaluate: Callable[[], dict[str, float]]):
        self.every, self.last_step, self.evaluate = every, last_step, evaluate

    def after_step(self, step: int, result: TrainResult) -> None:
        if step % self.every == 0 or step == self.last_step:
            result.verification = self.evaluate()


class Checkpoints(StepHook):
    """A checkpoint every `every` steps (0: at each epoch's end) and one when training ends, unless that step has
    one; `save(final)` returns None when a save failed and training goes on."""

    def __init__(self, every: int, save: Callable[[bool], Path | None]):
        self.every, self.save = every, save

    def _save(self, result: TrainResult, final: bool = False) -> None:
        saved = self.save(final)
        if saved is not None:
            result.checkpoint = str(saved)

    def after_step(self, step: int, result: TrainResult) -> None:
        if self.every and step % self.every == 0:
            self._save(result)

    def after_epoch(self, step: int, result: TrainResult) -> None:
        if not self.every:
            self._save(result)

    def after_training(self, step: int, result: TrainResult) -> None:
        if result.checkpoint is None or Path(result.checkpoint).name != step_dir_name(step):
            self._save(result, final=True)
