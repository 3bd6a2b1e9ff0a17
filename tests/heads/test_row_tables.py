"""The head's big tables on transparent huge pages: read back from the kernel's own accounting (/proc/self/smaps)
for a table, for the center shard and for its optimizer state, the off switch, and tables too small to advise."""

from __future__ import annotations

import os
import subprocess
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
REPO = Path(__file__).resolve().parents[2]


def huge_page_kib(tensor: torch.Tensor) -> int:
    """AnonHugePages summed over the memory mappings that overlap `tensor`'s bytes, from /proc/self/smaps (the
    advice can split a mapping in two)."""
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
    table = new_row_table((32768, 512), torch.float32, CPU, zero=True)  # 64 MB
    assert table.shape == (32768, 512) and table.dtype == torch.float32
    assert not table.any()
    table[::97] = 1.0  # pages come into being at their first write
    assert huge_page_kib(table) >= 32 * 1024  # at least half of it in 2 MB pages


def mappings_holding(address: int) -> list[str]:
    """The lines of /proc/self/maps whose range holds `address`."""
    held = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        if start <= address < end:
            held.append(line)
    return held


@needs_thp
def test_a_table_after_much_freed_memory_is_still_on_huge_pages():
    """Memory the allocator hands back out is already faulted in small pages; a table must not land in it."""
    for size in (40 << 20, 24 << 20, 64 << 20, 8 << 20):
        scratch = torch.ones(size // 4)  # touched, then freed: the allocator keeps or reuses it
        del scratch
    table = new_row_table((16384, 512), torch.float32, CPU, zero=False)  # 32 MB
    table.fill_(2.0)
    assert table.data_ptr() % (2 << 20) == 0
    assert huge_page_kib(table) >= 16 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_dropped_table_gives_its_memory_back():
    table = new_row_table((8192, 512), torch.float32, CPU, zero=True)
    address = table.data_ptr()
    row = table[3]
    del table
    assert mappings_holding(address), "a view still holds the table"
    assert not row.any()
    del row
    assert not mappings_holding(address)


def huge_page_kib_in_a_fresh_process(switch: str | None) -> int:
    """AnonHugePages of a written 64 MB table made by a new process whose `PARTIAL_FC_HUGE_PAGES` is `switch` from
    its start, as a user sets it (unset for None): the suite's own process may hand out memory that earlier tests
    left in huge-page mappings."""
    check = (
        "import torch\n"
        "from partial_fc.heads.row_tables import new_row_table\n"
        "from tests.heads.test_row_tables import huge_page_kib\n"
        "table = new_row_table((32768, 512), torch.float32, torch.device('cpu'), zero=True)\n"
        "table.fill_(1.0)\n"  # pages come into being at their first write
        "print(huge_page_kib(table))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PARTIAL_FC_HUGE_PAGES"}
    env["PYTHONPATH"] = str(REPO)
    if switch is not None:
        env["PARTIAL_FC_HUGE_PAGES"] = switch
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@needs_madvise_mode
def test_the_off_switch_leaves_a_table_on_small_pages():
    assert huge_page_kib_in_a_fresh_process(None) >= 32 * 1024  # the same table, switch unset
    assert huge_page_kib_in_a_fresh_process("0") == 0


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
    for state in tables[1:]:
        state.fill_(0)  # the shard was written by its initialisation; pages come into being at the first write
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
