"""Worker: a few training steps of a whole model (backbone + PartialFC) on this rank's share of fixed global
batches, for every optimizer / accumulation / clipping / SyncBatchNorm variant and both data-parallel wrappers.

Run on one process it is the reference (the whole batch); under a launcher each rank takes an uneven slice of
every global batch. Each rank saves its backbone, its center shard, the losses and the gradient norms.
Wrappers: `engine` is `partial_fc.engine.distribute_backbone`; `plain` is what a user of another trainer writes:
`DistributedDataParallel(model)` on torch.distributed, `hvd.DistributedOptimizer` with its default op on Horovod.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import Communicator, close_communicator, exit_process, get_communicator  # noqa: E402
from partial_fc.engine import distribute_backbone  # noqa: E402
from partial_fc.engine.sync_batchnorm import convert_sync_batchnorm  # noqa: E402
from partial_fc.heads import CombinedMargin, PartialFC, SparseAdamW, SparseSGD  # noqa: E402

GLOBAL_BATCH, INPUTS, DIM, CLASSES, STEPS = 13, 12, 8, 11, 3
CLIP = 0.05  # below every step's gradient norm here, so clipping acts in the variants that ask for it
VARIANTS = {  # name: (optimizer, gradient accumulation, clip norm, BatchNorm synchronised over the ranks)
    "sgd": ("sgd", 1, 0.0, False),
    "sgd_acc2_clip": ("sgd", 2, CLIP, False),
    "adamw_clip": ("adamw", 1, CLIP, False),
    "adamw_acc2": ("adamw", 2, 0.0, False),
    "sgd_syncbn": ("sgd", 1, 0.0, True),
    "adamw_acc2_clip_syncbn": ("adamw", 2, CLIP, True),
}
WRAPPERS = ("engine", "plain")


def rank_rows(world_size: int, rank: int) -> slice:
    """This rank's rows of a global batch: contiguous, in rank order, uneven when the batch does not divide."""
    bounds = [len(part) for part in torch.arange(GLOBAL_BATCH).tensor_split(world_size)]
    start = sum(bounds[:rank])
    return slice(start, start + bounds[rank])


def global_batches(accumulation: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """STEPS steps of `accumulation` micro-batches, the same on every rank and world size."""
    generator = torch.Generator().manual_seed(11)
    return [
        [
            (
                torch.randn(GLOBAL_BATCH, INPUTS, generator=generator, dtype=torch.float64),
                torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator),
            )
            for _ in range(accumulation)
        ]
        for _ in range(STEPS)
    ]


def make_backbone(batchnorm: bool) -> nn.Module:
    """A small perceptron; with `batchnorm`, a 1x1 convolution and a linear layer, each bias-free and followed by
    BatchNorm (2d, then 1d) as in IResNet (a bias before BatchNorm has no gradient, only noise AdamW amplifies)."""
    torch.manual_seed(5)
    if not batchnorm:
        return nn.Sequential(nn.Linear(INPUTS, 16), nn.PReLU(16), nn.Linear(16, DIM)).double()
    return nn.Sequential(
        nn.Unflatten(1, (3, 2, INPUTS // 6)),
        nn.Conv2d(3, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.PReLU(8),
        nn.Flatten(),
        nn.Linear(8 * INPUTS // 3, DIM, bias=False),
        nn.BatchNorm1d(DIM),
    ).double()


def make_optimizers(kind: str, backbone: nn.Module, head: PartialFC, accumulation: int):
    in_backward = accumulation == 1
    if kind == "sgd":
        return (
            torch.optim.SGD(backbone.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3),
            SparseSGD(head, lr=0.2, momentum=0.9, weight_decay=5e-3, update_in_backward=in_backward),
        )
    return (
        torch.optim.AdamW(backbone.parameters(), lr=0.01, weight_decay=0.05),
        SparseAdamW(head, lr=0.01, weight_decay=0.05, update_in_backward=in_backward),
    )


def wrap_plainly(backbone: nn.Module, optimizer: torch.optim.Optimizer, comm: Communicator, accumulation: int):
    """The data-parallel wrapping of the reference trainers, with their default (averaging) reduction."""
    if comm.world_size == 1:
        return backbone, optimizer
    if comm.name == "horovod":
        hvd = comm.hvd
        # Parameters only: hvd.broadcast_optimizer_state on a fresh optimizer initialises its state with a
        # zero-gradient step(), which applies weight decay once, a step no single process takes.
        hvd.broadcast_parameters(backbone.state_dict(), root_rank=0)
        return backbone, hvd.DistributedOptimizer(
            optimizer, named_parameters=backbone.named_parameters(), backward_passes_per_step=accumulation
        )
    return nn.parallel.DistributedDataParallel(backbone), optimizer


def train(comm: Communicator, variant: str, wrapper: str) -> dict:
    kind, accumulation, clip, batchnorm = VARIANTS[variant]
    head = PartialFC(
        CombinedMargin(s=16.0, m1=1.0, m2=0.3, m3=0.1),
        DIM,
        CLASSES,
        1.0,
        comm=comm,
        storage_dtype=torch.float64,
        seed=2,
    )
    raw = make_backbone(batchnorm)
    optimizer, head_optimizer = make_optimizers(kind, raw, head, accumulation)
    if wrapper == "engine":
        replicas = distribute_backbone(raw, optimizer, comm, accumulation_steps=accumulation, sync_batchnorm=batchnorm)
        backbone, optimizer = replicas.module, replicas.optimizer
    else:
        if batchnorm:
            convert_sync_batchnorm(raw, comm)  # after the optimizer was built: it keeps the same tensors
        backbone, optimizer = wrap_plainly(raw, optimizer, comm, accumulation)
    rows = rank_rows(comm.world_size, comm.rank)
    losses, norms = [], []
    for step in global_batches(accumulation):
        for micro, (inputs, labels) in enumerate(step):
            last = micro == accumulation - 1
            no_sync = getattr(backbone, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = head(backbone(inputs[rows]), labels[rows])
                (loss / accumulation).backward()
            losses.append(loss.item())
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is not None:
            synchronize()
        norms.append(float(torch.nn.utils.clip_grad_norm_(raw.parameters(), clip or math.inf)))
        with getattr(optimizer, "skip_synchronize", contextlib.nullcontext)():
            optimizer.step()
        head_optimizer.step()
        optimizer.zero_grad()
    return {
        "backbone": {k: v.detach().clone() for k, v in raw.state_dict().items()},
        "centers": head.weight.clone(),
        "shard": (head.class_start, head.num_local),
        "losses": losses,
        "norms": norms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = get_communicator()
    results = {"backend": comm.name, "world_size": comm.world_size}
    for variant in VARIANTS:
        for wrapper in WRAPPERS:
            results[variant, wrapper] = train(comm, variant, wrapper)
    torch.save(results, Path(args.out) / f"rank{comm.rank}.pt")
    close_communicator()
    exit_process(0)


if __name__ == "__main__":
    main()
