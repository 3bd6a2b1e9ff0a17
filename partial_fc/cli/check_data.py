"""`partial-fc check-data --rec DIR`: check every record of a face set before a long run; list each bad one.

Exit status 0 when every record is sound, 1 when some are bad (each listed as `bad record: FILE, key K, offset O:
REASON`), 2 when the arguments are wrong or the set is missing. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os

from partial_fc.data.integrity import check_data
from partial_fc.errors import InputError
from partial_fc.progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rec",
        required=True,
        metavar="DIR",
        help="a folder holding train.rec/.idx, a .rec file, or an image folder (<identity>/*.jpg)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes checking ranges of records (default: one per CPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    bar = Progress(None, "check-data", interval=float("inf") if args.quiet else 2.0)
    report = check_data(args.rec, args.workers, bar.update)
    if not args.quiet:
        bar.close()
    for record in report.bad:
        print(f"bad record: {record}", flush=True)
    print(
        json.dumps(
            {
                "job": "check-data",
                "rec": report.source,
                "records": report.records,
                "bad": len(report.bad),
                "seconds": round(report.seconds, 3),
            }
        ),
        flush=True,
    )
    return 1 if report.bad else 0
