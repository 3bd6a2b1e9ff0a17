"""Additive angular / cosine margins: ArcFace, CosFace and the combined margin s*(cos(m1*t + m2) - m3).

A margin only changes each row's positive logit, so it is described by two element-wise maps of the
positive cosine: the logit it becomes (`target_logit`) and that logit's derivative (`target_grad`).
The Partial FC head applies both inside its fused softmax; `__call__` gives the arcface_torch interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from partial_fc.errors import InputError


@dataclass(frozen=True)
class CombinedMargin:
    """s * (cos(m1 * theta + m2) - m3) at the positive class, s * cos(theta) elsewhere.

    `exact_grad=False` reproduces arcface_torch's straight-through variant (margin applied without gradient).
    Where m1 * theta + m2 passes pi the logit would stop decreasing in theta, so, as published for ArcFace,
    the positive logit becomes cos(theta) - m3 - m2 * sin(m2) there.
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    exact_grad: bool = True

    def __post_init__(self) -> None:
        for name in ("s", "m1", "m2", "m3"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"margin {name}={value!r} must be a finite number")
        if self.s <= 0:
            raise InputError(f"margin scale s={self.s} must be positive")
        if self.m1 <= 0:
            raise InputError(f"margin m1={self.m1} must be positive")
        if not 0 <= self.m2 < math.pi:
            raise InputError(f"margin m2={self.m2} must lie in [0, pi)")

    @property
    def _threshold_angle(self) -> float:
        """The angle past which m1 * theta + m2 exceeds pi."""
        return (math.pi - self.m2) / self.m1

    def _sin_theta(self, cosine: torch.Tensor) -> torch.Tensor:
        """sin(acos(t)), floored so that derivatives stay finite at t = +-1."""
        floor = torch.finfo(cosine.dtype).eps ** 0.5
        return (1.0 - cosine * cosine).clamp_min(0.0).sqrt().clamp_min(floor)

    def _past_pi(self, cosine: torch.Tensor) -> torch.Tensor:
        if self._threshold_angle >= math.pi:
            return torch.zeros_like(cosine, dtype=torch.bool)
        return cosine < math.cos(self._threshold_angle)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """The positive class's logit for cosines in [-1, 1]."""
        if self.m1 == 1.0:
            sine = (1.0 - cosine * cosine).clamp_min(0.0).sqrt()
            shifted = cosine * math.cos(self.m2) - sine * math.sin(self.m2)
        else:
            shifted = torch.cos(self.m1 * torch.acos(cosine) + self.m2)
        fallback = cosine - self.m2 * math.sin(self.m2)
        return self.s * (torch.where(self._past_pi(cosine), fallback, shifted) - self.m3)

    def target_grad(self, cosine: torch.Tensor) -> torch.Tensor:
        """d target_logit / d cosine; the constant s for the straight-through variant."""
        if not self.exact_grad:
            return torch.full_like(cosine, self.s)
        sine = self._sin_theta(cosine)
        if self.m1 == 1.0:
            slope = math.cos(self.m2) + math.sin(self.m2) * cosine / sine
        else:
            slope = self.m1 * torch.sin(self.m1 * torch.acos(cosine) + self.m2) / sine
        return self.s * torch.where(self._past_pi(cosine), torch.ones_like(cosine), slope)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """arcface_torch's interface: cosines [B, C] and labels (-1 for rows whose class is elsewhere) to logits."""
        rows = (labels != -1).nonzero().squeeze(1)
        cols = labels[rows]
        cosine = logits.clamp(-1.0, 1.0)
        target = _TargetLogit.apply(cosine[rows, cols], self)
        return (cosine * self.s).index_put((rows, cols), target)


def ArcFace(s: float = 64.0, margin: float = 0.5, exact_grad: bool = True) -> CombinedMargin:
    """Additive angular margin: s * cos(theta + margin)."""
    return CombinedMargin(s=s, m1=1.0, m2=margin, m3=0.0, exact_grad=exact_grad)


def CosFace(s: float = 64.0, margin: float = 0.4) -> CombinedMargin:
    """Additive cosine margin: s * (cos(theta) - margin)."""
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=margin)


def as_margin(margin_loss: Any) -> CombinedMargin:
    """Accept our margins and anything shaped like arcface_torch's CombinedMarginLoss (attributes s, m1, m2, m3)."""
    if isinstance(margin_loss, CombinedMargin):
        return margin_loss
    if all(hasattr(margin_loss, name) for name in ("s", "m1", "m2", "m3")):
        return CombinedMargin(
            s=float(margin_loss.s), m1=float(margin_loss.m1), m2=float(margin_loss.m2), m3=float(margin_loss.m3)
        )
    raise InputError(
        f"margin_loss {margin_loss!r} is not a CombinedMargin and has no s, m1, m2, m3 attributes to build one from"
    )


class _TargetLogit(torch.autograd.Function):
    """The margin map at the positive cosines, with the derivative the margin defines."""

    @staticmethod
    def forward(ctx, cosine: torch.Tensor, margin: CombinedMargin) -> torch.Tensor:
        ctx.save_for_backward(cosine)
        ctx.margin = margin
        return margin.target_logit(cosine)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (cosine,) = ctx.saved_tensors
        return grad * ctx.margin.target_grad(cosine), None
