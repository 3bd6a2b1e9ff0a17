"""Copying rows out of a memory-mapped checkpoint file without keeping the file's pages in this process's memory."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

import torch

_BLOCK_BYTES = 64 << 20  # a saved shard is copied into the live one this much at a time


def _madvise() -> Any:
    """libc's madvise, or None where it cannot be called."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _madvise()


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Unmap the pages lying wholly inside a memory-mapped, already copied `tensor` from this process (they stay
    in the page cache, and would be read from the file again if touched), so they leave its resident set."""
    if _MADVISE is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _MADVISE(first, last - first, mmap.MADV_DONTNEED)


def copy_mapped_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """target.copy_(source), where `source` is rows of a file memory-mapped by `load_torch_file(mmap=True)` (and
    only such: released anonymous pages would read back as zeros): a block of rows at a time, each block's pages
    released once copied, so loading a shard never holds the saved one beside it."""
    if source.dim() == 0 or source.shape[0] == 0:
        target.copy_(source)
        return
    rows = max(1, _BLOCK_BYTES // max(1, source[0].numel() * source.element_size()))
    for start in range(0, source.shape[0], rows):
        block = source[start : start + rows]
        target[start : start + rows].copy_(block)
        _release_mapped_pages(block)
