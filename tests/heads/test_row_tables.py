"""The head's big tables on transparent huge pages: read back from the kernel's own accounting (/proc/self/smaps)
for a table, for the center shard and for its optimizer state, the off switch, and tables too small to advise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from partial_fc.comm import SingleProcessCommunicator
from partial_fc.heads import ArcFace, PartialFC, SparseAdamW, SparseSGD
from partial_fc.heads.row_tables import new_row_table

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODE = _THP.read_text().split("[")[1].split("]")[0] if sys.platform.startswith("linux") and _THP.exists() else None
needs_thp = pytest.mark.skipif(THP_MODE not in ("always", "madvise"), reason="no transparent huge pages here")
needs_madvise_mode = pytest.mark.skipif(THP_MODE != "madvise", reason="huge pages are not given only on advice")
CPU = torch.device("cpu")


def huge_page_kib(tensor: torch.Tensor) -> int:
    """AnonHugePages summed over the memory mappings that overlap `tensor`'s bytes, from /proc/self/smaps (the
    advice splits a mapping: the first page, shared with the allocator's header, is a mapping of its own)."""
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    total, overlapping = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            overlapping = start < last and first < end
        elif overlapping and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@needs_thp
def test_a_big_table_lands_on_huge_pages_and_holds_zeros():
    table = new_row_table((32768, 512), torch.float32, CPU, zero=True)  # 64 MB: a mapping of its own
    assert table.shape == (32768, 512) and table.dtype == torch.float32
    assert not table.any()
    assert huge_page_kib(table) >= 32 * 1024  # at least half of it in 2 MB pages


@needs_madvise_mode
def test_the_off_switch_leaves_a_table_on_small_pages(monkeypatch):
    monkeypatch.setenv("PARTIAL_FC_HUGE_PAGES", "0")
    table = new_row_table((32768, 512), torch.float32, CPU, zero=True)
    assert huge_page_kib(table) == 0


@needs_thp
@pytest.mark.parametrize("optimizer_kind", ["sgd", "sgd-int8", "adamw"])
def test_the_center_shard_and_its_optimizer_state_are_on_huge_pages(optimizer_kind):
    head = PartialFC(ArcFace(), 512, 65536, 0.1, comm=SingleProcessCommunicator(), storage_dtype=torch.bfloat16)
    if optimizer_kind == "adamw":
        optimizer = SparseAdamW(head, lr=1e-3)
    else:
        optimizer = SparseSGD(head, lr=0.1, momentum_dtype="int8" if optimizer_kind == "sgd-int8" else "storage")
    tables = [head.weight] + [state for state in optimizer.state[head.weight].values() if state.dim() == 2]
    assert len(tables) == (3 if optimizer_kind == "adamw" else 2)
    for table in tables:
        assert huge_page_kib(table) >= table.numel() * table.element_size() // 2048, table.dtype
    embeddings = torch.randn(8, 512, requires_grad=True)
    head(embeddings, torch.arange(8)).backward()
    optimizer.step()
    assert torch.isfinite(head.weight.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_small_and_uninitialised_tables_are_ordinary_tensors(dtype):
    small = new_row_table((10, 3), dtype, CPU, zero=True)
    assert small.shape == (10, 3) and small.dtype == dtype and not small.any()
    empty = new_row_table((0, 4), dtype, CPU, zero=False)
    assert empty.shape == (0, 4)
    table = new_row_table((4096, 512), dtype, CPU, zero=False)
    table.fill_(1)
    assert table.is_contiguous() and bool((table == 1).all())
