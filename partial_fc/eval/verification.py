"""Face verification metric on image pairs, the LFW protocol as insightface's ``verification.py`` computes it.

For a set of ``N`` pairs (images ``2i`` and ``2i + 1`` form pair ``i``):

1. The embedding of every image and the embedding of its horizontal flip are added, then L2-normalized (a zero
   vector stays zero, as ``sklearn.preprocessing.normalize`` leaves it). Without flip embeddings the plain
   embeddings are normalized.
2. The distance of a pair is the squared L2 distance of its two normalized embeddings (in ``[0, 4]``).
3. A pair is predicted "same" at threshold ``t`` when ``distance < t``. Thresholds are ``np.arange(0, 4, 0.01)``
   (0.00, 0.01, ..., 3.99, as insightface).
4. The pairs are split, in order and without shuffling, into 10 folds as ``sklearn.model_selection.KFold(10)``
   does (the first ``N % 10`` folds hold one pair more). For each fold the threshold with the best accuracy on the
   other 9 folds is chosen (the smallest one on ties, like ``np.argmax``) and the accuracy on the held-out fold at
   that threshold is recorded. The result is the mean and (population) standard deviation of the 10 accuracies.

Besides insightface's numbers this also reports TAR at fixed FARs over all pairs (see :func:`tar_at_far`) and
``xnorm``, the mean L2 norm of the raw embeddings (originals and flips) before normalization.

Everything is vectorized: the accuracy of every (fold, threshold) is read off one cumulative histogram.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from partial_fc.errors import InputError

__all__ = [
    "DEFAULT_FARS",
    "DEFAULT_THRESHOLDS",
    "FoldAccuracy",
    "TarAtFar",
    "VerificationResult",
    "compute_embeddings",
    "evaluate",
    "evaluate_model",
    "kfold_accuracy",
    "kfold_splits",
    "pair_distances",
    "tar_at_far",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
DEFAULT_THRESHOLDS.flags.writeable = False
"""insightface's thresholds: 0.00, 0.01, ..., 3.99 (400 values)."""
DEFAULT_FARS: tuple[float, ...] = (1e-3, 1e-4)
DEFAULT_FOLDS = 10


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be converted to an array: {exc}") from None


