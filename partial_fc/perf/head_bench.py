"""The Partial FC head's step timed by phase against the floor of its three matrix products (`partial-fc bench head`).

One result per run: median seconds of forward, backward and center update; the median of the same step's three
products alone (W X^T, G^T W, G X at the sampled size, in the head's [classes, batch] layout), timed right after
each step; and the largest peak memory of any rank over the head's steps (RSS on CPU, allocated bytes on GPU).
Step and floor are each the slowest rank's median. The result also states the run's conditions
(`perf.conditions`: load average, cores, threads, ranks, and the floor timed alone at start as a reference) and
its `warnings`. A configuration whose estimated memory per rank (`perf.memory`) exceeds what is available is
not run: the result says "does not fit".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from partial_fc.comm import Communicator, ReduceOp
from partial_fc.engine.config import DTYPES
from partial_fc.heads import CombinedMargin, PartialFC, SparseSGD
from partial_fc.heads.partial_fc import default_chunk_rows
from partial_fc.heads.sharding import shard_range
from partial_fc.heads.sparse_sgd import center_sgd
from partial_fc.perf.conditions import BenchConditions
from partial_fc.perf.memory import (
    GIB,
    available_bytes_per_rank,
    does_not_fit_message,
    estimate_head_memory,
    in_use_bytes,
    peak_bytes,
    reset_peak,
)

# The centers' optimizer in every run: arcface_torch's SGD settings.
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
# Above this many bytes of whole-size operands and products the floor is timed in row blocks (see MatmulFloor).
FLOOR_WHOLE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class HeadBenchSettings:
    """One configuration of the head to time: its sizes, margin, storage and optimizer, and how to time it."""

    classes: int
    dim: int
    batch: int  # per rank
    sample_rate: float
    margin: CombinedMargin
    steps: int
    storage_dtype: str
    momentum_dtype: str | None  # None: the storage dtype
    fp16: bool
    seed: int
    warmup: int
    update_in_step: bool
    reference_repeats: int
    force: bool


def build_head(settings: HeadBenchSettings, comm: Communicator) -> tuple[PartialFC, SparseSGD]:
    """The head and its centers' optimizer as `settings` describe them."""
    head = PartialFC(
        settings.margin,
        settings.dim,
        settings.classes,
        settings.sample_rate,
        settings.fp16,
        comm=comm,
        storage_dtype=DTYPES[settings.storage_dtype],
        seed=settings.seed,
    )
    optimizer = center_sgd(
        head, LR, MOMENTUM, WEIGHT_DECAY, not settings.update_in_step, settings.momentum_dtype or "storage"
    )
    return head, optimizer


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    _synchronize(device)
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def _max_over_ranks(comm: Communicator, *values: float) -> list[float]:
    return comm.all_reduce(torch.tensor(values, dtype=torch.float64, device=comm.device), ReduceOp.MAX).tolist()


