"""The learning-rate schedule of arcface_torch's PolyScheduler: linear warmup, then polynomial decay to 0.

One schedule drives every optimizer of a run (the backbone's and the head's), stepped once per optimizer
step, so the centers and the backbone share its shape; each optimizer may take a fixed multiple of it
(fine-tuning gives the backbone a lower rate than the fresh centers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from partial_fc.errors import InputError


class PolyWarmupSchedule:
    """lr(step) = base_lr * (step + 1) / warmup_steps during warmup, then
    base_lr * (1 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power, reaching 0 at total_steps."""

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        power: float = 1.0,
        lr_mults: Sequence[float] | None = None,
    ):
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise InputError(
                f"schedule needs total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}"
            )
        self.optimizers = list(optimizers)
        self.lr_mults = list(lr_mults) if lr_mults is not None else [1.0] * len(self.optimizers)
        if len(self.lr_mults) != len(self.optimizers):
            raise InputError(f"{len(self.lr_mults)} learning-rate multiples for {len(self.optimizers)} optimizers")
        self.base_lr, self.total_steps, self.warmup_steps, self.power = base_lr, total_steps, warmup_steps, power
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), before each optimizer's multiple."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.base_lr * (1.0 - progress) ** self.power

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        for optimizer, mult in zip(self.optimizers, self.lr_mults):
            for group in optimizer.param_groups:
                group["lr"] = self.lr * mult

    def step(self) -> None:
        """Move to the next optimizer step and set its learning rate on every optimizer."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, int | float]:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "power": self.power,
        }

    def load_state_dict(self, state: dict[str, int | float]) -> None:
        """Continue at the saved step; the shape of the schedule (lr, steps, power) stays this run's."""
        self.last_step = int(state["last_step"])
        self._apply()
