"""The Partial FC head: this rank's shard of class centers, sampling, and the sharded margin softmax loss.

Constructor and call match arcface_torch's PartialFC_V2:
`PartialFC(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False)(local_embeddings, local_labels)`.
The centers are updated by `SparseSGD(head, lr, momentum, weight_decay)` or `SparseAdamW(head, lr, ...)` on
the rows sampled in the step. `interclass_filtering_threshold` is Partial FC v2's filtering of negatives
whose cosine exceeds it (taken from an arcface_torch CombinedMarginLoss that carries one, too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partial_fc.comm import Communicator, get_communicator
from partial_fc.errors import InputError
from partial_fc.heads.margins import as_margin
from partial_fc.heads.row_tables import new_row_table
from partial_fc.heads.sampling import RowUpdater, SampledRows, sample_centers
from partial_fc.heads.sharded_softmax import ReusedBuffer, ShardedMarginSoftmaxLoss, ShardedSoftmaxInputs
from partial_fc.heads.sharding import shard_range
from partial_fc.heads.softmax_kernels import native_softmax_usable

# Forward passes whose sampled rows may wait for SparseSGD.step(); more means nobody is updating the centers.
MAX_PENDING_STEPS = 64

# Per-rank batch facts gathered before any other collective, so every rank can reject bad input together, and
# whether the rank can run the softmax's C passes (all ranks must, for its collectives to match).
_FACTS = ("batch", "width", "labels", "finite", "min_label", "max_label", "integer_labels", "native_softmax")


# Centers are initialised in blocks of this many global classes, each from its own seed.
INIT_BLOCK_ROWS = 16384

# Sampled centers are processed this many rows at a time. On a CPU, 1024 keeps a chunk's [rows, D] working arrays
# in the caches (5% faster steps than 8192 at 1M classes, r=0.1, 2 ranks); a GPU wants larger products.
CPU_CHUNK_ROWS = 1024
GPU_CHUNK_ROWS = 8192


def default_chunk_rows(device: torch.device) -> int:
    """The head's chunk of sampled rows on `device` when none is given."""
    return CPU_CHUNK_ROWS if device.type == "cpu" else GPU_CHUNK_ROWS


def initialise_centers(weight: torch.Tensor, class_start: int, seed: int, std: float) -> None:
    """Fill a shard with N(0, std) rows that depend only on their global class ids and `seed`.

    Every world size therefore starts from the same centers: a run on 2 ranks and one on 3 are comparable.
    """
    end = class_start + weight.shape[0]
    for block in range(class_start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1):
        block_start = block * INIT_BLOCK_ROWS
        generator = torch.Generator().manual_seed(_rank_seed(seed, -1 - block))
        values = torch.randn((INIT_BLOCK_ROWS, weight.shape[1]), generator=generator).mul_(std)
        lo, hi = max(class_start, block_start), min(end, block_start + INIT_BLOCK_ROWS)
        weight[lo - class_start : hi - class_start] = values[lo - block_start : hi - block_start]


def _filtering_threshold(margin_loss: Any, threshold: Any) -> Any:
    """The keyword's threshold, or else one carried by an arcface_torch CombinedMarginLoss; both set must agree."""
    carried = getattr(margin_loss, "interclass_filtering_threshold", 0.0)
    if not carried:
        return threshold
    if threshold and threshold != carried:
        raise InputError(
            f"PartialFC interclass_filtering_threshold={threshold!r} differs from the margin_loss's {carried!r}"
        )
    return carried


