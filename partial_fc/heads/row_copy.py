"""Copying whole rows between a big table (the center shard, its optimizer state) and a small buffer by row index.

These copies are most of the head's memory traffic. On a CPU, torch's index_select moves 2 KB rows at about
half of memcpy's rate and index_copy_ at a quarter; the C routines in row_copy.c copy each row with one memcpy
and prefetch the rows a few indices ahead, which made a 1024-row gather 1.2x and a scatter 2.5x faster
(50,000 sorted rows of a 500,000 x 512 float32 table). Between a bfloat16 table and a float32 buffer they
convert in the same single pass, where torch gathers into a temporary and converts it in a second.
They are compiled with the system's C compiler on first use (`heads/native_build.py`).
torch's ops run instead where the routines do not apply: no compiler, `PARTIAL_FC_NATIVE_ROWS=0`, tensors
off the CPU, another dtype conversion, non-contiguous memory, or more than one torch thread (the routines
use one)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

from partial_fc.heads.native_build import load_library

_SOURCE = Path(__file__).with_suffix(".c")
_DISABLE = "PARTIAL_FC_NATIVE_ROWS"
# No implicit fused multiply-adds: the routines round as torch's ops do, fusing only where torch fuses (fmaf).
# A float32 buffer is read and written as bits by the bfloat16 conversions, hence no strict aliasing.
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled routines, or None where they cannot be built or loaded (torch's ops are used then)."""
    library = load_library(_SOURCE, _FLAGS, _DISABLE)
    if library is None:
        return None
    for function in (
        library.pfc_take_rows,
        library.pfc_put_rows,
        library.pfc_take_rows_bf16_f32,
        library.pfc_put_rows_f32_bf16,
    ):
        function.restype = ctypes.c_int64
        function.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.pfc_int8_momentum.restype = size
    library.pfc_int8_momentum.argtypes = [
        pointer,
        pointer,
        size,
        pointer,
        size,
        size,
        pointer,
        real,
        real,
        real,
        pointer,
    ]
    for function in (library.pfc_sgd_rows_f32, library.pfc_sgd_rows_bf16):
        function.restype = size
        function.argtypes = [pointer, pointer, size, pointer, size, size, pointer, pointer, pointer, real, real, real]
    return library


def native_rows_available() -> bool:
    """Whether the C row copies are built and enabled on this machine."""
    return _library() is not None


# The routine for each (table dtype, buffer dtype) pair of a gather and a scatter, and whether it counts its
# rows' length in bytes (a plain copy) or in elements (a conversion).
_TAKE = {"same": ("pfc_take_rows", True), (torch.bfloat16, torch.float32): ("pfc_take_rows_bf16_f32", False)}
_PUT = {"same": ("pfc_put_rows", True), (torch.bfloat16, torch.float32): ("pfc_put_rows_f32_bf16", False)}