class MatmulFloor:
    """The step's three products alone, at this rank's sampled size and in the head's matmul dtype.

    The products write into buffers made once (as the head writes into its own), so the floor times the
    arithmetic alone: a fresh 50 MB output on a CPU costs ~25 ms of page faults, 15% of such a product. When
    whole-size operands and products would take more than `FLOOR_WHOLE_LIMIT_BYTES` (10M classes: 2.9 GiB a rank,
    beside an 8 GiB head), the same products are timed in blocks of the head's chunk rows, as the head computes
    them, with block-sized buffers (`layout` "blocks"; else "whole", one block of every sampled row). Blocks
    run somewhat faster than the whole products, so step / floor is then, if anything, overstated.
    """

    def __init__(self, settings: HeadBenchSettings, comm: Communicator) -> None:
        device, rows = comm.device, shard_range(settings.classes, comm.world_size, comm.rank)[1]
        dtype = torch.promote_types(DTYPES[settings.storage_dtype], torch.float32)  # the head's working dtype
        matmul_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if settings.fp16 else dtype
        sampled, batch_total = max(1, int(settings.sample_rate * rows)), settings.batch * comm.world_size
        whole_bytes = 2 * sampled * (settings.dim + batch_total) * torch.empty((), dtype=matmul_dtype).element_size()
        self.layout = "blocks" if whole_bytes > FLOOR_WHOLE_LIMIT_BYTES else "whole"
        self.sampled = sampled
        self.device = device
        block = min(sampled, default_chunk_rows(device)) if self.layout == "blocks" else sampled
        self.x = torch.randn(batch_total, settings.dim, device=device, dtype=matmul_dtype)
        self.w = torch.randn(block, settings.dim, device=device, dtype=matmul_dtype)
        self.g = torch.randn(block, batch_total, device=device, dtype=matmul_dtype)
        self.logits = torch.empty(block, batch_total, device=device, dtype=matmul_dtype)
        self.grad_x = torch.empty(batch_total, settings.dim, device=device, dtype=matmul_dtype)
        self.grad_w = torch.empty(block, settings.dim, device=device, dtype=matmul_dtype)

    def products(self) -> None:
        self.grad_x.zero_()
        block = self.w.shape[0]
        for start in range(0, self.sampled, block):
            count = min(block, self.sampled - start)
            w, g = self.w[:count], self.g[:count]
            torch.mm(w, self.x.t(), out=self.logits[:count])
            self.grad_x.addmm_(g.t(), w)
            torch.mm(g, self.x, out=self.grad_w[:count])

    def seconds(self) -> float:
        return _timed(self.device, self.products)


def timed_step(
    head: PartialFC, optimizer: SparseSGD, settings: HeadBenchSettings, generator: torch.Generator
) -> dict[str, float]:
    """Seconds of one step's forward, backward and center update, on fresh random embeddings and labels."""
    device = head.weight.device
    embeddings = torch.randn(settings.batch, settings.dim, device=device, generator=generator, requires_grad=True)
    labels = torch.randint(0, settings.classes, (settings.batch,), device=device, generator=generator)
    head.comm.barrier()
    box: dict[str, torch.Tensor] = {}
    return {
        "forward": _timed(device, lambda: box.setdefault("loss", head(embeddings, labels))),
        "backward": _timed(device, lambda: box["loss"].backward()),
        "update": _timed(device, optimizer.step),
    }


def reference_floor(settings: HeadBenchSettings, comm: Communicator) -> float:
    """The floor's median timed alone on this rank before the head exists (its buffers are freed after)."""
    floor = MatmulFloor(settings, comm)
    floor.products()
    floor.products()  # twice: the allocator settles on its outputs' sizes, as it has in the steps
    comm.barrier()  # every rank times it at once, as in the steps
    seconds = statistics.median(floor.seconds() for _ in range(max(1, settings.reference_repeats)))
    del floor
    if comm.device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def _warm_up_process(settings: HeadBenchSettings, comm: Communicator) -> None:
    """One step of a tiny head: the process's one-time costs (lazy imports, kernel set-up, the autograd engine)
    are paid before the memory it holds is read as the baseline of the estimate."""
    tiny = replace(settings, classes=2 * comm.world_size, dim=8, sample_rate=1.0)
    head, optimizer = build_head(tiny, comm)
    embeddings = torch.randn(2, 8, device=comm.device, requires_grad=True)
    head(embeddings, torch.zeros(2, dtype=torch.int64, device=comm.device)).backward()
    optimizer.step()


def _description(settings: HeadBenchSettings, comm: Communicator) -> dict:
    return {
        "bench": "head",
        "backend": comm.name,
        "device": comm.device.type,
        **({"device_name": torch.cuda.get_device_name(comm.device)} if comm.device.type == "cuda" else {}),
        "ranks": comm.world_size,
        "classes": settings.classes,
        "dim": settings.dim,
        "batch_per_rank": settings.batch,
        "sample_rate": settings.sample_rate,
        "storage_dtype": settings.storage_dtype,
        "update": "step" if settings.update_in_step else "backward",
        **({"momentum_dtype": settings.momentum_dtype} if settings.momentum_dtype else {}),
    }


