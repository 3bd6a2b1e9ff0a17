"""Memory for the big tables the head reads and writes by random rows: the center shard and its optimizer state.

A sampled step touches tens of thousands of 2 KB rows scattered over gigabytes, and with 4 KB pages nearly
every row costs a TLB miss (a page-table walk that goes to memory). On Linux a CPU table is therefore put in a
fresh anonymous mapping of its own, aligned to 2 MB and advised onto transparent huge pages
(`madvise(MADV_HUGEPAGE)`) before anything touches it, so that one TLB entry covers 2 MB. A mapping of its own
matters: memory the allocator hands back out may already be faulted in small pages, which advice cannot
change. With 2 ranks at once (50,000 sorted random rows of 500,000 x 512 float32) the row gathers ran 9% faster
and the SGD row update 25%; on a whole step at 1M classes, r=0.1, which its products dominate, that is about
0.5% (four variants alternating in one process). It is advice only: where the kernel declines (THP "never",
another OS) or the table is on a GPU, the table is ordinary memory with the same contents.
`PARTIAL_FC_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import math
import mmap
import os
import sys

import torch

_DISABLE = "PARTIAL_FC_HUGE_PAGES"
_HUGE_PAGE = 2 << 20
# Below two huge pages a table gains little and would waste most of its alignment slack.
_SMALLEST_ADVISED_BYTES = 4 << 20


def _advised(nbytes: int, device: torch.device) -> bool:
    """Whether a table of `nbytes` on `device` goes into a huge-page mapping of its own."""
    return (
        torch.device(device).type == "cpu"
        and sys.platform.startswith("linux")
        and hasattr(mmap, "MADV_HUGEPAGE")
        and nbytes >= _SMALLEST_ADVISED_BYTES
        and os.environ.get(_DISABLE) != "0"
    )


def _huge_page_table(shape: tuple[int, ...], dtype: torch.dtype, numel: int, nbytes: int) -> torch.Tensor:
    """A zero-filled table in a private anonymous mapping, 2 MB aligned and advised before its first touch.

    The tensor holds the mapping: it is unmapped when the last tensor on it goes.
    """
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    start = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    offset = -start % _HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError:
        pass  # the kernel declined (THP compiled out or "never"): the table stays on small pages
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset).view(shape)


def new_row_table(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zero: bool) -> torch.Tensor:
    """A table for random row access (`zero`: filled with zeros, else uninitialised), on huge pages where allowed."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if _advised(nbytes, device):
        return _huge_page_table(tuple(shape), dtype, numel, nbytes)
    table = torch.empty(shape, dtype=dtype, device=device)
    return table.zero_() if zero else table
