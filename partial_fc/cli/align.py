"""`partial-fc align`: a folder of images and an insightface 5-point landmark list -> aligned ArcFace crops."""

from __future__ import annotations

import argparse
import json
import os

from partial_fc.data.align_folder import align_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="image folder the landmark list's paths are relative to")
    parser.add_argument(
        "landmarks",
        help="landmark list, 'relative/path x1 y1 ... x5 y5 [faceness]' per line (insightface's IJB _5pts layout)",
    )
    parser.add_argument("out", help="output folder: the aligned images, same relative paths (JPEG or PNG by extension)")
    parser.add_argument("--size", type=int, default=112, help="crop size, a multiple of 112 or 128")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes aligning images")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="count and list missing or broken images and malformed lines instead of stopping",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    summary = align_folder(
        args.root,
        args.landmarks,
        args.out,
        args.size,
        args.workers,
        args.skip_bad,
        args.quality,
        progress=not args.quiet,
    )
    print(json.dumps({"job": "align", **summary}), flush=True)
    return 0
