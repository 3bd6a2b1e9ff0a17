"""Evaluation: face verification on image pairs (LFW protocol, insightface's ``.bin`` sets)."""

from partial_fc.eval.verification import (
    DEFAULT_FARS,
    DEFAULT_THRESHOLDS,
    FoldAccuracy,
    TarAtFar,
    VerificationResult,
    compute_embeddings,
    evaluate,
    evaluate_model,
    kfold_accuracy,
    kfold_splits,
    pair_distances,
    tar_at_far,
)

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
