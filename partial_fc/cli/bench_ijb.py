"""`partial-fc bench eval-ijb`: images per second of decode + align + embed with flip, and pairs per second of
1:1 scoring (`perf/ijb_bench.py`), one JSON line each, with a warning on stderr for each sign of a loaded machine."""

from __future__ import annotations

import argparse
import json

from partial_fc.perf.conditions import print_warnings
from partial_fc.perf.ijb_bench import run_ijb_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", default="r50")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument(
        "--identities", type=int, default=6, help="identities of the synthetic loose crops (x24 images)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2_000_000, help="template pairs to score")


def run(args: argparse.Namespace) -> int:
    results = run_ijb_bench(args.network, args.embedding_size, args.identities, args.batch_size, args.pairs)
    for result in results.values():
        print(json.dumps(result), flush=True)
        print_warnings("partial-fc bench eval-ijb", result)
    return 0
