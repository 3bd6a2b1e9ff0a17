"""`partial-fc unpack`: insightface RecordIO face sets (Glint360K, MS1M, ...) to `OUT/id_<label>/<label>_<n>.jpg`.

The interface of insightface's `recognition/partial_fc/unpack_glint360k.py` (`--include DIR1,DIR2,... --output
OUT`; `unpack_glint360k.py` at the top of this repository runs this command); `partial_fc.data.unpack_to_folder`
does the work, in parallel and resumable.
"""

from __future__ import annotations

import argparse
import json
import os

from partial_fc.data.unpack_to_folder import unpack_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of insightface's unpack_glint360k.py, plus parallelism and chunking."""
    parser.add_argument(
        "--include", required=True, help="comma-separated set folders, each with train.rec and train.idx"
    )
    parser.add_argument("--output", required=True, help="output folder: id_<label>/<label>_<n>.jpg")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reading and writing processes")
    parser.add_argument("--chunk-size", type=int, default=2048, help="image records per unit of work (and of resuming)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    """Unpack the sets and print the summary as one JSON line."""
    directories = [part for part in args.include.split(",") if part]
    summary = unpack_sets(directories, args.output, args.workers, args.chunk_size, progress=not args.quiet)
    print(json.dumps({"job": "unpack", **summary}), flush=True)
    return 0
