"""`partial-fc demo`: a small network plus the Partial FC head trained on generated, separable data
(`engine/demo.py`); exits 1 when the backbone replicas differ across ranks at the end."""

from __future__ import annotations

import argparse
import functools

from partial_fc.cli.common import add_head_options, margin_from_option, print_rank0
from partial_fc.comm import get_communicator
from partial_fc.engine.config import DTYPES
from partial_fc.engine.demo import DemoSettings, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_head_options(parser)
    parser.add_argument("--input-dim", type=int, default=64, help="dimension of the generated inputs")
    parser.add_argument("--noise", type=float, default=0.5, help="noise around each identity's prototype")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--log-every", type=int, default=10)
    parser.set_defaults(classes=2000, dim=64, batch=128, sample_rate=0.2, steps=150, margin="cosface", scale=32.0)


def run(args: argparse.Namespace) -> int:
    comm = get_communicator(args.backend)
    settings = DemoSettings(
        classes=args.classes,
        dim=args.dim,
        batch=args.batch,
        sample_rate=args.sample_rate,
        steps=args.steps,
        margin=margin_from_option(args.margin, args.scale),
        storage_dtype=DTYPES[args.storage_dtype],
        fp16=args.fp16,
        seed=args.seed,
        input_dim=args.input_dim,
        noise=args.noise,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        log_every=args.log_every,
    )
    summary = run_demo(settings, comm, functools.partial(print_rank0, comm))
    print_rank0(comm, summary)
    return 0 if summary["replicas_identical"] else 1
