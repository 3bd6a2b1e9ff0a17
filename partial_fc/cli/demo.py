"""`partial-fc demo`: a small network plus the Partial FC head trained on generated, separable data.

Each identity has a random prototype in input space; its samples are the prototype plus noise, so the
task is learnable. Every rank reads its own part of each global batch; the backbone is data parallel,
the centers are sharded. At the end the backbone replicas are compared across ranks.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from partial_fc.cli.common import add_head_options, head_from_options, print_rank0
from partial_fc.comm import Communicator, ReduceOp, get_communicator
from partial_fc.engine import distribute_backbone
from partial_fc.heads import SparseSGD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_head_options(parser)
    parser.add_argument("--input-dim", type=int, default=64, help="dimension of the generated inputs")
    parser.add_argument("--noise", type=float, default=0.5, help="noise around each identity's prototype")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--log-every", type=int, default=10)
    parser.set_defaults(classes=2000, dim=64, batch=128, sample_rate=0.2, steps=150, margin="cosface", scale=32.0)


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


def run(args: argparse.Namespace) -> int:
    comm = get_communicator(args.backend)
    # Each rank initialises its replica differently on purpose: distribute_backbone makes them rank 0's.
    torch.manual_seed(args.seed + comm.rank)
    device = comm.device
    head = head_from_options(args, comm)
    backbone = ToyBackbone(args.input_dim, args.dim).to(device)
    optimizer = torch.optim.SGD(
        backbone.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    replicas = distribute_backbone(backbone, optimizer, comm)
    backbone, optimizer = replicas.module, replicas.optimizer
    center_optimizer = SparseSGD(head, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    data = SeparableIdentities(args.classes, args.input_dim, args.noise, args.seed, device)
    print_rank0(
        comm,
        f"demo: {comm.world_size} rank(s) on {comm.name}, {args.classes} identities, "
        f"batch {args.batch} per rank, sample rate {args.sample_rate}",
    )
    losses = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, labels = data.global_batch(args.batch * comm.world_size)
        mine = slice(comm.rank * args.batch, (comm.rank + 1) * args.batch)
        loss = head(backbone(inputs[mine]), labels[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        center_optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == 1:
            print_rank0(comm, f"step {step:5d}  loss {losses[-1]:8.4f}")
    identical = replicas_identical(backbone, comm)
    seconds = time.perf_counter() - started
    window = max(1, min(10, len(losses) // 5))
    summary = {
        "job": "demo",
        "backend": comm.name,
        "world_size": comm.world_size,
        "steps": args.steps,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "replicas_identical": identical,
        "samples_per_second": args.steps * args.batch * comm.world_size / seconds,
    }
    print_rank0(comm, summary)
    return 0 if identical else 1
