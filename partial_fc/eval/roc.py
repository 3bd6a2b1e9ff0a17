"""The exact ROC curve of a verification set and its plot (FAR on a log axis), written as a PNG.

A pair is accepted at threshold ``t`` when ``dist < t``, the rule :mod:`partial_fc.eval.verification` uses, so
every point here is one the accuracy and TAR@FAR computations can reach.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from partial_fc.errors import InputError
from partial_fc.fileio import atomic_path

__all__ = ["RocCurve", "plot_roc", "roc_curve"]


class RocCurve(NamedTuple):
    """Operating points of a pair set, ordered by threshold (FAR and TAR never decrease along it)."""

    far: np.ndarray
    """Fraction of negative pairs with ``dist < threshold``."""
    tar: np.ndarray
    """Fraction of positive pairs with ``dist < threshold``."""
    thresholds: np.ndarray
    """Every distinct pair distance, ascending, then ``inf`` (which accepts every pair)."""


def roc_curve(dist: Sequence[float] | np.ndarray, issame: Sequence[bool] | np.ndarray) -> RocCurve:
    """Every operating point of the pairs' distances, counted exactly from the sorted distances (no binning).

    The thresholds are the distinct distances and ``inf``: the first accepts nothing (FAR = TAR = 0), the
    last everything (FAR = TAR = 1), and no other threshold gives a point that is not among these.
    """
    d = np.asarray(dist, dtype=np.float64).reshape(-1)
    same = np.asarray(issame)
    if same.shape != d.shape:
        raise InputError(f"roc_curve: {d.shape[0]} distances but {same.reshape(-1).shape[0]} issame flags")
    if not np.isfinite(d).all():
        raise InputError("roc_curve: distances hold non-finite values")
    same = same.astype(bool)
    positives, negatives = np.sort(d[same]), np.sort(d[~same])
    if positives.size == 0 or negatives.size == 0:
        raise InputError(
            f"roc_curve needs positive and negative pairs, got {positives.size} positive and {negatives.size} negative"
        )
    thresholds = np.append(np.unique(d), np.inf)
    far = np.searchsorted(negatives, thresholds, side="left") / negatives.size
    tar = np.searchsorted(positives, thresholds, side="left") / positives.size
    return RocCurve(far, tar, thresholds)


def plot_roc(
    curves: Mapping[str, RocCurve],
    path: str | os.PathLike,
    title: str | None = None,
    mark_fars: Sequence[float] = (1e-4, 1e-3),
) -> None:
    """Plot TAR against FAR (log scale) for each named curve into the PNG ``path``, written atomically.

    FAR 0 cannot sit on a log axis: each curve starts at its smallest non-zero FAR, one negative pair.
    ``mark_fars`` are drawn as dotted vertical lines. The figure goes to a temporary file beside ``path``
    that is renamed over it, so readers never see a partial PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not curves:
        raise InputError("plot_roc: no curves to plot")
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot()
    floor = 1.0
    for label, curve in curves.items():
        shown = curve.far > 0
        floor = min(floor, float(curve.far[shown].min()))
        axes.plot(curve.far[shown], curve.tar[shown], drawstyle="steps-post", label=label)
    for far in mark_fars:
        if far >= floor:
            axes.axvline(far, color="grey", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlim(floor, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
