"""`partial-fc make-synthetic`: a generated face set with learnable identities, in the real file formats."""

from __future__ import annotations

import argparse
import json
import os

from partial_fc.data.synthetic import write_synthetic_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identities", type=int, required=True, help="training identities")
    parser.add_argument("--images-per-id", type=int, required=True, help="images per identity")
    parser.add_argument("--out", required=True, help="output folder (train.rec/.idx/.lst, property, synthetic.bin)")
    parser.add_argument("--holdout-identities", type=int, default=None, help="identities kept out of training for the pairs (default: identities // 5, at least 20)")
    parser.add_argument("--pairs", type=int, default=600, help="verification pairs in synthetic.bin (half same, half different)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")


def run(args: argparse.Namespace) -> int:
    holdout = args.holdout_identities if args.holdout_identities is not None else max(20, args.identities // 5)
    written = write_synthetic_set(
        args.out, args.identities, args.images_per_id, holdout, args.pairs, args.seed, args.workers, args.quality
    )
    print(json.dumps({"job": "make-synthetic", "out": args.out, **written.__dict__}), flush=True)
    return 0
