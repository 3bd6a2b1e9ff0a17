"""Memory for the big tables the head reads and writes by random rows: the center shard and its optimizer state.

A sampled step touches tens of thousands of 2 KB rows scattered over gigabytes, and with 4 KB pages nearly
every row costs a TLB miss (a page-table walk that goes to memory). On Linux a CPU table is therefore advised
onto transparent huge pages (`madvise(MADV_HUGEPAGE)`) before anything is written to it, so that one TLB entry
covers 2 MB. With 2 ranks at once (50,000 sorted random rows of 500,000 x 512 float32) the row gathers ran 9%
faster and the SGD row update 25%; on a whole step at 1M classes, r=0.1, which its products dominate, that is
about 0.5% (four variants alternating in one process). It is advice only: where the kernel declines (THP
"never", another OS) or the table is on a GPU, the table is ordinary memory with the same contents.
`PARTIAL_FC_HUGE_PAGES=0` turns the advice off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

_DISABLE = "PARTIAL_FC_HUGE_PAGES"
_MADV_HUGEPAGE = 14
_PAGE = 4096
# Below two huge pages a table gains nothing: no aligned 2 MB range need lie inside it.
_SMALLEST_ADVISED_BYTES = 4 << 20


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux or where it cannot be found."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.restype = ctypes.c_int
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _advise_huge_pages(table: torch.Tensor) -> None:
    """Ask the kernel to back the whole pages inside `table`'s memory with huge pages (ignored if it declines)."""
    nbytes = table.numel() * table.element_size()
    madvise = _madvise()
    if madvise is None or not table.is_cpu or nbytes < _SMALLEST_ADVISED_BYTES or os.environ.get(_DISABLE) == "0":
        return
    start = -(-table.data_ptr() // _PAGE) * _PAGE
    end = (table.data_ptr() + nbytes) // _PAGE * _PAGE
    madvise(start, end - start, _MADV_HUGEPAGE)


def new_row_table(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zero: bool) -> torch.Tensor:
    """A table for random row access (`zero`: filled with zeros, else uninitialised), on huge pages where allowed.

    The advice must come before the first write: pages already in place stay small.
    """
    table = torch.empty(shape, dtype=dtype, device=device)
    _advise_huge_pages(table)
    return table.zero_() if zero else table
