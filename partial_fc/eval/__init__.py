"""Evaluation: face verification on image pairs (LFW protocol, insightface's ``.bin`` sets)."""

from partial_fc.eval import verification
from partial_fc.eval.verification import *  # noqa: F401,F403  (the names listed in verification.__all__)

__all__ = list(verification.__all__)
