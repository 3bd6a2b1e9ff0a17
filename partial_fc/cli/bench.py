"""`partial-fc bench head` (and the dispatch to `bench data`): time the head's step by phase against the floor of its three matrix products.

Prints one JSON line: median seconds of forward, backward and center update; the median of the same
step's three products alone (W X^T, G^T W, G X at the sampled size, in the head's [classes, batch]
layout), timed right after each step; and the largest peak memory of any rank over the head's steps
(RSS on CPU, allocated bytes on GPU). Step and floor are each the slowest rank's median.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Callable

import torch

from partial_fc.cli import bench_data, bench_ijb
from partial_fc.cli.common import add_head_options, head_from_options, print_rank0
from partial_fc.comm import Communicator, ReduceOp, get_communicator
from partial_fc.heads import PartialFC, SparseSGD

GIB = 1024.0**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True)
    head = sub.add_parser("head", help="the Partial FC head's step and its matmul floor")
    add_head_options(head)
    head.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 2)")
    head.add_argument(
        "--update-in-step",
        action="store_true",
        help="keep the sampled rows' gradient for step() (the gradient-accumulation mode) instead of updating in backward",
    )
    head.set_defaults(steps=10)
    bench_data.add_arguments(sub.add_parser("data", help="images per second per worker for read, decode, augment"))
    bench_ijb.add_arguments(sub.add_parser("eval-ijb", help="IJB images/s (align + embed + flip) and pairs/s of scoring"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    _synchronize(device)
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def _peak_memory_gib(comm: Communicator) -> float:
    """Largest peak over ranks: CUDA allocated bytes on GPU, the process's maximum RSS on CPU."""
    if comm.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(comm.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    value = torch.tensor([peak / GIB], dtype=torch.float64, device=comm.device)
    return comm.all_reduce(value, ReduceOp.MAX).item()


class MatmulFloor:
    """The step's three products alone, at this rank's sampled size and in the head's matmul dtype."""

    def __init__(self, head: PartialFC, batch_total: int) -> None:
        device, dtype = head.weight.device, head.working_dtype
        matmul_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if head.fp16 else dtype
        self.device = device
        self.x = torch.randn(batch_total, head.embedding_size, device=device, dtype=matmul_dtype)
        self.w = torch.randn(head.num_sample, head.embedding_size, device=device, dtype=matmul_dtype)
        self.g = torch.randn(head.num_sample, batch_total, device=device, dtype=matmul_dtype)

    def products(self) -> None:
        self.w @ self.x.t()
        self.g.t() @ self.w
        self.g @ self.x

    def seconds(self) -> float:
        return _timed(self.device, self.products)


def _timed_step(head: PartialFC, optimizer: SparseSGD, args: argparse.Namespace, generator: torch.Generator) -> dict:
    """Seconds of one step's forward, backward and center update, on fresh random embeddings and labels."""
    device = head.weight.device
    embeddings = torch.randn(args.batch, args.dim, device=device, generator=generator, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)
    head.comm.barrier()
    box: dict[str, torch.Tensor] = {}
    return {
        "forward": _timed(device, lambda: box.setdefault("loss", head(embeddings, labels))),
        "backward": _timed(device, lambda: box["loss"].backward()),
        "update": _timed(device, optimizer.step),
    }


def run_head(args: argparse.Namespace) -> int:
    comm = get_communicator(args.backend)
    device = comm.device
    head = head_from_options(args, comm)
    optimizer = SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=not args.update_in_step)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1000 * comm.rank)
    # Warm-up steps reach the steady working set; the peak is read before the floor's buffers exist.
    for _ in range(max(2, args.warmup)):
        _timed_step(head, optimizer, args, generator)
    peak_memory = _peak_memory_gib(comm)
    # Each timed step is followed by one timing of its floor, so both see the same machine.
    floor = MatmulFloor(head, args.batch * comm.world_size)
    floor.products()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "update": [], "floor": []}
    for _ in range(args.steps):
        for name, seconds in {**_timed_step(head, optimizer, args, generator), "floor": floor.seconds()}.items():
            phases[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in phases.items()}
    step_seconds = medians["forward"] + medians["backward"] + medians["update"]
    worst = torch.tensor([step_seconds, medians["floor"]], dtype=torch.float64, device=device)
    step_seconds, floor_seconds = comm.all_reduce(worst, ReduceOp.MAX).tolist()
    print_rank0(
        comm,
        {
            "bench": "head",
            "backend": comm.name,
            "device": device.type,
            "ranks": comm.world_size,
            "threads_per_rank": torch.get_num_threads(),
            "classes": args.classes,
            "dim": args.dim,
            "batch_per_rank": args.batch,
            "sample_rate": args.sample_rate,
            "sampled_per_rank": head.num_sample,
            "storage_dtype": args.storage_dtype,
            "update": "step" if args.update_in_step else "backward",
            "steps": args.steps,
            "forward_s": round(medians["forward"], 5),
            "backward_s": round(medians["backward"], 5),
            "update_s": round(medians["update"], 5),
            "step_s": round(step_seconds, 5),
            "matmul_floor_s": round(floor_seconds, 5),
            "step_over_floor": round(step_seconds / floor_seconds, 3),
            "peak_memory_gib": round(peak_memory, 3),
        },
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.target == "eval-ijb":
        return bench_ijb.run(args)
    return run_head(args) if args.target == "head" else bench_data.run(args)
