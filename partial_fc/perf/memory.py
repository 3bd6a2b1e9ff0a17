"""Memory of the Partial FC head per rank: estimated from its sizes before anything is allocated, measured peaks,
and what the machine has available, so a benchmark that cannot fit is reported instead of run into the OOM killer.

The estimate follows the buffers the head and its optimizer allocate (`heads/partial_fc.py`,
`heads/sharded_softmax.py`, `heads/sampling.py`, `heads/sparse_sgd.py`, `heads/sparse_adamw.py`):

- persistent: the shard `[n, D]` in the storage dtype; the optimizer state (SGD: a momentum buffer `[n, D]`,
  in the storage dtype unless a momentum dtype is given; AdamW: two moments and an int64 step per row);
  the head's `[chunk, D]` workspace and the optimizer's (the gradient workspace when updating in
  backward, a velocity / two moment workspaces);
- per step, the larger of two phases: sampling (a float32 score per shard row, the top-k values and
  indices, their sort; or an int64 arange when every row is sampled) and the softmax (the `[S, B]` logits
  buffer that becomes the probabilities and the gradient, inverse norms, the sampled index, the gathered
  and normalised embeddings and their gradient, reduced-precision copies of a chunk, and with the update
  kept for `step()` the `[S, D]` gradient of the sampled rows);

with n the largest shard (`ceil(C / W)`), S its sampled rows and B the gathered batch (every rank's).
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from partial_fc.heads.partial_fc import CPU_CHUNK_ROWS

GIB = 1024.0**3

# Bytes per element of each dtype the head or a compact momentum may use, and per-row extras (a scale per row).
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
ROW_SCALE_BYTES = {"int8": 4, "uint8": 4, "float8_e4m3fn": 4, "float8_e5m2": 4}

# The environment variable that overrides the memory available per rank (GiB), e.g. to test the fit check.
AVAILABLE_ENV = "PARTIAL_FC_AVAILABLE_GIB"

_LOCAL_SIZE_ENV = ("OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32 or 'float32'."""
    return str(dtype).replace("torch.", "")


def element_bytes(name: str) -> int:
    """Bytes per element of a dtype named as torch names it (a compact momentum's too)."""
    if name in DTYPE_BYTES:
        return DTYPE_BYTES[name]
    dtype = getattr(torch, name, None)
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    raise ValueError(f"unknown dtype {name!r} for the memory estimate")


@dataclass(frozen=True)
class HeadMemory:
    """Bytes per rank of the head's parts; `total` is the peak the head adds to a process."""

    shard: int
    optimizer_state: int
    workspaces: int
    sampling: int
    softmax: int

    @property
    def persistent(self) -> int:
        return self.shard + self.optimizer_state + self.workspaces

    @property
    def total(self) -> int:
        return self.persistent + max(self.sampling, self.softmax)

    def gib(self) -> dict[str, float]:
        """Each part and the total, in GiB."""
        parts = {name: value / GIB for name, value in asdict(self).items()}
        return {**parts, "total": self.total / GIB}


def estimate_head_memory(
    num_classes: int,
    embedding_size: int,
    batch_total: int,
    sample_rate: float,
    world_size: int = 1,
    storage_dtype: torch.dtype | str = "float32",
    momentum_dtype: torch.dtype | str | None = None,
    update_in_step: bool = False,
    fp16: bool = False,
    optimizer: str = "sgd",
    chunk_rows: int = CPU_CHUNK_ROWS,
) -> HeadMemory:
    """The head's memory on its largest rank: `batch_total` is the gathered batch (every rank's samples), `fp16`
    the reduced-precision matmuls, `momentum_dtype` a compact momentum's dtype (default: the storage dtype)."""
    storage = dtype_name(storage_dtype)
    width = 8 if storage == "float64" else 4  # the working dtype: float32, float64 for float64 centers
    rows = -(-int(num_classes) // int(world_size))
    dim, batch = int(embedding_size), int(batch_total)
    sampled = rows if sample_rate >= 1.0 else max(max(1, int(sample_rate * rows)), min(rows, batch))
    chunk = min(int(chunk_rows), rows)
    chunk_bytes = chunk * dim * width
    shard = rows * dim * element_bytes(storage)
    in_backward = not update_in_step
    if optimizer == "sgd":
        momentum = storage if momentum_dtype in (None, "storage") else dtype_name(momentum_dtype)
        state = 0 if momentum == "none" else rows * (dim * element_bytes(momentum) + ROW_SCALE_BYTES.get(momentum, 0))
        own_workspaces = 1  # velocity
        if momentum in ROW_SCALE_BYTES:  # a compact momentum's chunk of codes and its float scratch chunk
            own_workspaces += 1 + element_bytes(momentum) / width
    elif optimizer == "adamw":
        state = 2 * rows * dim * element_bytes(storage) + 8 * rows
        own_workspaces = 2  # exp_avg, exp_avg_sq
    else:
        raise ValueError(f"optimizer {optimizer!r} is not sgd or adamw")
    workspaces = int(chunk_bytes * (1 + own_workspaces + in_backward))
    if sampled >= rows:
        sampling = 8 * rows  # arange
    else:
        sampling = 4 * rows + sampled * (4 + 8 + 8 + 8)  # scores; top-k values, indices; sorted values, indices
    softmax = sampled * batch * width + sampled * (width + 8)  # logits; inverse norms, index
    softmax += 3 * batch * dim * width + 3 * batch * 8  # gathered, normalised embeddings, their gradient; labels
    if fp16:
        softmax += 2 * (chunk * dim + batch * dim + chunk * batch)  # half copies of a chunk, the batch, a product
    if storage != ("float64" if width == 8 else "float32"):
        softmax += 2 * chunk * dim * element_bytes(storage)  # a chunk gathered, a chunk rounded for write-back
    if update_in_step:
        softmax += sampled * dim * width  # the sampled rows' gradient, kept for step()
    return HeadMemory(shard, state, workspaces, sampling, softmax)


def local_ranks() -> int:
    """Processes of this job on this host, from the launcher's environment (1 when not launched)."""
    for name in _LOCAL_SIZE_ENV:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM, which `reset_peak_rss` can reset; else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux's clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's peak allocated bytes, or the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device) -> int:
    """The peak since `reset_peak`: CUDA allocated bytes on a GPU, the process's RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def in_use_bytes(device: torch.device) -> int:
    """What this process holds now: CUDA allocated bytes, or its RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes()


def _cgroup_available() -> float:
    """Bytes the memory cgroup still allows (inf when unlimited or unknown)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:
            return float(int(limit) - usage)
    return math.inf


def host_available_bytes() -> float:
    """The host's MemAvailable, or less where the memory cgroup allows less."""
    available = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024.0
                break
    except (OSError, ValueError, IndexError):
        pass
    if math.isinf(available):
        available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(available, _cgroup_available())


def available_bytes_per_rank(device: torch.device, ranks_on_device: int | None = None) -> float:
    """Memory one rank may still take: the GPU's free memory, or the host's available memory shared by this
    host's ranks; `PARTIAL_FC_AVAILABLE_GIB` (GiB per rank) overrides both."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        return float(override) * GIB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / max(1, ranks_on_device or 1)
    return host_available_bytes() / max(1, ranks_on_device or local_ranks())


def does_not_fit_message(needed_bytes: float, available_bytes: float) -> str:
    return f"does not fit: needs ~{needed_bytes / GIB:.1f} GiB per rank, {available_bytes / GIB:.1f} GiB available"
