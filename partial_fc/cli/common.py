"""Pieces every subcommand shares: head and dtype options, the margin option, rank-aware printing, the error exit."""

from __future__ import annotations

import argparse
import json
from typing import Any

from partial_fc.comm import BACKENDS, Communicator
from partial_fc.engine.config import DTYPES
from partial_fc.errors import InputError
from partial_fc.heads import ArcFace, CombinedMargin, CosFace
from partial_fc.heads.sparse_sgd import CENTER_MOMENTUM_CHOICES
from partial_fc.progress import print_line


def add_head_options(parser: argparse.ArgumentParser) -> None:
    """Options that shape the Partial FC head and the communication backend."""
    parser.add_argument("--classes", type=int, default=1000, help="number of identities (class centers)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="share of negative centers sampled per step")
    parser.add_argument("--steps", type=int, default=20, help="number of steps")
    parser.add_argument(
        "--margin",
        default="arcface",
        help="arcface, cosface, or m1,m2,m3 for the combined margin s*(cos(m1*t+m2)-m3)",
    )
    parser.add_argument("--scale", type=float, default=64.0, help="logit scale s")
    parser.add_argument("--storage-dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--momentum-dtype",
        choices=CENTER_MOMENTUM_CHOICES,
        default=None,
        help="the centers' SGD momentum: storage (the storage dtype, the default), int8 (codes + a scale per row) "
        "or none (plain SGD)",
    )
    parser.add_argument("--fp16", action="store_true", help="reduced-precision matmuls in the head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="communication backend")


def margin_from_option(text: str, scale: float) -> CombinedMargin:
    """Parse --margin: 'arcface', 'cosface' or 'm1,m2,m3'."""
    if text == "arcface":
        return ArcFace(s=scale)
    if text == "cosface":
        return CosFace(s=scale)
    try:
        m1, m2, m3 = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--margin {text!r} is not arcface, cosface or m1,m2,m3") from None
    return CombinedMargin(s=scale, m1=m1, m2=m2, m3=m3)


def print_rank0(comm: Communicator, message: Any) -> None:
    """Print on rank 0 only; dicts become one JSON line."""
    if comm.rank == 0:
        print(json.dumps(message) if isinstance(message, dict) else message, flush=True)


def fail(message: str) -> int:
    """Report a bad-input error on stderr and return the exit status for it."""
    print_line(f"partial-fc: error: {message}")
    return 2
