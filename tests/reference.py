"""A single-process float64 reference for the Partial FC head: full softmax with the margin, plain PyTorch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def reference_margin_logits(cosine: torch.Tensor, labels: torch.Tensor, s, m1, m2, m3) -> torch.Tensor:
    """s*cos everywhere, s*(cos(m1*theta+m2)-m3) at the label (ArcFace's rule past pi), with autograd."""
    rows = torch.arange(cosine.shape[0])
    target = cosine[rows, labels]
    theta = torch.acos(target)
    margin = torch.cos(m1 * theta + m2)
    past_pi = m1 * theta + m2 > math.pi
    target_logit = torch.where(past_pi, target - m2 * math.sin(m2), margin) - m3
    return (cosine * s).index_put((rows, labels), target_logit * s)


def reference_loss(embeddings, centers, labels, s, m1, m2, m3) -> torch.Tensor:
    cosine = F.linear(F.normalize(embeddings), F.normalize(centers)).clamp(-1.0, 1.0)
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


def reference_run(problem: Problem, s, m1, m2, m3) -> list[dict]:
    """Per step: loss, embedding gradient and all centers after torch.optim.SGD, in float64."""
    centers = problem.centers.clone().requires_grad_(True)
    optimizer = torch.optim.SGD(
        [centers], lr=problem.lr, momentum=problem.momentum, weight_decay=problem.weight_decay
    )
    out = []
    for embeddings, labels in zip(problem.embeddings, problem.labels):
        embeddings = embeddings.clone().requires_grad_(True)
        optimizer.zero_grad()
        loss = reference_loss(embeddings, centers, labels, s, m1, m2, m3)
        loss.backward()
        optimizer.step()
        out.append({"loss": loss.item(), "grad": embeddings.grad.clone(), "centers": centers.detach().clone()})
    return out
