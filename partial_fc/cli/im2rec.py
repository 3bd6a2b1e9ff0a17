"""`partial-fc im2rec`: an image folder to a `.lst` (`--list`), and a `.lst` to a face set in insightface's RecordIO
layout, as MXNet's `tools/im2rec.py` does in two stages; `partial_fc.data.im2rec` does the work."""

from __future__ import annotations

import argparse
import json

from partial_fc.data.im2rec import EncodeOptions, make_list, pack_list
from partial_fc.data.imagefolder import IMAGE_EXTENSIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of both stages (see `partial_fc.data.im2rec`)."""
    parser.add_argument("prefix", help="PREFIX.lst is written (--list) or read; PREFIX.rec/.idx are written")
    parser.add_argument("root", help="image folder: one sub-folder per identity")
    listing = parser.add_argument_group("making the list (--list)")
    listing.add_argument("--list", action="store_true", help="scan ROOT and write PREFIX.lst instead of packing")
    listing.add_argument("--exts", nargs="+", default=list(IMAGE_EXTENSIONS), help="image file extensions (any case)")
    listing.add_argument(
        "--recursive", action="store_true", help="also take images from folders nested in an identity folder"
    )
    listing.add_argument(
        "--shuffle", action=argparse.BooleanOptionalAction, default=True, help="shuffle the lines as MXNet does"
    )
    listing.add_argument("--seed", type=int, default=100, help="shuffle seed (100: MXNet's order)")
    packing = parser.add_argument_group("packing the list into PREFIX.rec/.idx")
    packing.add_argument("--resize", type=int, default=0, help="resize the shorter side to this many pixels (0: keep)")
    packing.add_argument(
        "--center-crop", action="store_true", help="crop the central square first (with --resize N: N x N)"
    )
    packing.add_argument(
        "--quality", type=int, default=None, help="JPEG quality 1-100 (default 95) or PNG compression 0-9 (default 3)"
    )
    packing.add_argument("--encoding", choices=(".jpg", ".png"), default=".jpg", help="image encoding in the records")
    packing.add_argument(
        "--pass-through", action="store_true", help="store the files' bytes as they are, no re-encoding"
    )
    packing.add_argument(
        "--color", type=int, choices=(1, 0, -1), default=1, help="decode as colour (1), grey (0) or unchanged (-1)"
    )
    packing.add_argument("--num-thread", type=int, default=1, help="threads decoding and encoding images")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    """Run the stage the arguments select and print its summary as one JSON line."""
    if args.list:
        summary = make_list(args.prefix, args.root, args.exts, args.recursive, args.shuffle, args.seed)
    else:
        options = EncodeOptions(
            args.resize, args.center_crop, args.quality, args.encoding, args.pass_through, args.color
        )
        summary = pack_list(args.prefix, args.root, options, args.num_thread, progress=not args.quiet)
    print(json.dumps({"job": "im2rec", **summary}), flush=True)
    return 0
