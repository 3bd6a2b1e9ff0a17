"""Worker: a tiny deterministic training run that saves and resumes checkpoints, on any number of ranks.

`build` and `train_step` are shared with tests/engine/test_checkpoint.py. Rank 0 writes `result.pt` to --out:
the loss of every step, and the whole (gathered) centers and momentum at each save, after loading and at
the end. A PartialFCError is printed as `partial-fc: error: ...` and every rank records its exit status.
"""

import argparse
import itertools
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import Communicator, get_communicator  # noqa: E402
from partial_fc.data.sampler import DistributedEpochSampler  # noqa: E402
from partial_fc.engine.checkpoint import TrainingParts, load_checkpoint, save_checkpoint  # noqa: E402
from partial_fc.engine.distributed import distribute_backbone  # noqa: E402
from partial_fc.heads import ArcFace, PartialFC, SparseSGD  # noqa: E402
from tests.workers.exit_status import run_and_exit  # noqa: E402

CLASSES, DIM, INPUTS, DATASET, BATCH = 50, 8, 6, 96, 4
_data = torch.Generator().manual_seed(7)
FEATURES = torch.randn(DATASET, INPUTS, generator=_data)
LABELS = torch.randint(0, CLASSES, (DATASET,), generator=_data)


@dataclass
class Setup:
    """Everything a checkpoint holds, built the same way on every rank."""

    comm: Communicator
    backbone: nn.Module
    backbone_optimizer: torch.optim.Optimizer
    head: PartialFC
    head_optimizer: SparseSGD
    scheduler: LambdaLR
    sampler: DistributedEpochSampler

    def parts(self) -> TrainingParts:
        return TrainingParts(
            backbone=self.backbone,
            backbone_optimizer=self.backbone_optimizer,
            head=self.head,
            head_optimizer=self.head_optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
        )


def build(comm: Communicator, seed: int = 0, momentum_dtype: str = "storage") -> Setup:
    """Backbone nn.Linear + SGD (data-parallel over comm), PartialFC + SparseSGD, LambdaLR, the sampler."""
    torch.manual_seed(seed)
    backbone = nn.Linear(INPUTS, DIM)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    replicas = distribute_backbone(backbone, optimizer, comm)
    backbone, optimizer = replicas.module, replicas.optimizer
    head = PartialFC(ArcFace(), DIM, CLASSES, sample_rate=0.5, comm=comm, seed=seed)
    head_optimizer = SparseSGD(head, lr=0.2, momentum=0.9, weight_decay=5e-4, momentum_dtype=momentum_dtype)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.5 * step))
    sampler = DistributedEpochSampler(DATASET, comm.rank, comm.world_size, seed=1)
    return Setup(comm, backbone, optimizer, head, head_optimizer, scheduler, sampler)


def train_step(setup: Setup) -> float:
    """One step; the input noise draws from torch's, numpy's and Python's global generators."""
    indices = list(itertools.islice(iter(setup.sampler), BATCH))
    noise = 0.01 * torch.randn(len(indices), INPUTS) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    loss = setup.head(setup.backbone(FEATURES[indices] + noise), LABELS[indices])
    setup.backbone_optimizer.zero_grad()
    loss.backward()
    setup.backbone_optimizer.step()
    setup.head_optimizer.step()
    setup.scheduler.step()
    setup.sampler.advance(len(indices))
    return loss.item()


def gathered_centers(setup: Setup) -> dict:
    """The whole center matrix and momentum (buffer, or int8 codes and row scales), concatenated over ranks."""
    sizes = setup.comm.gather_sizes(setup.head.num_local)
    state = setup.head_optimizer.state[setup.head.weight]
    names = {"momentum": "momentum_buffer", "momentum_code": "momentum_code", "momentum_absmax": "momentum_absmax"}
    gathered = {
        name: setup.comm.all_gather(state[key].clone(), sizes).cpu() for name, key in names.items() if key in state
    }
    return {"centers": setup.comm.all_gather(setup.head.weight.clone(), sizes).cpu(), **gathered}


def run(args: argparse.Namespace, comm: Communicator) -> dict:
    setup = build(comm, momentum_dtype=args.momentum_dtype)
    result = {"world_size": comm.world_size, "backend": comm.name, "losses": {}, "saved": {}}
    step = 0
    if args.resume:
        state = load_checkpoint(args.resume, setup.parts(), comm=comm)
        step = state.step
        result["loaded"] = gathered_centers(setup)
        result["state"] = {
            "step": state.step,
            "resharded": state.resharded,
            "rng_restored": state.rng_restored,
            "sampler_restarted": state.sampler_restarted,
            "position": setup.sampler.position,
        }
    while True:
        if step in args.save_at:
            save_checkpoint(
                args.save_root, setup.parts(), comm=comm, step=step, epoch=setup.sampler.epoch, config={"seed": 0}
            )
            result["saved"][step] = gathered_centers(setup)
        if step >= args.steps:
            break
        step += 1
        result["losses"][step] = train_step(setup)
    result["final"] = gathered_centers(setup)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0, help="train until this many steps are done")
    parser.add_argument("--save-at", type=int, nargs="*", default=[], help="save after these many steps")
    parser.add_argument("--save-root")
    parser.add_argument("--resume")
    parser.add_argument("--momentum-dtype", default="storage", help="SparseSGD's momentum_dtype")
    args = parser.parse_args()
    comm = get_communicator()

    def work() -> None:
        result = run(args, comm)
        if comm.rank == 0:
            torch.save(result, Path(args.out) / "result.pt")

    run_and_exit(comm, args.out, work)


if __name__ == "__main__":
    main()
