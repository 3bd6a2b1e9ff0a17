"""The contiguous partition of class centers over ranks."""

from __future__ import annotations


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, class count) of `rank`'s shard: C // W each, the remainder spread over the first ranks."""
    base, remainder = divmod(num_classes, world_size)
    count = base + (rank < remainder)
    start = rank * base + min(rank, remainder)
    return start, count