def _rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible sampling streams per rank (identical seeds would correlate the shards' negatives)."""
    return (seed * 1_000_003 + rank * 7919 + 12345) % (2**63 - 1)


class NonFiniteEmbeddings(InputError):
    """Some rank's embeddings hold NaN or infinity; raised alike on every rank, so a trainer may skip the step."""


class PartialFC(nn.Module):
    """Sharded class centers with sampled margin softmax; `forward` returns the mean loss over the global batch.

    Gradient contract (arcface_torch's PartialFC_V2 convention): backward hands each rank's local embeddings
    `world_size` times d(loss)/d(its embeddings), so a backbone whose gradients are *averaged* over ranks (DDP,
    Horovod's DistributedOptimizer with its default op, `engine.distribute_backbone`) receives exactly the
    gradient one process would get on the concatenated global batch. The centers get the global gradient as is.

    Keyword options: `comm` (defaults to the launch's communicator), `storage_dtype` of centers and
    optimizer state (float32, bfloat16, float16 or float64), `seed` of the negative sampling, `init_std`,
    `chunk_rows` of sampled centers processed at a time (default: `default_chunk_rows` of the device),
    `interclass_filtering_threshold` in [0, 1): negatives with a larger cosine count as cosine 0 and get
    no gradient (0 disables the filter). `initialise=False` leaves the shard's memory untouched until
    `reset_centers()` or a checkpoint fills it (a resume, which would overwrite the whole shard anyway).
    """

    def __init__(
        self,
        margin_loss: Any,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        comm: Communicator | None = None,
        storage_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        init_std: float = 0.01,
        chunk_rows: int | None = None,
        interclass_filtering_threshold: float = 0.0,
        initialise: bool = True,
    ) -> None:
        super().__init__()
        self.comm = comm if comm is not None else get_communicator()
        chunk_rows = default_chunk_rows(self.comm.device) if chunk_rows is None else chunk_rows
        threshold = _filtering_threshold(margin_loss, interclass_filtering_threshold)
        self._check_arguments(embedding_size, num_classes, sample_rate, storage_dtype, chunk_rows, threshold)
        self.margin = as_margin(margin_loss)
        self.interclass_filtering_threshold = float(threshold)
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.chunk_rows = int(chunk_rows)
        self.class_start, self.num_local = shard_range(self.num_classes, self.comm.world_size, self.comm.rank)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        device = self.comm.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(_rank_seed(seed, self.comm.rank))
        weight = new_row_table((self.num_local, self.embedding_size), storage_dtype, device, zero=False)
        self._init_seed, self._init_std = seed, init_std
        if initialise:
            initialise_centers(weight, self.class_start, seed, init_std)
        self.register_buffer("weight", weight)
        self._sampled: list[SampledRows] = []
        self.row_updater: RowUpdater | None = None  # set by an optimizer that updates rows during backward
        self._backward_trigger = torch.zeros((), requires_grad=True)
        workspace_rows = min(self.chunk_rows, self.num_local)
        self.workspace = torch.empty((workspace_rows, self.embedding_size), dtype=self.working_dtype, device=device)
        self.logits_buffer = ReusedBuffer()

    @torch.no_grad()
    def reset_centers(self) -> None:
        """Fill the shard with its initial centers (seeded by global class id), as the constructor does."""
        initialise_centers(self.weight, self.class_start, self._init_seed, self._init_std)

    @property
    def working_dtype(self) -> torch.dtype:
        """The dtype of the head's arithmetic: float32, or float64 when the centers are stored in float64."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _check_arguments(self, embedding_size, num_classes, sample_rate, storage_dtype, chunk_rows, threshold) -> None:
        """Validate on every rank after one collective, so a bad or mismatched value fails all ranks alike."""

        def number(value: Any) -> float:
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

        names = ("embedding_size", "num_classes", "sample_rate", "interclass_filtering_threshold")
        given = (embedding_size, num_classes, sample_rate, threshold)
        values = torch.tensor([number(value) for value in given], dtype=torch.float64)
        every = self.comm.all_gather(values.to(self.comm.device).unsqueeze(0), sizes=[1] * self.comm.world_size)
        for column, name in enumerate(names):
            column_values = every[:, column].tolist()
            if any(
                v != column_values[0] and not (math.isnan(v) and math.isnan(column_values[0])) for v in column_values
            ):
                listing = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column_values))
                raise InputError(f"PartialFC {name} differs between ranks ({listing})")
        if not (isinstance(embedding_size, int) and embedding_size > 0):
            raise InputError(f"PartialFC embedding_size={embedding_size!r} must be a positive integer")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise InputError(f"PartialFC num_classes={num_classes!r} must be a positive integer")
        if num_classes < self.comm.world_size:
            raise InputError(
                f"PartialFC num_classes={num_classes} is fewer than the {self.comm.world_size} ranks: "
                "every rank needs at least one class center"
            )
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise InputError(f"PartialFC sample_rate={sample_rate!r} must lie in (0, 1]")
        if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0.0 <= threshold < 1.0):
            raise InputError(f"PartialFC interclass_filtering_threshold={threshold!r} must lie in [0, 1)")
        if not (isinstance(chunk_rows, int) and chunk_rows > 0):
            raise InputError(f"PartialFC chunk_rows={chunk_rows!r} must be a positive integer")
        if storage_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise InputError(f"PartialFC storage_dtype={storage_dtype} must be float32, float64, bfloat16 or float16")

    def _gather_batch_facts(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], bool]:
        """All ranks' batch sizes, after checking every rank's batch (raising the same InputError on every rank),
        and whether every rank can run the softmax's C passes."""
        device = self.comm.device
        width = embeddings.shape[1] if embeddings.dim() == 2 else -1
        integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
        flat = labels.reshape(-1)
        empty = flat.numel() == 0 or not integer
        zero = torch.zeros((), dtype=torch.int64, device=device)
        facts = torch.stack(
            [
                torch.tensor(embeddings.shape[0] if embeddings.dim() else 0, device=device),
                torch.tensor(width, device=device),
                torch.tensor(flat.numel(), device=device),
                torch.isfinite(embeddings).all().to(device=device, dtype=torch.int64),
                zero if empty else flat.min().to(device=device, dtype=torch.int64),
                zero if empty else flat.max().to(device=device, dtype=torch.int64),
                torch.tensor(int(integer), device=device),
                torch.tensor(int(native_softmax_usable(self.workspace)), device=device),
            ]
        ).to(torch.int64)
        every = self.comm.all_gather(facts.unsqueeze(0), sizes=[1] * self.comm.world_size).tolist()
        for rank, row in enumerate(every):
            fact = dict(zip(_FACTS, row))
            where = f"PartialFC input on rank {rank}"
            if fact["width"] != self.embedding_size:
                raise InputError(
                    f"{where}: embeddings must be [batch, {self.embedding_size}], got width {fact['width']}"
                )
            if not fact["integer_labels"]:
                raise InputError(f"{where}: labels must be an integer tensor")
            if fact["labels"] != fact["batch"]:
                raise InputError(f"{where}: {fact['labels']} labels for {fact['batch']} embeddings")
            if not fact["finite"]:
                raise NonFiniteEmbeddings(f"{where}: embeddings contain NaN or infinity")
            for key in ("min_label", "max_label"):
                if fact["batch"] and not 0 <= fact[key] < self.num_classes:
                    raise InputError(f"{where}: label {fact[key]} is outside [0, {self.num_classes})")
        sizes = [int(row[0]) for row in every]
        if sum(sizes) == 0:
            raise InputError("PartialFC input: every rank's batch is empty")
        return sizes, all(row[_FACTS.index("native_softmax")] for row in every)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Gather the batch from every rank, sample centers, and return the global mean margin-softmax loss."""
        sizes, native_softmax = self._gather_batch_facts(local_embeddings, local_labels)
        labels = self.comm.all_gather(local_labels.reshape(-1).to(device=self.comm.device, dtype=torch.int64), sizes)
        # The loss is the global-batch mean; each rank's embeddings get world_size times their share of its
        # gradient, so that the backbone's averaging all-reduce (DDP, Horovod) yields the global-batch gradient.
        embeddings = self.comm.all_gather_with_grad(
            local_embeddings.to(self.working_dtype), sizes, grad_scale=self.comm.world_size
        )
        sampled = sample_centers(labels, self.class_start, self.num_local, self.num_sample, self.generator)
        sampled_rows = None
        if torch.is_grad_enabled():
            self._check_pending_updates()
            sampled_rows = SampledRows(sampled.index, self.row_updater)
            self._sampled.append(sampled_rows)
        matmul_dtype = None
        if self.fp16:
            matmul_dtype = torch.float16 if embeddings.is_cuda else torch.bfloat16
        inputs = ShardedSoftmaxInputs(
            self.weight,
            sampled,
            self.margin,
            self.interclass_filtering_threshold,
            self.comm,
            matmul_dtype,
            self.workspace,
            self.logits_buffer,
            sampled_rows,
            native_softmax,
        )
        trigger = self._backward_trigger if sampled_rows is not None else None
        return ShardedMarginSoftmaxLoss.apply(F.normalize(embeddings, dim=1), inputs, trigger)

    def _check_pending_updates(self) -> None:
        """Catch a training loop that never steps its optimizer, or accumulates gradients into in-backward updates."""
        if self.row_updater is not None and self._sampled:
            raise RuntimeError(
                "PartialFC: a second training forward before SparseSGD.step() (or SparseAdamW.step()): call "
                "step() after every backward, or, for gradient accumulation, create the optimizer with "
                "update_in_backward=False"
            )
        if len(self._sampled) >= MAX_PENDING_STEPS:
            raise RuntimeError(
                f"PartialFC ran {MAX_PENDING_STEPS} training forwards without SparseSGD.step() (or "
                "SparseAdamW.step()): the centers are not being updated; create SparseSGD(head, lr, ...) and step "
                "it after backward"
            )

    def take_sampled(self) -> list[SampledRows]:
        """Hand over the sampled rows (and gradients) of every forward since the last call; used by the optimizers."""
        sampled, self._sampled = self._sampled, []
        return sampled

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"shard=[{self.class_start}, {self.class_start + self.num_local}), sample_rate={self.sample_rate}, "
            f"margin={self.margin}, storage_dtype={self.weight.dtype}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )
