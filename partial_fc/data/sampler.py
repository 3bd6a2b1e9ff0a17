"""Per-rank epoch order for data-parallel training, resumable mid-epoch; rank and world size are plain integers.

Epoch ``e`` orders the whole set by one permutation drawn from ``(seed, e)`` (identity order without shuffle).
Like ``torch.utils.data.DistributedSampler``, the order is made a multiple of ``world_size`` (``drop_last=False``:
padded by wrapping around to its start, so a few samples are seen twice; ``drop_last=True``: its tail is cut, so
a few are not seen) and rank ``r`` takes every ``world_size``-th sample starting at ``r``. Ranks are disjoint,
cover the epoch, and all get ``num_samples`` indices.

The state is ``(epoch, position)``: ``position`` samples of this rank's epoch are consumed, and iterating starts
there. The sampler does not count what it hands out (a DataLoader prefetches ahead of training): the consumer
calls ``advance`` for what training received (``partial_fc.data.loader`` does). Because rank ``r`` has
consumed exactly the global positions ``k * world_size + r`` for ``k < position``, all ranks at one position
have consumed one prefix of the epoch's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from partial_fc.errors import InputError

__all__ = ["DistributedEpochSampler", "EpochBatchSampler", "SeededBatch", "position_uniforms"]

_CHUNK = 1 << 16  # indices turned into Python ints at a time (an epoch of millions never becomes one list)


def _count(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else ``InputError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class DistributedEpochSampler(Sampler[int]):
    """This rank's share of each epoch: disjoint across ranks, deterministic in (seed, epoch), resumable."""

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        """Sample ``range(dataset_len)`` for ``rank`` of ``world_size``; see the module docstring for padding."""
        self.dataset_len = _count(dataset_len, "dataset_len", 1)
        self.world_size = _count(world_size, "world_size", 1)
        self.rank = _count(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise InputError(f"rank {rank} is outside [0, world_size={world_size})")
        self.seed = _count(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if drop_last:
            self.num_samples = self.dataset_len // self.world_size
        else:
            self.num_samples = math.ceil(self.dataset_len / self.world_size)
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its start; setting the current epoch again keeps the position (after a restore)."""
        epoch = _count(epoch, "epoch", 0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def indices(self) -> np.ndarray:
        """This rank's whole order for the current epoch (``num_samples`` int64 indices, read-only, cached)."""
        if self._cached is None or self._cached[0] != self.epoch:
            n = self.dataset_len
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            if self.shuffle:
                np.random.default_rng([self.seed, self.epoch]).shuffle(order)
            total = self.num_samples * self.world_size
            mine = np.resize(order, total)[self.rank :: self.world_size].astype(np.int64)  # resize wraps around
            mine.flags.writeable = False
            self._cached = (self.epoch, mine)
        return self._cached[1]

    @property
    def remaining(self) -> int:
        """Samples of the current epoch not yet consumed by this rank."""
        return self.num_samples - self.position

    def __len__(self) -> int:
        """Samples per rank per epoch (as torch's DistributedSampler); ``remaining`` is what is left of this one."""
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        """The indices from the current position to the epoch's end (the state is read now, not lazily)."""
        return _iterate(self.indices(), self.position)

    def advance(self, count: int) -> None:
        """Record that training received ``count`` more samples of this epoch."""
        count = _count(count, "count", 0)
        if count > self.remaining:
            raise InputError(f"cannot consume {count} samples: only {self.remaining} remain in epoch {self.epoch}")
        self.position += count

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``, plus ``world_size`` and ``dataset_len`` to check the restore against."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "dataset_len": self.dataset_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` was taken; the same seed, world size and data set are needed for the same order."""
        for key in ("world_size", "dataset_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise InputError(
                    f"sampler state was saved with {key}={state[key]}, this run has "
                    f"{key}={getattr(self, key)}: the rest of the epoch cannot continue exactly"
                )
        epoch = _count(state["epoch"], "epoch", 0)
        position = _count(state["position"], "position", 0)
        if position > self.num_samples:
            raise InputError(f"sampler state position {position} is past the epoch's {self.num_samples} samples")
        self.epoch, self.position = epoch, position


def _iterate(indices: np.ndarray, start: int) -> Iterator[int]:
    """Yield ``indices[start:]`` as Python ints, converting a chunk at a time."""
    for begin in range(start, len(indices), _CHUNK):
        yield from indices[begin : begin + _CHUNK].tolist()


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64s: a counter-based hash whose outputs pass as independent uniform bits."""
    with np.errstate(over="ignore"):
        values = values + np.uint64(0x9E3779B97F4A7C15)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def position_uniforms(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """One uniform draw in [0, 1) per global epoch position, from (seed, epoch, position) alone."""
    key = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    bits = _mix(key ^ np.asarray(positions, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SeededBatch(list):
    """A batch of dataset indices plus what its random augmentation draws from.

    Each sample's draw depends only on (seed, epoch) and the sample's position in the epoch's global order, not
    on the rank, the number of ranks or the worker that loads it: a sample is flipped alike on one rank or W
    ranks, by any number of workers, and after a mid-epoch restore.
    """

    seed: tuple[int, int]
    positions: tuple[int, ...]

    def __init__(self, indices: list, seed: tuple[int, int], positions: Sequence[int]):
        super().__init__(indices)
        if len(positions) != len(indices):
            raise InputError(f"{len(positions)} positions for a batch of {len(indices)} indices")
        self.seed = seed
        self.positions = tuple(int(p) for p in positions)

    def uniforms(self) -> np.ndarray:
        """One uniform draw in [0, 1) per sample, in batch order."""
        return position_uniforms(*self.seed, np.array(self.positions, dtype=np.uint64))


class EpochBatchSampler(Sampler[SeededBatch]):
    """Batches of a ``DistributedEpochSampler``'s remaining epoch, each a ``SeededBatch``."""

    def __init__(self, sampler: DistributedEpochSampler, batch_size: int, drop_last: bool, seed: int = 0):
        """Group ``sampler``'s indices by ``batch_size``; ``drop_last`` drops a short final batch."""
        self.sampler = sampler
        self.batch_size = _count(batch_size, "batch_size", 1)
        self.drop_last = bool(drop_last)
        self.seed = _count(seed, "seed", 0)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        full, rest = divmod(self.sampler.remaining, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[SeededBatch]:
        """The remaining batches of the epoch (the sampler's state is read now, not lazily)."""
        s = self.sampler
        return _batches(
            s.indices(), s.position, self.batch_size, self.drop_last, (self.seed, s.epoch), s.rank, s.world_size
        )


def _batches(
    indices: np.ndarray, start: int, size: int, drop_last: bool, seed: tuple[int, int], rank: int, world_size: int
) -> Iterator[SeededBatch]:
    """Cut ``indices[start:]`` into ``SeededBatch``es; this rank's local position ``p`` is global ``p * W + rank``."""
    for begin in range(start, len(indices), size):
        chunk = indices[begin : begin + size]
        if drop_last and len(chunk) < size:
            return
        positions = range(begin * world_size + rank, (begin + len(chunk)) * world_size + rank, world_size)
        yield SeededBatch(chunk.tolist(), seed, positions)
