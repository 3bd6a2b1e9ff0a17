"""The training DataLoader: worker processes, prefetch, pinned memory on CUDA, and resumable epoch accounting.

``build_loader`` batches a ``DistributedEpochSampler`` with ``EpochBatchSampler`` (each batch carries the seed
its flips draw from) and returns an ``EpochLoader``: it advances the sampler by each batch it hands to the
training loop (prefetched batches do not count), so ``sampler.state_dict()`` taken in the loop body counts the
batch being trained on; an epoch read to its end moves the sampler to the next epoch. A batch of decoded images
comes as a ``LoadedBatch``, which unpacks as ``images, labels`` and carries the bad records its worker skipped.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from partial_fc.data.bad_records import BadRecord
from partial_fc.data.datasets import StackedSamples
from partial_fc.data.decode import normalize_images
from partial_fc.data.sampler import DistributedEpochSampler, EpochBatchSampler

__all__ = ["EpochLoader", "LoadedBatch", "WorkerSetup", "build_loader", "collate", "device_batch", "to_device"]


class LoadedBatch:
    """A batch's uint8 ``images`` [B, H, W, 3] and ``labels`` [B] (it unpacks as ``images, labels``), and the
    ``bad_records`` skipped to fill it. Not a tuple, so that pinning memory keeps it whole."""

    __slots__ = ("images", "labels", "bad_records")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, bad_records: Sequence[BadRecord] = ()):
        self.images, self.labels, self.bad_records = images, labels, list(bad_records)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.images, self.labels))

    def pin_memory(self) -> LoadedBatch:
        """The batch with its tensors in pinned memory (what DataLoader's ``pin_memory`` calls)."""
        return LoadedBatch(self.images.pin_memory(), self.labels.pin_memory(), self.bad_records)


def collate(samples: Any) -> Any:
    """``StackedSamples`` as a ``LoadedBatch`` of their tensors (no copy), anything else by default_collate."""
    if isinstance(samples, StackedSamples):
        return LoadedBatch(samples.images, samples.labels, samples.bad_records)
    return default_collate(samples)


# How often a worker not forked from the trainer checks that the trainer is still there.
TRAINER_CHECK_INTERVAL_S = 0.5


def _exit_when_gone(pid: int) -> None:
    """End this worker once process `pid` no longer exists (the trainer exited, crashed or was killed)."""
    while True:
        time.sleep(TRAINER_CHECK_INTERVAL_S)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: another user's process took the pid
            os._exit(0)


class WorkerSetup:
    """``worker_init_fn``: seeds a worker's ``random``, numpy and torch generators from (seed, epoch, rank, worker),
    and ends a worker whose parent is not the trainer once the trainer is gone.

    Flips do not depend on these (they draw from each batch's seed); they are for any other randomness a
    dataset uses, and make it reproducible. The epoch is the sampler's when the worker starts. A forked worker
    watches its parent itself (DataLoader's own check); one started through a fork server (``trainer_pid``) has
    the server as parent, which outlives a trainer that ends with ``os._exit`` or is killed.
    """

    def __init__(self, seed: int, sampler: DistributedEpochSampler, trainer_pid: int | None = None):
        """Seed from ``seed`` and ``sampler``'s epoch and rank; watch ``trainer_pid`` when given."""
        self.seed, self.sampler, self.trainer_pid = seed, sampler, trainer_pid

    def __call__(self, worker_id: int) -> None:
        """Seed this worker process's global generators; start watching the trainer."""
        entropy = [self.seed, self.sampler.epoch, self.sampler.rank, worker_id]
        state = np.random.SeedSequence(entropy).generate_state(4)
        random.seed(int(state[0]))
        np.random.seed(state)
        torch.manual_seed(int(state[1]) << 32 | int(state[2]))
        if self.trainer_pid is not None:
            threading.Thread(
                target=_exit_when_gone, args=(self.trainer_pid,), name="trainer-watch", daemon=True
            ).start()


class EpochLoader(DataLoader):
    """A DataLoader over an ``EpochBatchSampler`` that counts delivered batches into its epoch sampler."""

    def __init__(self, dataset: Dataset, batch_sampler: EpochBatchSampler, **kwargs: Any):
        """``DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)``, remembering the epoch sampler."""
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.epoch_sampler = batch_sampler.sampler
        self.epoch_batch_size = batch_sampler.batch_size

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # wraps DataLoader's iterator
        """The rest of the sampler's current epoch; on reaching its end, the sampler moves to the next epoch."""
        sampler = self.epoch_sampler
        for batch in super().__iter__():
            sampler.advance(min(self.epoch_batch_size, sampler.remaining))
            yield batch
        sampler.set_epoch(sampler.epoch + 1)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: DistributedEpochSampler,
    num_workers: int = 4,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
    drop_last: bool = True,
    seed: int = 0,
    start_method: str | None = None,
) -> EpochLoader:
    """A loader of ``batch_size`` batches from ``sampler``'s epochs: persistent workers when ``num_workers > 0``,
    ``prefetch_factor`` batches ahead per worker, memory pinned when CUDA is available (``pin_memory=None``).

    ``start_method`` is how the workers start (None: the platform's default, fork on Linux). A forked worker
    keeps a copy-on-write image of everything the process held, so each page the process writes afterwards is
    duplicated; "forkserver" starts them from a fresh process instead (the dataset is pickled to them), and
    they end themselves when this process is gone.
    """
    workers = num_workers > 0
    return EpochLoader(
        dataset,
        EpochBatchSampler(sampler, batch_size, drop_last, seed),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=workers,
        worker_init_fn=WorkerSetup(seed, sampler, None if start_method in (None, "fork") else os.getpid())
        if workers
        else None,
        multiprocessing_context=start_method if workers else None,
        generator=torch.Generator().manual_seed(seed),  # DataLoader's own seeds: fixed, and the global RNG untouched
    )


Batch = torch.Tensor | Mapping | list | tuple | Any


def to_device(batch: Batch, device: str | torch.device) -> Batch:
    """Move every tensor in ``batch`` (nested tuples, lists, dicts: mappings come back as dicts) to ``device``;
    pinned tensors copy asynchronously."""
    if isinstance(batch, torch.Tensor):
        device = torch.device(device)
        non_blocking = device.type != "cpu" and batch.device.type == "cpu" and batch.is_pinned()
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def device_batch(
    batch: tuple[torch.Tensor, torch.Tensor], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's ``(uint8 images [B, H, W, 3], labels)`` as network input on ``device``: the uint8 pixels are
    copied (a quarter of the float bytes), then normalised there to float32 [B, 3, H, W] (channels-last)."""
    images, labels = batch
    return normalize_images(to_device(images, device)), to_device(labels, device)
