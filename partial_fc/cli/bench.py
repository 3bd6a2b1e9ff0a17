"""`partial-fc bench head|data|eval-ijb`: the options of each benchmark, one call into `perf/` each, its JSON line.

`bench head` runs `perf/head_bench.py` (the head's step against its matmul floor); `bench data` and
`bench eval-ijb` take their options in `cli/bench_data.py` and `cli/bench_ijb.py` and run `perf/data_bench.py`
and `perf/ijb_bench.py`.
"""

from __future__ import annotations

import argparse

from partial_fc.cli import bench_data, bench_ijb
from partial_fc.cli.common import add_head_options, margin_from_option, print_rank0
from partial_fc.comm import get_communicator
from partial_fc.perf.conditions import print_warnings
from partial_fc.perf.head_bench import HeadBenchSettings, run_head_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True)
    head = sub.add_parser("head", help="the Partial FC head's step and its matmul floor")
    add_head_options(head)
    head.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 2)")
    head.add_argument(
        "--update-in-step",
        action="store_true",
        help="keep the sampled rows' gradient for step() (the gradient-accumulation mode) "
        "instead of updating in backward",
    )
    head.add_argument(
        "--reference-repeats",
        type=int,
        default=3,
        help="timings of the matmul floor alone at start, before the head exists (the loaded-machine check)",
    )
    head.add_argument(
        "--force", action="store_true", help="run even when the estimated memory per rank exceeds what is available"
    )
    head.set_defaults(steps=10)
    bench_data.add_arguments(sub.add_parser("data", help="images per second per worker for read, decode, augment"))
    bench_ijb.add_arguments(
        sub.add_parser("eval-ijb", help="IJB images/s (align + embed + flip) and pairs/s of scoring")
    )


def head_settings(args: argparse.Namespace) -> HeadBenchSettings:
    """The `bench head` options as the benchmark's settings."""
    return HeadBenchSettings(
        classes=args.classes,
        dim=args.dim,
        batch=args.batch,
        sample_rate=args.sample_rate,
        margin=margin_from_option(args.margin, args.scale),
        steps=args.steps,
        storage_dtype=args.storage_dtype,
        momentum_dtype=args.momentum_dtype,
        fp16=args.fp16,
        seed=args.seed,
        warmup=args.warmup,
        update_in_step=args.update_in_step,
        reference_repeats=args.reference_repeats,
        force=args.force,
    )


def run_head(args: argparse.Namespace) -> int:
    settings = head_settings(args)
    comm = get_communicator(args.backend)
    result = run_head_bench(settings, comm)
    print_rank0(comm, result)
    if comm.rank == 0:
        print_warnings("partial-fc bench head", result)
        if not result["fits"]:
            message = f"not run: {result['message']} (--force runs it anyway)"
            print_warnings("partial-fc bench head", {"warnings": [message]})
    return 0


def run(args: argparse.Namespace) -> int:
    if args.target == "eval-ijb":
        return bench_ijb.run(args)
    return run_head(args) if args.target == "head" else bench_data.run(args)
