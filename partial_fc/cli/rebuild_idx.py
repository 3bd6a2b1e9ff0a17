"""`partial-fc rebuild-idx`: rebuild a lost `.idx` from its `.rec` (insightface face-set keys when the set has
its header, else 0..N-1)."""

from __future__ import annotations

import argparse
import json
import time

from partial_fc.data.faceset import rebuild_faceset_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rec", help="the .rec file")
    parser.add_argument("idx", nargs="?", help="the .idx to write (default: beside the .rec, same name)")


def run(args: argparse.Namespace) -> int:
    idx = args.idx or (args.rec[: -len(".rec")] if args.rec.endswith(".rec") else args.rec) + ".idx"
    started = time.perf_counter()
    records = rebuild_faceset_index(args.rec, idx)
    print(
        json.dumps(
            {
                "job": "rebuild-idx",
                "rec": args.rec,
                "idx": idx,
                "records": records,
                "seconds": round(time.perf_counter() - started, 3),
            }
        ),
        flush=True,
    )
    return 0
