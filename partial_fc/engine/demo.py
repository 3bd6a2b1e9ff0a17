"""The demo job: a small network plus the Partial FC head trained on generated, separable data.

Each identity has a random prototype in input space; its samples are the prototype plus noise, so the
task is learnable. Every rank reads its own part of each global batch; the backbone is data parallel,
the centers are sharded. At the end the backbone replicas are compared across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from partial_fc.comm import Communicator, ReduceOp
from partial_fc.engine.distributed import distribute_backbone
from partial_fc.heads import CombinedMargin, PartialFC, SparseSGD


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run trains: the head's shape and margin, the generated data, the SGD of both parts."""

    classes: int
    dim: int
    batch: int  # samples per rank per step
    sample_rate: float
    steps: int
    margin: CombinedMargin  # holds the logit scale too
    storage_dtype: torch.dtype
    fp16: bool
    seed: int
    input_dim: int
    noise: float  # around each identity's prototype
    lr: float
    momentum: float
    weight_decay: float
    log_every: int


class ToyBackbone(nn.Module):
    """A two-layer perceptron standing in for a face network."""

    def __init__(self, input_dim: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, 256), nn.PReLU(256), nn.Linear(256, embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SeparableIdentities:
    """Generated identities: prototype + noise; the same stream on every rank, each rank taking its rows."""

    def __init__(self, classes: int, input_dim: int, noise: float, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(classes, input_dim, generator=self.generator)
        self.noise = noise
        self.device = device

    def global_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.prototypes.shape[0], (size,), generator=self.generator)
        inputs = self.prototypes[labels] + self.noise * torch.randn(
            size, self.prototypes.shape[1], generator=self.generator
        )
        return inputs.to(self.device), labels.to(self.device)


def replicas_identical(model: nn.Module, comm: Communicator) -> bool:
    """True when every rank's backbone parameters equal rank 0's exactly."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    reference = comm.broadcast(flat.clone(), root=0)
    mismatch = torch.tensor([float(not torch.equal(flat, reference))], device=flat.device)
    return comm.all_reduce(mismatch, ReduceOp.MAX).item() == 0.0


def run_demo(settings: DemoSettings, comm: Communicator, log: Callable[[str], None]) -> dict:
    """Train for `settings.steps` steps on `comm`'s ranks and return the summary (losses, replicas identical,
    rate); the opening line and every `log_every`-th step's loss go to `log`, which every rank calls."""
    # Each rank initialises its replica differently on purpose: distribute_backbone makes them rank 0's.
    torch.manual_seed(settings.seed + comm.rank)
    device = comm.device
    head = PartialFC(
        settings.margin,
        settings.dim,
        settings.classes,
        settings.sample_rate,
        settings.fp16,
        comm=comm,
        storage_dtype=settings.storage_dtype,
        seed=settings.seed,
    )
    backbone = ToyBackbone(settings.input_dim, settings.dim).to(device)
    optimizer = torch.optim.SGD(
        backbone.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    replicas = distribute_backbone(backbone, optimizer, comm)
    backbone, optimizer = replicas.module, replicas.optimizer
    center_optimizer = SparseSGD(head, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    data = SeparableIdentities(settings.classes, settings.input_dim, settings.noise, settings.seed, device)
    log(
        f"demo: {comm.world_size} rank(s) on {comm.name}, {settings.classes} identities, "
        f"batch {settings.batch} per rank, sample rate {settings.sample_rate}"
    )
    losses = []
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        inputs, labels = data.global_batch(settings.batch * comm.world_size)
        mine = slice(comm.rank * settings.batch, (comm.rank + 1) * settings.batch)
        loss = head(backbone(inputs[mine]), labels[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        center_optimizer.step()
        losses.append(loss.item())
        if step % settings.log_every == 0 or step == 1:
            log(f"step {step:5d}  loss {losses[-1]:8.4f}")
    identical = replicas_identical(backbone, comm)
    seconds = time.perf_counter() - started
    window = max(1, min(10, len(losses) // 5))
    return {
        "job": "demo",
        "backend": comm.name,
        "world_size": comm.world_size,
        "steps": settings.steps,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "replicas_identical": identical,
        "samples_per_second": settings.steps * settings.batch * comm.world_size / seconds,
    }
