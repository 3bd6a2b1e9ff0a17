"""A single-process float64 reference for the Partial FC head: full softmax with the margin, plain PyTorch.

Also: arcface_torch's inter-class filtering of negatives, and a lazy (per-row) AdamW built from
torch.optim.AdamW itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from partial_fc.heads import PartialFC, SparseSGD
from tests.numerics import relative_error


def reference_margin_logits(cosine: torch.Tensor, labels: torch.Tensor, s, m1, m2, m3) -> torch.Tensor:
    """s*cos everywhere, s*(cos(m1*theta+m2)-m3) at the label (ArcFace's rule past pi), with autograd."""
    rows = torch.arange(cosine.shape[0])
    target = cosine[rows, labels]
    theta = torch.acos(target)
    margin = torch.cos(m1 * theta + m2)
    past_pi = m1 * theta + m2 > math.pi
    target_logit = torch.where(past_pi, target - m2 * math.sin(m2), margin) - m3
    return (cosine * s).index_put((rows, labels), target_logit * s)


def reference_cosines(embeddings, centers) -> torch.Tensor:
    """Clamped cosines [B, C] of every embedding with every center."""
    return F.linear(F.normalize(embeddings), F.normalize(centers)).clamp(-1.0, 1.0)


def negatives_above(cosine: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """arcface_torch's filter: the non-target entries whose cosine exceeds `threshold` (a [B, C] bool mask)."""
    dirty = cosine.detach() > threshold
    dirty[torch.arange(cosine.shape[0]), labels] = False
    return dirty


def reference_loss(embeddings, centers, labels, s, m1, m2, m3, threshold: float = 0.0) -> torch.Tensor:
    """Margin cross-entropy; with threshold > 0 filtered negatives become cosine 0 with no gradient."""
    cosine = reference_cosines(embeddings, centers)
    if threshold > 0:
        cosine = cosine * (~negatives_above(cosine, labels, threshold)).to(cosine.dtype)
    return F.cross_entropy(reference_margin_logits(cosine, labels, s, m1, m2, m3), labels)


@dataclass
class Problem:
    """A fixed multi-step problem: per step the full batch (every rank's rows) and labels, plus centers."""

    sizes: list[int]
    embeddings: list[torch.Tensor]
    labels: list[torch.Tensor]
    centers: torch.Tensor
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 0.01

    def sparse_sgd(self, head: PartialFC, update_in_backward: bool) -> SparseSGD:
        """The head's SparseSGD with this problem's lr, momentum and weight decay."""
        return SparseSGD(
            head,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            update_in_backward=update_in_backward,
        )

    def rank_rows(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


def make_problem(world_size: int, classes: int, dim: int, steps: int, seed: int) -> Problem:
    """Uneven batches (3 + 2*rank rows on rank `rank`), float64 everything, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [3 + 2 * rank for rank in range(world_size)]
    total = sum(sizes)
    embeddings = [torch.randn(total, dim, generator=generator, dtype=torch.float64) for _ in range(steps)]
    labels = [torch.randint(0, classes, (total,), generator=generator) for _ in range(steps)]
    centers = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    return Problem(sizes, embeddings, labels, centers)


def reference_run(
    problem: Problem,
    s,
    m1,
    m2,
    m3,
    threshold: float = 0.0,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
) -> list[dict]:
    """Per step: loss, embedding gradient and all centers after torch.optim.SGD (or `optimizer`), in float64."""
    centers = problem.centers.clone().requires_grad_(True)
    if optimizer is None:
        optimizer = torch.optim.SGD(
            [centers], lr=problem.lr, momentum=problem.momentum, weight_decay=problem.weight_decay
        )
    else:
        optimizer = optimizer([centers])
    out = []
    for embeddings, labels in zip(problem.embeddings, problem.labels):
        embeddings = embeddings.clone().requires_grad_(True)
        optimizer.zero_grad()
        loss = reference_loss(embeddings, centers, labels, s, m1, m2, m3, threshold)
        loss.backward()
        optimizer.step()
        out.append({"loss": loss.item(), "grad": embeddings.grad.clone(), "centers": centers.detach().clone()})
    return out


def adamw(lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """A factory of torch.optim.AdamW with these settings, for `reference_run`."""
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def lazy_adamw_rows(
    weight: torch.Tensor, state: dict, index: torch.Tensor, grad: torch.Tensor, **settings
) -> tuple[torch.Tensor, dict]:
    """Rows `index` (by `grad`) stepped one at a time by torch.optim.AdamW from their own step count and moments.

    `state` holds per-row `step`, `exp_avg`, `exp_avg_sq`; returns new copies of the weight and the state.
    """
    weight = weight.clone()
    state = {key: value.clone() for key, value in state.items()}
    for row, row_grad in zip(index.tolist(), grad):
        param = weight[row].clone().requires_grad_(True)
        param.grad = row_grad.clone()
        optimizer = torch.optim.AdamW([param], **settings)
        optimizer.state[param] = {
            "step": torch.tensor(float(state["step"][row])),
            "exp_avg": state["exp_avg"][row].clone(),
            "exp_avg_sq": state["exp_avg_sq"][row].clone(),
        }
        optimizer.step()
        weight[row] = param.detach()
        state["step"][row] += 1
        state["exp_avg"][row] = optimizer.state[param]["exp_avg"]
        state["exp_avg_sq"][row] = optimizer.state[param]["exp_avg_sq"]
    return weight, state


def check_runs(
    runs: Iterable[dict], expected: list[dict], rows: slice, tolerances: dict[str, float], world_size: int
) -> None:
    """Assert every saved run of a rank (dtype, shard, per-step loss / grad / centers) matches the reference steps.

    A rank's embedding gradient is world_size times its rows of the global one (the head's averaging contract)."""
    for run in runs:
        tolerance, (start, count) = tolerances[run["dtype"]], run["shard"]
        for step, (got, want) in enumerate(zip(run["steps"], expected, strict=True)):
            where = (run["dtype"], step)
            assert abs(got["loss"] - want["loss"]) <= tolerance * abs(want["loss"]), where
            assert relative_error(got["grad"], world_size * want["grad"][rows]) <= tolerance, where
            assert relative_error(got["centers"], want["centers"][start : start + count]) <= tolerance, where