def _memory_plan(settings: HeadBenchSettings, comm: Communicator) -> dict:
    """The estimated peak per rank (this process's memory now + the head's), what is available, whether it fits
    (every rank's answer; the collective also keeps every rank from allocating before all have looked)."""
    head = estimate_head_memory(
        settings.classes,
        settings.dim,
        settings.batch * comm.world_size,
        settings.sample_rate,
        comm.world_size,
        settings.storage_dtype,
        settings.momentum_dtype,
        update_in_step=settings.update_in_step,
        fp16=settings.fp16,
        chunk_rows=default_chunk_rows(comm.device),
    )
    needed = in_use_bytes(comm.device) + head.total
    available = available_bytes_per_rank(comm.device)
    needed, least_available = _max_over_ranks(comm, needed, -available)
    return {
        "needed": needed,
        "available": -least_available,
        "fits": needed <= -least_available,
        "head_gib": head.gib()["total"],
    }


def run_head_bench(settings: HeadBenchSettings, comm: Communicator) -> dict:
    """Time the head on every rank; every rank returns the same result (`fits` False, with a message, if not run)."""
    device = comm.device
    conditions = BenchConditions(comm.world_size)
    _warm_up_process(settings, comm)
    plan = _memory_plan(settings, comm)
    memory = {
        "estimated_memory_gib": round(plan["needed"] / GIB, 3),
        "available_memory_gib": round(plan["available"] / GIB, 3),
    }
    if not plan["fits"] and not settings.force:
        message = does_not_fit_message(plan["needed"], plan["available"])
        return {**_description(settings, comm), **memory, "fits": False, "message": message, **conditions.finish()}
    reference = reference_floor(settings, comm)
    conditions.sample()
    reset_peak(device)
    baseline = in_use_bytes(device)
    head, optimizer = build_head(settings, comm)
    generator = torch.Generator(device=device).manual_seed(settings.seed + 1000 * comm.rank)
    # Warm-up steps reach the steady working set; the peak is read before the floor's buffers exist.
    for _ in range(max(2, settings.warmup)):
        timed_step(head, optimizer, settings, generator)
    peak_memory, baseline_memory = (value / GIB for value in _max_over_ranks(comm, peak_bytes(device), baseline))
    # Each timed step is followed by one timing of its floor, so both see the same machine.
    floor = MatmulFloor(settings, comm)
    floor.products()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "update": [], "floor": []}
    for _ in range(settings.steps):
        for name, seconds in {**timed_step(head, optimizer, settings, generator), "floor": floor.seconds()}.items():
            phases[name].append(seconds)
        conditions.sample()
    medians = {name: statistics.median(values) for name, values in phases.items()}
    step_seconds = medians["forward"] + medians["backward"] + medians["update"]
    step_seconds, floor_seconds, reference_seconds, slowdown, wait_share = _max_over_ranks(
        comm, step_seconds, medians["floor"], reference, medians["floor"] / reference, conditions.wait_share()
    )
    conditions.record_floor(reference_seconds, floor_seconds, slowdown)
    return {
        **_description(settings, comm),
        "sampled_per_rank": head.num_sample,
        "steps": settings.steps,
        "forward_s": round(medians["forward"], 5),
        "backward_s": round(medians["backward"], 5),
        "update_s": round(medians["update"], 5),
        "step_s": round(step_seconds, 5),
        "matmul_floor_s": round(floor_seconds, 5),
        "matmul_floor_layout": floor.layout,
        "step_over_floor": round(step_seconds / floor_seconds, 3),
        "peak_memory_gib": round(peak_memory, 3),
        "baseline_memory_gib": round(baseline_memory, 3),
        "head_estimate_gib": round(plan["head_gib"], 3),
        **memory,
        "fits": True,
        **conditions.finish(wait_share=wait_share),
    }
