"""The sharded softmax's element-wise passes over a chunk as single C passes (softmax_kernels.c), on a CPU.

`exponentiate_chunk` does in one pass, while a chunk of logits is still in cache after its product, what torch's
ops do in six (scale the rows, row maxima, shift, exponential, sums, filtering; the last four in a second loop
over the whole [S, B] buffer), and its exponential has no slow path: torch 2.13's CPU exp runs 15-45x slower on
inputs whose result underflows (below -87), as the far negatives of a trained model and filtered entries do.
`remove_radial` is backward's projection of the centers' gradient in one pass per row instead of three.
They run where they apply (one torch thread, float32, contiguous CPU tensors); `PARTIAL_FC_NATIVE_SOFTMAX=0`
or no C compiler leaves torch's ops to do the work.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from partial_fc.heads.native_build import load_library

_SOURCE = Path(__file__).with_suffix(".c")
_DISABLE = "PARTIAL_FC_NATIVE_SOFTMAX"
# Only the fused multiply-adds written out (fmaf), so every variant rounds alike; no trapping math, so the selects
# vectorise.
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")

# An exponential under this (in units of the shift) is stored as 0 and counted: exp(-87), as in the C source.
FLUSHED_BOUND = 1.6516362549940018e-38


def build_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """softmax_kernels.c compiled (with `extra_flags` too) and loaded, or None where it cannot be."""
    library = load_library(_SOURCE, _FLAGS + extra_flags, _DISABLE)
    if library is None:
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.pfc_exp_chunk.restype = None
    library.pfc_exp_chunk.argtypes = [pointer, size, size, pointer, real, real, pointer, size, pointer] + [pointer] * 4
    library.pfc_remove_radial.restype = None
    library.pfc_remove_radial.argtypes = [pointer, pointer, size, size, pointer]
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled passes, or None where they cannot be built or loaded."""
    return build_library()


def native_softmax_built() -> bool:
    """Whether the C passes are built and enabled on this machine."""
    return _library() is not None


def native_softmax_usable(*tensors: torch.Tensor) -> bool:
    """Whether the C passes apply to these tensors: built, one torch thread, float32 and contiguous on the CPU."""
    if not native_softmax_built() or torch.get_num_threads() != 1:
        return False
    return all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def exponentiate_chunk(
    block: torch.Tensor,
    row_scale: torch.Tensor,
    shift: float,
    limit: float,
    positives: torch.Tensor,
    positive_logits: torch.Tensor,
    totals: torch.Tensor,
    scratch: torch.Tensor,
) -> None:
    """block = exp(block * row_scale - shift) in place, adding to `totals` [3, B]: column sums, filtered, flushed.

    Entries whose scaled logit exceeds `limit` become 0 and count as filtered; exponentials under FLUSHED_BOUND
    become 0 and count as flushed. `positives` (int64) are flat offsets into the block: each one's scaled logit
    goes to `positive_logits` and its entry becomes 0. `scratch` holds B floats. The caller checks
    `native_softmax_usable` first.
    """
    sums, filtered, flushed = totals
    _library().pfc_exp_chunk(
        block.data_ptr(),
        block.shape[0],
        block.shape[1],
        row_scale.data_ptr(),
        shift,
        limit,
        positives.data_ptr(),
        positives.numel(),
        positive_logits.data_ptr(),
        sums.data_ptr(),
        filtered.data_ptr(),
        flushed.data_ptr(),
        scratch.data_ptr(),
    )


def remove_radial(grad: torch.Tensor, centers: torch.Tensor, squared_inverse_norms: torch.Tensor) -> None:
    """grad -= centers * (grad . centers) * squared_inverse_norms, row by row, in place; C where it applies."""
    if native_softmax_usable(grad, centers, squared_inverse_norms) and grad.shape == centers.shape:
        _library().pfc_remove_radial(
            grad.data_ptr(), centers.data_ptr(), grad.shape[0], grad.shape[1], squared_inverse_norms.data_ptr()
        )
        return
    radial = torch.linalg.vecdot(grad, centers).unsqueeze_(1).mul_(squared_inverse_norms.view(-1, 1))
    grad.addcmul_(centers, radial, value=-1.0)