def _usable_library(index: torch.Tensor, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The routines, where they apply to these tensors: one torch thread, all on the CPU and contiguous."""
    library = _library()
    if library is None or torch.get_num_threads() != 1 or index.dtype != torch.int64:
        return None
    if not all(t.is_cpu and t.is_contiguous() for t in (index, *tensors)):  # is_cpu: 3x cheaper than .device
        return None
    return library


def _routine(routines: dict, table: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor):
    """The C routine and its row length for this copy, or None where torch's ops must run."""
    library = _usable_library(index, table, buffer)
    if library is None or table.dim() < 1 or table.shape[1:] != buffer.shape[1:]:
        return None
    chosen = routines.get("same" if table.dtype == buffer.dtype else (table.dtype, buffer.dtype))
    if chosen is None:
        return None
    name, length_in_bytes = chosen
    width = table[0].numel() if table.shape[0] else 0
    return getattr(library, name), width * table.element_size() if length_in_bytes else width


def _copied_natively(routines: dict, table: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Run the C routine between `table` and `buffer` where one applies; False where torch's ops must run."""
    chosen = _routine(routines, table, index, buffer)
    if chosen is None:
        return False
    routine, row_length = chosen
    bad = routine(table.data_ptr(), table.shape[0], index.data_ptr(), index.numel(), row_length, buffer.data_ptr())
    _raise_for_bad_index(bad, index, table.shape[0])
    return True


def _raise_for_bad_index(bad: int, index: torch.Tensor, table_rows: int) -> None:
    if bad >= 0:
        raise IndexError(f"row index {int(index[bad])} (position {bad}) is outside the table's {table_rows} rows")


def _as_words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of int8 codes seen as int64 words where all allow it: torch's row copies then run ~3x faster."""
    if all(
        t.dtype == torch.int8 and t.shape[-1] % 8 == 0 and t.is_contiguous() and t.storage_offset() % 8 == 0
        for t in tensors
    ):
        return tuple(t.view(torch.int64) for t in tensors)
    return tensors


def take_rows(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = table[index] (converted to out's dtype); `out` has index.numel() rows. Returns `out`."""
    if _copied_natively(_TAKE, table, index, out):
        return out
    if table.dtype == out.dtype:
        words, out_words = _as_words(table, out)
        torch.index_select(words, 0, index, out=out_words)
    else:
        out.copy_(table.index_select(0, index))
    return out


def put_rows(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """table[index] = rows, rounded to table's dtype."""
    if _copied_natively(_PUT, table, index, rows):
        increment_version(table)  # as an in-place torch op would: autograd's checks see the write
        return
    if table.dtype == rows.dtype:
        words, row_words = _as_words(table, rows)
        words.index_copy_(0, index, row_words)
    else:
        table.index_copy_(0, index, rows.to(table.dtype))


def update_int8_momentum(
    codes: torch.Tensor,
    row_max: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    momentum_over_levels_squared: float,
    levels_squared: float,
    smallest_row_max: float,
    velocity: torch.Tensor,
) -> bool:
    """SparseSGD's int8 momentum step of rows `index` in one C pass per row, bit for bit as its torch ops.

    velocity = grad + c |c| row_max[index] momentum / levels^2 from the codes c = codes[index]; then codes[index]
    and row_max[index] re-encoded from velocity. False (nothing done) where the routine does not apply.
    """
    library = _usable_library(index, codes, row_max, grad, velocity)
    floats = (row_max.dtype, grad.dtype, velocity.dtype) == (torch.float32,) * 3
    if library is None or codes.dtype != torch.int8 or not floats or codes.dim() != 2:
        return False
    if grad.shape != velocity.shape or grad.shape != (index.numel(), codes.shape[1]):
        return False
    bad = library.pfc_int8_momentum(
        codes.data_ptr(),
        row_max.data_ptr(),
        codes.shape[0],
        index.data_ptr(),
        index.numel(),
        codes.shape[1],
        grad.data_ptr(),
        momentum_over_levels_squared,
        levels_squared,
        smallest_row_max,
        velocity.data_ptr(),
    )
    _raise_for_bad_index(bad, index, codes.shape[0])
    increment_version(codes)
    increment_version(row_max)
    return True


_SGD_ROWS = {torch.float32: "pfc_sgd_rows_f32", torch.bfloat16: "pfc_sgd_rows_bf16"}


def update_sgd_rows(
    table: torch.Tensor,
    velocity_table: torch.Tensor | None,
    index: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    velocity: torch.Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> bool:
    """SparseSGD's step of rows `index` in one C pass per row, bit for bit as its torch ops.

    grad += weight_decay * rows (not at 0); velocity = grad + momentum * velocity_table[index], stored there
    (`velocity_table` None: no momentum, velocity = grad); table[index] = rows - lr * velocity. `rows` (the rows'
    float32 working copy) ends holding the new rows. False (nothing done) where the routine does not apply.
    """
    tensors = (table, rows, grad, velocity) if velocity_table is None else (table, velocity_table, rows, grad, velocity)
    library = _usable_library(index, *tensors)
    name = _SGD_ROWS.get(table.dtype)
    shape = (index.numel(), table.shape[1]) if table.dim() == 2 else None
    if library is None or name is None or any(t.shape != shape for t in (rows, grad, velocity)):
        return False
    if (rows.dtype, grad.dtype, velocity.dtype) != (torch.float32,) * 3:
        return False
    if velocity_table is not None and (velocity_table.dtype != table.dtype or velocity_table.shape != table.shape):
        return False
    bad = getattr(library, name)(
        table.data_ptr(),
        None if velocity_table is None else velocity_table.data_ptr(),
        table.shape[0],
        index.data_ptr(),
        index.numel(),
        table.shape[1],
        rows.data_ptr(),
        grad.data_ptr(),
        velocity.data_ptr(),
        lr,
        momentum,
        weight_decay,
    )
    _raise_for_bad_index(bad, index, table.shape[0])
    increment_version(table)
    if velocity_table is not None:
        increment_version(velocity_table)
    return True