def _embeddings(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty 2-D array [2N, D], got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InputError(f"{name} holds non-finite values (first in row {int(np.flatnonzero(bad)[0])})")
    return arr


def _issame(x: ArrayLike, num_pairs: int | None = None) -> np.ndarray:
    arr = _to_numpy(x, "issame")
    if arr.ndim != 1:
        raise InputError(f"issame must be 1-D (one flag per pair), got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
            raise InputError(f"issame must hold bools (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(np.bool_)
    if num_pairs is not None and arr.shape[0] != num_pairs:
        raise InputError(f"issame has {arr.shape[0]} flags but there are {num_pairs} pairs")
    return arr


def _thresholds(thresholds: ArrayLike | None) -> np.ndarray:
    if thresholds is None:
        return DEFAULT_THRESHOLDS
    t = _to_numpy(thresholds, "thresholds").astype(np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or np.any(np.diff(t) < 0):
        raise InputError("thresholds must be a non-empty, finite, ascending sequence")
    return t


# ----------------------------------------------------------------------------------------------------------------
# Distances


def pair_distances(embeddings: ArrayLike, flip_embeddings: ArrayLike | None = None) -> tuple[np.ndarray, float]:
    """Squared L2 distances of the ``N`` pairs and ``xnorm``.

    ``embeddings`` is [2N, D] (pair ``i`` = rows ``2i`` and ``2i + 1``); ``flip_embeddings``, when given, the
    embeddings of the horizontally flipped images in the same order, added to ``embeddings`` before the L2
    normalization. ``xnorm`` is the mean L2 norm of every raw row of ``embeddings`` and ``flip_embeddings``.
    Computed in float64. Returns ``(dist [N] float64, xnorm)``.
    """
    emb = _embeddings(embeddings, "embeddings")
    if emb.shape[0] % 2:
        raise InputError(f"embeddings must have an even number of rows (2 per pair), got {emb.shape[0]}")
    norms = [np.linalg.norm(emb, axis=1)]
    if flip_embeddings is not None:
        flip = _embeddings(flip_embeddings, "flip_embeddings")
        if flip.shape != emb.shape:
            raise InputError(f"flip_embeddings has shape {tuple(flip.shape)}, embeddings {tuple(emb.shape)}")
        norms.append(np.linalg.norm(flip, axis=1))
        emb = emb + flip
    xnorm = float(np.mean(np.concatenate(norms)))
    length = np.linalg.norm(emb, axis=1, keepdims=True)
    length[length == 0] = 1.0
    emb = emb / length
    diff = emb[0::2] - emb[1::2]
    return np.einsum("ij,ij->i", diff, diff), xnorm


# ----------------------------------------------------------------------------------------------------------------
# K-fold accuracy


def kfold_splits(num_pairs: int, n_folds: int = DEFAULT_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_indices, test_indices)`` per fold, exactly as ``sklearn``'s ``KFold(n_folds, shuffle=False)``.

    The pairs are cut in order into ``n_folds`` contiguous test folds; the first ``num_pairs % n_folds`` of them
    hold ``num_pairs // n_folds + 1`` pairs, the others ``num_pairs // n_folds``.
    """
    if n_folds < 2:
        raise InputError(f"n_folds must be at least 2, got {n_folds}")
    if num_pairs < n_folds:
        raise InputError(f"cannot split {num_pairs} pairs into {n_folds} folds")
    sizes = np.full(n_folds, num_pairs // n_folds, dtype=np.int64)
    sizes[: num_pairs % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.arange(num_pairs)
    return [(np.concatenate([indices[:lo], indices[hi:]]), indices[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _fold_ids(num_pairs: int, n_folds: int) -> np.ndarray:
    fold = np.empty(num_pairs, dtype=np.int64)
    for f, (_, test) in enumerate(kfold_splits(num_pairs, n_folds)):
        fold[test] = f
    return fold


class FoldAccuracy(NamedTuple):
    """What :func:`kfold_accuracy` finds."""

    accuracies: np.ndarray
    """[n_folds] accuracy on each held-out fold at the threshold chosen on the other folds."""
    best_thresholds: np.ndarray
    """[n_folds] the threshold chosen for each fold."""
    threshold: float
    """The threshold with the best accuracy over all pairs (for deployment; not used for the fold accuracies)."""
    tpr: np.ndarray
    """[n_thresholds] true accept rate on the held-out folds, averaged over folds (insightface's ``tpr``)."""
    fpr: np.ndarray
    """[n_thresholds] false accept rate on the held-out folds, averaged over folds (insightface's ``fpr``)."""


def kfold_accuracy(
    dist: ArrayLike, issame: ArrayLike, thresholds: ArrayLike | None = None, n_folds: int = DEFAULT_FOLDS
) -> FoldAccuracy:
    """insightface's ``calculate_roc``: per fold, pick the best threshold on the other folds, score the fold.

    ``dist`` are pair distances (a pair is "same" when ``dist < threshold``), ``thresholds`` ascending (default
    :data:`DEFAULT_THRESHOLDS`). Ties between thresholds go to the smallest one.
    """
    d = _to_numpy(dist, "dist").astype(np.float64).reshape(-1)
    same = _issame(issame, d.shape[0])
    if not np.all(np.isfinite(d)):
        raise InputError("dist holds non-finite values")
    t = _thresholds(thresholds)
    n, n_t = d.shape[0], t.shape[0]
    fold = _fold_ids(n, n_folds)
    # pair i is predicted "same" at threshold j exactly when t[j] > d[i], i.e. j >= first[i]
    first = np.searchsorted(t, d, side="right")
    cells = fold * (n_t + 1) + first

    def accepted(mask: np.ndarray) -> np.ndarray:  # [n_folds, n_t]: pairs of `mask` accepted at each threshold
        hist = np.bincount(cells[mask], minlength=n_folds * (n_t + 1)).reshape(n_folds, n_t + 1)
        return np.cumsum(hist, axis=1)[:, :n_t]

    tp, fp = accepted(same), accepted(~same)
    pos = np.bincount(fold[same], minlength=n_folds)[:, None]
    neg = np.bincount(fold[~same], minlength=n_folds)[:, None]
    size = np.bincount(fold, minlength=n_folds)
    correct = tp + (neg - fp)  # [n_folds, n_t]
    total = correct.sum(axis=0)
    train_acc = (total[None, :] - correct) / (n - size)[:, None]
    best = np.argmax(train_acc, axis=1)
    rows = np.arange(n_folds)
    accuracies = correct[rows, best] / size
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.where(pos > 0, tp / np.maximum(pos, 1), 0.0).mean(axis=0)
        fpr = np.where(neg > 0, fp / np.maximum(neg, 1), 0.0).mean(axis=0)
    return FoldAccuracy(accuracies.astype(np.float64), t[best].copy(), float(t[int(np.argmax(total))]), tpr, fpr)


# ----------------------------------------------------------------------------------------------------------------
# TAR @ FAR


class TarAtFar(NamedTuple):
    """One operating point of :func:`tar_at_far`."""

    far: float
    """The FAR asked for."""
    tar: float
    """Fraction of positive pairs accepted (``nan`` without positive or negative pairs)."""
    threshold: float
    """Pairs with ``dist < threshold`` are accepted (``inf``: all are)."""
    achieved_far: float
    """Fraction of negative pairs accepted at ``threshold`` (never above ``far``)."""


def tar_at_far(dist: ArrayLike, issame: ArrayLike, far: float) -> TarAtFar:
    """True accept rate at a false accept rate of at most ``far``, over all pairs, without interpolation.

    With ``M`` negative pairs, at most ``k`` false accepts are allowed, ``k`` the largest integer with
    ``k / M <= far``. The threshold is the ``(k+1)``-th smallest negative distance ``t`` (``inf`` when ``k >= M``)
    and a pair is accepted when ``dist < t`` (the same strict rule as the accuracy), so at most ``k`` negatives
    are accepted (fewer when negatives tie at ``t``); TAR is the fraction of positive pairs with ``dist < t``.
    This is the most permissive threshold of the empirical ROC whose FAR does not exceed ``far``; no value is
    interpolated between ROC points.

    With few negatives (``far * M < 1``, e.g. LFW's 3000 negatives at FAR 1e-4) no false accept is allowed:
    ``t`` is the smallest negative distance and TAR is the fraction of positives closer than every negative
    (achieved FAR 0). ``achieved_far`` reports the FAR actually reached. Without positives or negatives TAR,
    threshold and achieved FAR are ``nan``.
    """
    far = float(far)
    if not 0.0 < far <= 1.0:
        raise InputError(f"far must be in (0, 1], got {far}")
    d = _to_numpy(dist, "dist").astype(np.float64).reshape(-1)
    same = _issame(issame, d.shape[0])
    if not np.all(np.isfinite(d)):
        raise InputError("dist holds non-finite values")
    neg = np.sort(d[~same])
    pos = d[same]
    m = neg.shape[0]
    if m == 0 or pos.shape[0] == 0:
        return TarAtFar(far, math.nan, math.nan, math.nan)
    k = int(math.floor(far * m))
    while k + 1 <= m and (k + 1) / m <= far:  # guard against far * m rounding down
        k += 1
    while k > 0 and k / m > far:  # ... or up
        k -= 1
    if k >= m:
        threshold = math.inf
    else:
        threshold = float(neg[k])
    false_accepts = int(np.searchsorted(neg, threshold, side="left"))  # negatives < threshold
    tar = float(np.count_nonzero(pos < threshold)) / pos.shape[0]
    return TarAtFar(far, tar, threshold, false_accepts / m)


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass(frozen=True)
class VerificationResult:
    """The verification numbers of one pair set."""

    accuracy: float
    """Mean of the held-out fold accuracies (insightface's ``acc2``)."""
    accuracy_std: float
    """Population standard deviation of the fold accuracies (insightface's ``std``)."""
    fold_accuracies: np.ndarray
    best_thresholds: np.ndarray
    """Per fold, the threshold chosen on the other folds."""
    threshold: float
    """The single best threshold over all pairs."""
    tar_at_far: dict[float, TarAtFar]
    """Per requested FAR, see :func:`tar_at_far`."""
    xnorm: float
    """Mean L2 norm of the raw embeddings (and flip embeddings) before normalization."""
    num_pairs: int
    tpr: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)

    def summary(self) -> str:
        tars = ", ".join(f"TAR@FAR={far:g}: {p.tar:.5f}" for far, p in self.tar_at_far.items())
        return (
            f"accuracy {self.accuracy:.5f} +- {self.accuracy_std:.5f}, threshold {self.threshold:.2f}, "
            f"xnorm {self.xnorm:.3f}" + (f", {tars}" if tars else "")
        )


def evaluate(
    embeddings: ArrayLike,
    issame: ArrayLike,
    flip_embeddings: ArrayLike | None = None,
    *,
    n_folds: int = DEFAULT_FOLDS,
    thresholds: ArrayLike | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
) -> VerificationResult:
    """Verification metrics from already computed embeddings (no model needed).

    ``embeddings`` [2N, D] (pair ``i`` = rows ``2i``, ``2i + 1``), ``issame`` [N] bools, ``flip_embeddings``
    [2N, D] of the horizontally flipped images or ``None``. See the module docstring for the protocol.
    """
    dist, xnorm = pair_distances(embeddings, flip_embeddings)
    same = _issame(issame, dist.shape[0])
    folds = kfold_accuracy(dist, same, thresholds, n_folds)
    return VerificationResult(
        accuracy=float(np.mean(folds.accuracies)),
        accuracy_std=float(np.std(folds.accuracies)),
        fold_accuracies=folds.accuracies,
        best_thresholds=folds.best_thresholds,
        threshold=folds.threshold,
        tar_at_far={float(f): tar_at_far(dist, same, f) for f in fars},
        xnorm=xnorm,
        num_pairs=int(dist.shape[0]),
        tpr=folds.tpr,
        fpr=folds.fpr,
    )


def _model_placement(
    model: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device | None
) -> tuple[torch.device | None, torch.dtype | None]:
    dtype = None
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                dtype = p.dtype
                if device is None:
                    device = p.device
                break
    return (None if device is None else torch.device(device)), dtype


def compute_embeddings(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model`` over ``images`` [M, C, H, W] in batches; returns ``(embeddings, flip_embeddings)`` on CPU.

    ``flip_embeddings`` are the embeddings of the images flipped horizontally (along W), ``None`` when
    ``flip=False``. Runs under ``torch.no_grad()``; an ``nn.Module`` is put in eval mode for the run and its mode
    restored after. Batches go to ``device`` (default: the device of the module's first floating parameter, else
    where ``images`` are) and to the module's parameter dtype. The model must return [B, D]. Results are float32.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a non-empty tensor [M, C, H, W], got {shape}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    target, dtype = _model_placement(model, device)
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    outputs: list[torch.Tensor] = []
    flipped: list[torch.Tensor] = []
    dim: int | None = None

    def run(batch: torch.Tensor, start: int) -> torch.Tensor:
        nonlocal dim
        out = model(batch)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(
                f"model must return a tensor [B, D] for a batch of {batch.shape[0]} images "
                f"(images {start}..{start + batch.shape[0] - 1}), got {got}"
            )
        if dim is None:
            dim = out.shape[1]
        elif out.shape[1] != dim:
            raise InputError(f"model returned {out.shape[1]}-dim embeddings for images from {start}, {dim}-dim before")
        return out.detach().to("cpu", torch.float32)

    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size]
                if target is not None or dtype is not None:
                    batch = batch.to(
                        device=target, dtype=dtype if dtype is not None else batch.dtype, non_blocking=True
                    )
                outputs.append(run(batch, start))
                if flip:
                    flipped.append(run(torch.flip(batch, dims=[3]), start))
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(outputs), (torch.cat(flipped) if flip else None)


def evaluate_model(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    issame: ArrayLike,
    *,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device | None = None,
    n_folds: int = DEFAULT_FOLDS,
    thresholds: ArrayLike | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
) -> VerificationResult:
    """Embed ``images`` [2N, 3, H, W] with ``model`` (and their flips) and :func:`evaluate` the pairs.

    ``images`` are as :func:`partial_fc.data.binfile.load_bin` returns them; see :func:`compute_embeddings`.
    """
    if isinstance(images, torch.Tensor) and images.dim() >= 1 and images.shape[0] % 2:
        raise InputError(f"images must hold 2 per pair, got an odd count {images.shape[0]}")
    emb, flip_emb = compute_embeddings(model, images, batch_size=batch_size, flip=flip, device=device)
    return evaluate(emb, issame, flip_emb, n_folds=n_folds, thresholds=thresholds, fars=fars)
