"""The margin softmax cross-entropy over class centers sharded across ranks, as one autograd function.

Each rank holds the logits of every gathered embedding against its own sampled centers, laid out
[sampled classes, batch] so that every chunk of classes is a contiguous block. The softmax normaliser
is assembled with one all-reduce of row maxima and one of sums. The logits buffer is reused in place for
the probabilities and then for the gradient. The sampled centers are read from the shard chunk by chunk,
in forward and again in backward, so no full copy of them outlives a chunk; only their gradient is
handed to the optimizer through a `SampledRows` record (never as a dense `.grad`), or applied to the
rows chunk by chunk during backward when the optimizer asks for that.

Inter-class filtering (Partial FC v2, arcface_torch's `interclass_filtering_threshold` t > 0): a negative
whose cosine exceeds t counts as cosine 0 in the softmax and passes no gradient. Such entries are set to
-inf in the buffer and their exp(0 - max) terms are added per batch row from a count, so their
probability, and hence their gradient, is exactly 0 without any mask kept for backward.
"""

from __future__ import annotations

import torch

from partial_fc.comm.base import Communicator, ReduceOp
from partial_fc.heads.margins import CombinedMargin
from partial_fc.heads.sampling import SampledRows, gather_rows

_NORM_FLOOR = 1e-12


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


class ShardedMarginSoftmaxLoss(torch.autograd.Function):
    """Mean over the gathered batch of -log softmax at each row's positive class, the softmax spanning all shards.

    Inputs: normalized embeddings X [B, D] (the same on every rank); this rank's center shard and the
    sorted `index` of its sampled rows; the (batch row, sampled column) of every positive this rank holds;
    the margin; the inter-class filtering threshold (0 disables it); the communicator; an optional
    reduced-precision matmul dtype; a reusable [chunk, D] workspace (its first dimension is the chunk
    size); the `SampledRows` record that receives the sampled rows' gradient; and `anchor`, a leaf that
    requires grad, so that backward runs for the centers even when X needs no gradient (a frozen
    backbone). Returns the loss; X gets its gradient.
    """

    @staticmethod
    def forward(
        ctx,
        embeddings: torch.Tensor,
        weight: torch.Tensor,
        index: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        margin: CombinedMargin,
        filtering_threshold: float,
        comm: Communicator,
        matmul_dtype: torch.dtype | None,
        workspace: torch.Tensor,
        sink: SampledRows | None,
        anchor: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, sampled = embeddings.shape[0], index.numel()
        transposed_embeddings = embeddings.t()
        # 1. cosines [S, B]: each chunk of centers times X^T, scaled by the centers' inverse norms.
        logits = embeddings.new_empty((sampled, batch))
        inverse_norms = embeddings.new_empty(sampled)
        for part in _chunks(sampled, workspace.shape[0]):
            centers = gather_rows(weight, index[part], workspace)
            torch.linalg.vector_norm(centers, dim=1, out=inverse_norms[part])
            _mm_into(logits[part], centers, transposed_embeddings, matmul_dtype)
        inverse_norms.clamp_min_(_NORM_FLOOR).reciprocal_()
        # 2. scaled cosines s*cos everywhere (one pass), then the margin at the positives this rank holds.
        #    Only the positives are clamped to [-1, 1] (acos needs it); elsewhere rounding past 1 is harmless.
        logits.mul_((inverse_norms * margin.s).unsqueeze(1))
        target_cosines = logits[cols, rows].div_(margin.s).clamp_(-1.0, 1.0)
        target_logits = margin.target_logit(target_cosines)
        filtered = None
        if filtering_threshold > 0:
            logits[cols, rows] = -torch.inf
            filtered = _filter_negatives(logits, filtering_threshold * margin.s, workspace.shape[0])
        logits[cols, rows] = target_logits
        # 3. the global maximum of each batch row (filtered entries count as logit 0), for a stable exponential.
        row_max = logits.amax(dim=0)
        if filtered is not None:
            row_max.masked_fill_((filtered > 0) & (row_max < 0), 0.0)
        comm.all_reduce(row_max, ReduceOp.MAX)
        logits.sub_(row_max).exp_()
        # 4. one all-reduce for both the global sum of exponentials and each row's positive logit.
        sums = logits.new_zeros(2, batch)
        torch.sum(logits, dim=0, out=sums[0])
        if filtered is not None:
            sums[0].addcmul_(filtered, row_max.neg().exp_())
        sums[1, rows] = target_logits
        comm.all_reduce(sums, ReduceOp.SUM)
        sum_exp, positive_logits = sums[0], sums[1]
        loss = (sum_exp.log() + row_max - positive_logits).mean()
        # 5. the probabilities, kept in the same buffer for the backward pass.
        logits.div_(sum_exp)
        ctx.save_for_backward(embeddings, index, inverse_norms, rows, cols, margin.target_grad(target_cosines))
        ctx.probabilities = logits
        ctx.weight, ctx.weight_version = weight, weight._version
        ctx.sink = sink
        ctx.scale, ctx.matmul_dtype, ctx.workspace = margin.s, matmul_dtype, workspace
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        embeddings, index, inverse_norms, rows, cols, target_slopes = ctx.saved_tensors
        grad, weight, sink, workspace = ctx.probabilities, ctx.weight, ctx.sink, ctx.workspace
        ctx.probabilities = ctx.sink = ctx.workspace = None
        if weight._version != ctx.weight_version:
            raise RuntimeError("the PartialFC centers changed between forward and backward; step the optimizer after backward")
        # d loss / d cosine = s * (p - onehot) / B, or slope * (p - 1) / B at a positive, then through the
        # division by each center's norm: one pass over the buffer, then the positives on their own.
        per_sample = grad_loss / embeddings.shape[0]
        target = (grad[cols, rows] - 1.0).mul_(target_slopes).mul_(inverse_norms[cols]).mul_(per_sample)
        grad.mul_((inverse_norms * (ctx.scale * per_sample)).unsqueeze(1))
        grad[cols, rows] = target
        grad_embeddings = torch.zeros_like(embeddings) if ctx.needs_input_grad[0] else None
        for part in _chunks(index.numel(), workspace.shape[0]):
            centers = gather_rows(weight, index[part], workspace)
            block = grad[part]
            if grad_embeddings is not None:
                _mm_into(grad_embeddings, block.t(), centers, ctx.matmul_dtype, accumulate=True)
            if sink is None:
                continue
            center_grad = sink.gradient_slot(part, embeddings)
            _mm_into(center_grad, block, embeddings, ctx.matmul_dtype)
            # through W / |W|: keep only the part of each center's gradient orthogonal to that center.
            radial = torch.linalg.vecdot(center_grad, centers).mul_(inverse_norms[part].square())
            center_grad.addcmul_(centers, radial.unsqueeze(1), value=-1.0)
            sink.accept(part, centers, center_grad)
        return grad_embeddings, None, None, None, None, None, None, None, None, None, None, None
