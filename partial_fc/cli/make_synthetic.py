"""`partial-fc make-synthetic`: a generated face set with learnable identities, in the real file formats."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from partial_fc.data.synthetic import write_synthetic_set
from partial_fc.data.synthetic_ijb import write_synthetic_ijb
from partial_fc.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identities", type=int, help="training identities (with --ijb: subjects, default 20)")
    parser.add_argument("--images-per-id", type=int, help="images per identity")
    parser.add_argument("--out", help="output folder (train.rec/.idx/.lst, property, synthetic.bin)")
    parser.add_argument(
        "--ijb",
        metavar="OUT",
        help="instead, a small IJB-C-format set of unseen identities in OUT "
        "(loose_crop/, meta/ as insightface lays them out)",
    )
    parser.add_argument("--templates-per-id", type=int, default=4, help="with --ijb: templates per subject")
    parser.add_argument("--medias-per-template", type=int, default=2, help="with --ijb: medias per template")
    parser.add_argument("--images-per-media", type=int, default=3, help="with --ijb: images per media")
    parser.add_argument(
        "--holdout-identities",
        type=int,
        default=None,
        help="identities kept out of training for the pairs (default: identities // 5, at least 20)",
    )
    parser.add_argument(
        "--pairs", type=int, default=600, help="verification pairs in synthetic.bin (half same, half different)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")


def run(args: argparse.Namespace) -> int:
    if args.ijb is not None:
        subjects = 20 if args.identities is None else args.identities
        written = write_synthetic_ijb(
            Path(args.ijb),
            subjects,
            args.templates_per_id,
            args.medias_per_template,
            args.images_per_media,
            quality=args.quality,
            seed=args.seed,
        )
        print(json.dumps({"job": "make-synthetic", "ijb": args.ijb, **written}), flush=True)
        return 0
    if args.identities is None or args.images_per_id is None or args.out is None:
        raise InputError("make-synthetic needs --identities, --images-per-id and --out (or --ijb OUT)")
    holdout = args.holdout_identities if args.holdout_identities is not None else max(20, args.identities // 5)
    written = write_synthetic_set(
        args.out, args.identities, args.images_per_id, holdout, args.pairs, args.seed, args.workers, args.quality
    )
    print(json.dumps({"job": "make-synthetic", "out": args.out, **written.__dict__}), flush=True)
    return 0
