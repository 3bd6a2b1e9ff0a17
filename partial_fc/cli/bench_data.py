"""`partial-fc bench data`: images per second per worker for each stage of loading (`perf/data_bench.py`), as
one JSON line, with a warning on stderr for each sign of a loaded machine."""

from __future__ import annotations

import argparse
import json

from partial_fc.perf.conditions import print_warnings
from partial_fc.perf.data_bench import run_data_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rec", required=True, help="folder holding train.rec and train.idx")
    parser.add_argument("--images", type=int, default=4000, help="records to read (the first ones of the set)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes for the loader figure")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many passes for each figure")


def run(args: argparse.Namespace) -> int:
    result = run_data_bench(args.rec, args.images, args.batch, args.workers, args.repeats)
    print(json.dumps(result), flush=True)
    print_warnings("partial-fc bench data", result)
    return 0
