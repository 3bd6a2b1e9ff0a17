"""The margin softmax cross-entropy over class centers sharded across ranks, as one autograd function.

Each rank holds the logits of every gathered embedding against its own sampled centers, laid out
[sampled classes, batch] so that every chunk of classes is a contiguous block. On a CPU with the C passes
(`softmax_kernels`), each chunk is exponentiated right after its product with one shift for every row,
s - 40, and one all-reduce assembles the normaliser; where they do not run, or where that shift would lose
precision, the exponentials are shifted by each row's maximum, with one all-reduce of row maxima and one of
sums. The logits buffer is reused in place for
the exponentials and then for the gradient, and lent again to the next step (`ReusedBuffer`); every pass
over it that can runs a chunk at a time, right after that chunk's product while it is in cache, and the
softmax's per-column division is applied to the small [batch, D] operands of backward's products instead of
the buffer. The sampled centers are read from the shard chunk by chunk, in forward and again in backward, so
no full copy of them outlives a chunk; only their gradient is handed to the optimizer through a `SampledRows`
record (never as a dense `.grad`), or applied to the rows chunk by chunk during backward when the optimizer
asks for that.

Inter-class filtering (Partial FC v2, arcface_torch's `interclass_filtering_threshold` t > 0): a negative
whose cosine exceeds t counts as cosine 0 in the softmax and passes no gradient. Such entries are set to
-inf in the buffer and their exp(0 - max) terms are added per batch row from a count, so their
probability, and hence their gradient, is exactly 0 without any mask kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from partial_fc.comm.base import Communicator, ReduceOp
from partial_fc.heads.margins import CombinedMargin
from partial_fc.heads.sampling import SampledCenters, SampledRows, gather_rows
from partial_fc.heads.softmax_kernels import FLUSHED_BOUND, exponentiate_chunk, remove_radial

_NORM_FLOOR = 1e-12
# The fixed shift's distance below s: exponentials up to e^40, so that no sum of them overflows float32.
_FIXED_SHIFT_HEADROOM = 40.0


def _mm_into(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None, accumulate: bool = False
) -> None:
    """out = a @ b (out += a @ b when accumulating), computed in `dtype` when one is given (reduced precision)."""
    if dtype is None or dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        out.add_(a.to(dtype) @ b.to(dtype))
    else:
        out.copy_(a.to(dtype) @ b.to(dtype))


def _chunks(count: int, chunk_rows: int):
    return (slice(start, min(start + chunk_rows, count)) for start in range(0, count, chunk_rows))


def _filter_negatives(logits: torch.Tensor, limit: float, chunk_rows: int) -> torch.Tensor:
    """Set every logit above `limit` to -inf, a chunk at a time; returns how many per batch row (column).

    The caller hides the positives beforehand, so only negatives are filtered.
    """
    count = logits.new_zeros(logits.shape[1])
    for part in _chunks(logits.shape[0], chunk_rows):
        block = logits[part]
        dirty = block > limit
        count.add_(dirty.sum(dim=0))
        block.masked_fill_(dirty, -torch.inf)
    return count


class ReusedBuffer:
    """One flat buffer lent to each forward for its [S, B] logits and handed back by its backward.

    On a CPU a fresh buffer of that size is new pages every step (glibc maps allocations over 32 MB afresh):
    51 MB at 1M classes costs ~28 ms of page faults, 0.5 GB at 10M ~0.3 s. A forward that finds the buffer
    lent out (a second forward before the first's backward) gets a fresh one, so no two graphs share memory.
    """

    def __init__(self) -> None:
        self._free: torch.Tensor | None = None

    def borrow(self, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A [rows, cols] tensor of `like`'s dtype and device, reusing the buffer when it is free and big enough."""
        numel = shape[0] * shape[1]
        free, self._free = self._free, None
        if free is None or free.numel() < numel or free.dtype != like.dtype or free.device != like.device:
            del free  # dropped before the new one exists: never two at once
            free = like.new_empty(numel)
        return free[:numel].view(shape)

    def give_back(self, tensor: torch.Tensor) -> None:
        """Return a tensor `borrow` lent, for the next forward; its contents are then overwritten."""
        self._free = tensor.view(-1) if tensor._base is None else tensor._base


@dataclass(frozen=True)
class ShardedSoftmaxInputs:
    """What the sharded softmax takes beside the embeddings, none of it differentiated.

    `weight`: this rank's center shard; `sampled`: its sampled rows and the positives this rank holds;
    `filtering_threshold`: inter-class filtering (0 disables it); `matmul_dtype`: reduced-precision products, if
    any; `workspace`: a reusable [chunk, D] buffer whose first dimension is the chunk size; `logits_buffer`: where
    the [S, B] logits live from forward to backward; `sampled_rows`: the record that receives the sampled rows'
    gradient (None when no gradient is wanted for the centers); `native_softmax`: every rank can run the C passes
    (`softmax_kernels.native_softmax_usable`), agreed before any collective of the softmax.
    """

    weight: torch.Tensor
    sampled: SampledCenters
    margin: CombinedMargin
    filtering_threshold: float
    comm: Communicator
    matmul_dtype: torch.dtype | None
    workspace: torch.Tensor
    logits_buffer: ReusedBuffer
    sampled_rows: SampledRows | None
    native_softmax: bool = False


@dataclass
class _Exponentials:
    """What forward's exponentials leave beside the buffer: the shift (per batch row, or one number), the global
    sums of exponentials and positive logits per batch row, and this rank's positives' cosines and logits."""

    shift: torch.Tensor | float
    sum_exp: torch.Tensor
    positive_logits: torch.Tensor
    target_cosines: torch.Tensor
    target_logits: torch.Tensor


def _scaled_cosines_in_chunks(embeddings, inputs, logits, inverse_norms, chunk_pass) -> None:
    """s*cos [S, B], a chunk of centers at a time: gather, inverse norms, W_chunk X^T, then `chunk_pass(part,
    block, row_scale)` while the chunk is in cache, with row_scale = s / |w| of the chunk's centers."""
    transposed_embeddings = embeddings.t()
    for part in _chunks(logits.shape[0], inputs.workspace.shape[0]):
        centers = gather_rows(inputs.weight, inputs.sampled.index[part], inputs.workspace)
        norms = inverse_norms[part]
        torch.linalg.vector_norm(centers, dim=1, out=norms)
        norms.clamp_min_(_NORM_FLOOR).reciprocal_()
        block = logits[part]
        _mm_into(block, centers, transposed_embeddings, inputs.matmul_dtype)
        chunk_pass(part, block, norms * inputs.margin.s)


def _exponentials_fixed_shift(embeddings, inputs, logits, inverse_norms) -> _Exponentials | None:
    """The exponentials with one shift for every batch row, taken in the product's chunk loop by one C pass each.

    Every logit is at most s, so with shift = s - 40 no exponential exceeds e^40 and no sum can overflow. The
    price is that a row whose logits all lie far below s has exponentials under float's range: those are
    counted, and when they could have moved any row's sum by more than 2^-30 of it, None asks for the exact
    per-row shift. One all-reduce carries the sums, the filtered and flushed counts and the positive logits.
    """
    margin, comm, (index, rows, cols) = inputs.margin, inputs.comm, inputs.sampled
    batch, chunk_rows = embeddings.shape[0], inputs.workspace.shape[0]
    shift = max(0.0, margin.s - _FIXED_SHIFT_HEADROOM)
    limit = inputs.filtering_threshold * margin.s if inputs.filtering_threshold > 0 else math.inf
    # the positives as flat offsets into their chunk, in chunk order, and where each chunk's run of them starts
    order = cols.argsort()
    positive_cols = cols[order]
    chunk_of_positive = positive_cols.div(chunk_rows, rounding_mode="floor")
    offsets = (positive_cols - chunk_of_positive * chunk_rows).mul_(batch).add_(rows[order])
    chunk_count = -(-index.numel() // chunk_rows)
    bounds = torch.searchsorted(chunk_of_positive, torch.arange(chunk_count + 1, device=cols.device)).tolist()
    plain_positive_logits = embeddings.new_empty(cols.numel())
    totals = embeddings.new_zeros(4, batch)  # sums, filtered, flushed, positive logits
    scratch = embeddings.new_empty(batch)

    def exponentiate(part: slice, block: torch.Tensor, row_scale: torch.Tensor) -> None:
        run = slice(bounds[part.start // chunk_rows], bounds[part.start // chunk_rows + 1])
        exponentiate_chunk(
            block, row_scale, shift, limit, offsets[run], plain_positive_logits[run], totals[:3], scratch
        )

    _scaled_cosines_in_chunks(embeddings, inputs, logits, inverse_norms, exponentiate)
    target_cosines = torch.empty_like(plain_positive_logits)
    target_cosines[order] = plain_positive_logits
    target_cosines.div_(margin.s).clamp_(-1.0, 1.0)
    target_logits = margin.target_logit(target_cosines)
    positive_exponentials = (target_logits - shift).exp_()
    logits[cols, rows] = positive_exponentials
    totals[0, rows] += positive_exponentials
    totals[3, rows] = target_logits
    comm.all_reduce(totals, ReduceOp.SUM)
    sums, filtered, flushed, positive_logits = totals
    sum_exp = sums.addcmul_(filtered, sums.new_tensor(-shift).exp_())  # a filtered entry counts as cosine 0
    if bool((flushed * FLUSHED_BOUND > sum_exp * 2.0**-30).any()):
        return None
    return _Exponentials(shift, sum_exp, positive_logits, target_cosines, target_logits)


def _exponentials_max_shift(embeddings, inputs, logits, inverse_norms) -> _Exponentials:
    """The exponentials shifted by each batch row's global maximum logit: two all-reduces and a second pass."""
    margin, comm, (index, rows, cols) = inputs.margin, inputs.comm, inputs.sampled
    chunk_rows = inputs.workspace.shape[0]
    row_max = embeddings.new_full((embeddings.shape[0],), -torch.inf)

    def scale_and_take_maxima(part: slice, block: torch.Tensor, row_scale: torch.Tensor) -> None:
        block.mul_(row_scale.unsqueeze(1))
        torch.maximum(row_max, block.amax(dim=0), out=row_max)

    _scaled_cosines_in_chunks(embeddings, inputs, logits, inverse_norms, scale_and_take_maxima)
    # the margin at the positives this rank holds. Only the positives are clamped to [-1, 1] (acos needs it);
    # elsewhere rounding past 1 is harmless.
    target_cosines = logits[cols, rows].div_(margin.s).clamp_(-1.0, 1.0)
    target_logits = margin.target_logit(target_cosines)
    filtered = None
    if inputs.filtering_threshold > 0:
        logits[cols, rows] = -torch.inf
        filtered = _filter_negatives(logits, inputs.filtering_threshold * margin.s, chunk_rows)
    logits[cols, rows] = target_logits
    # the shift: the global maximum of each batch row's logits before the margin and filtering, and of its
    # positive logit (each batch row has one positive, on one rank). It bounds every logit, a filtered one's 0
    # included (it exceeded t*s > 0).
    row_max[rows] = torch.maximum(row_max[rows], target_logits)
    comm.all_reduce(row_max, ReduceOp.MAX)
    # exponentials in place and their sums, a chunk at a time; one all-reduce for both the global sum of
    # exponentials and each row's positive logit.
    sums = logits.new_zeros(2, embeddings.shape[0])
    for part in _chunks(index.numel(), chunk_rows):
        block = logits[part]
        block.sub_(row_max).exp_()
        sums[0].add_(block.sum(dim=0))
    if filtered is not None:
        sums[0].addcmul_(filtered, row_max.neg().exp_())
    sums[1, rows] = target_logits
    comm.all_reduce(sums, ReduceOp.SUM)
    return _Exponentials(row_max, sums[0], sums[1], target_cosines, target_logits)


class ShardedMarginSoftmaxLoss(torch.autograd.Function):
    """Mean over the gathered batch of -log softmax at each row's positive class, the softmax spanning all shards.

    Inputs: normalized embeddings X [B, D] (the same on every rank), the `ShardedSoftmaxInputs`, and
    `backward_trigger`, a leaf that requires grad, so that backward runs for the centers even when X needs no
    gradient (a frozen backbone). Returns the loss; X gets its gradient, the centers' goes to `sampled_rows`.
    """

    @staticmethod
    def forward(
        ctx, embeddings: torch.Tensor, inputs: ShardedSoftmaxInputs, backward_trigger: torch.Tensor | None
    ) -> torch.Tensor:
        index, rows, cols = inputs.sampled
        batch, sampled = embeddings.shape[0], index.numel()
        # 1. scaled cosines s*cos [S, B] a chunk at a time, the margin at the positives this rank holds, and the
        #    exponentials in place with their global sums: in the chunk loop with a fixed shift where the C pass
        #    applies and the shift loses nothing, else after a second pass shifted by each row's maximum.
        logits = inputs.logits_buffer.borrow((sampled, batch), embeddings)
        inverse_norms = embeddings.new_empty(sampled)
        exponentials = None
        if inputs.native_softmax:
            exponentials = _exponentials_fixed_shift(embeddings, inputs, logits, inverse_norms)
        if exponentials is None:
            exponentials = _exponentials_max_shift(embeddings, inputs, logits, inverse_norms)
        # 2. the loss: -log of each row's positive probability, averaged over the global batch.
        sum_exp = exponentials.sum_exp
        loss = (sum_exp.log() + exponentials.shift - exponentials.positive_logits).mean()
        # 3. the exponentials stay in the buffer for backward, which divides by their sums where it scales them.
        target_slopes = inputs.margin.target_grad(exponentials.target_cosines)
        ctx.save_for_backward(embeddings, index, inverse_norms, rows, cols, target_slopes, sum_exp)
        ctx.exponentials, ctx.logits_buffer = logits, inputs.logits_buffer
        if not any(ctx.needs_input_grad):
            inputs.logits_buffer.give_back(logits)  # no backward will come for it
        weight = inputs.weight
        ctx.weight, ctx.weight_version = weight, weight._version
        ctx.sampled_rows = inputs.sampled_rows
        ctx.scale, ctx.matmul_dtype, ctx.workspace = inputs.margin.s, inputs.matmul_dtype, inputs.workspace
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        embeddings, index, inverse_norms, rows, cols, target_slopes, sum_exp = ctx.saved_tensors
        grad, weight, sampled_rows, workspace = ctx.exponentials, ctx.weight, ctx.sampled_rows, ctx.workspace
        ctx.exponentials = ctx.sampled_rows = ctx.workspace = None
        if weight._version != ctx.weight_version:
            raise RuntimeError(
                "the PartialFC centers changed between forward and backward; step the optimizer after backward"
            )
        # d loss / d cosine = s * (p - onehot) / B, or slope * (p - 1) / B at a positive, then through the
        # division by each center's norm. With p = e / sum_exp, the buffer (e) is scaled only per row (s / |w|)
        # a chunk at a time; the per-column factor 1 / (B * sum_exp) goes onto the small [B, D] operands
        # instead: G X = (E_r) (q X) and G^T W = q (E_r^T W). A positive's entry is stored divided by its q, and
        # by its row's scale, which the chunk's row scaling then puts back.
        per_sample = grad_loss / embeddings.shape[0]
        column_scale = per_sample / sum_exp
        row_scale = (inverse_norms * ctx.scale).unsqueeze(1)
        grad[cols, rows] = (grad[cols, rows] - sum_exp[rows]).mul_(target_slopes).div_(ctx.scale)
        scaled_embeddings = embeddings * column_scale.unsqueeze(1) if sampled_rows is not None else None
        squared_inverse_norms = inverse_norms.square().unsqueeze(1) if sampled_rows is not None else None
        grad_embeddings = torch.zeros_like(embeddings) if ctx.needs_input_grad[0] else None
        for part in _chunks(index.numel(), workspace.shape[0]):
            block = grad[part].mul_(row_scale[part])
            centers = gather_rows(weight, index[part], workspace)
            if grad_embeddings is not None:
                _mm_into(grad_embeddings, block.t(), centers, ctx.matmul_dtype, accumulate=True)
            if sampled_rows is None:
                continue
            center_grad = sampled_rows.gradient_buffer(part, embeddings)
            _mm_into(center_grad, block, scaled_embeddings, ctx.matmul_dtype)
            # through W / |W|: keep only the part of each center's gradient orthogonal to that center.
            remove_radial(center_grad, centers, squared_inverse_norms[part])
            sampled_rows.gradient_done(part, centers, center_grad)
        if grad_embeddings is not None:
            grad_embeddings.mul_(column_scale.unsqueeze(1))
        ctx.logits_buffer.give_back(grad)
        return grad_embeddings, None, None
