"""Relative comparisons used by the exactness tests."""

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-4}
