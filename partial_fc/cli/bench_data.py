"""`partial-fc bench data`: images per second per worker (one process, one thread) for each stage of loading.

On the same records in the same run: the plain path (read + `unpack` + `cv2.imdecode`, no augmentation), our
stages timed apart (read, decode, augment), our whole batch path (`RecordFaceDataset.__getitems__`: read,
decode, flip, normalise into a batch tensor), and our loader with `--workers` processes.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import cv2
import numpy as np
import torch

from partial_fc.data.datasets import RecordFaceDataset
from partial_fc.data.decode import DECODER, ImageTransform, decode_rgb
from partial_fc.data.loader import build_loader
from partial_fc.data.recordio import unpack
from partial_fc.data.sampler import DistributedEpochSampler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rec", required=True, help="folder holding train.rec and train.idx")
    parser.add_argument("--images", type=int, default=4000, help="records to read (the first ones of the set)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes for the loader figure")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes for each figure")


def _rate(count: int, work: Callable[[], object], repeats: int) -> float:
    """Images per second of `work` over `count` images, the best of `repeats` passes (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return count / best


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    dataset = RecordFaceDataset(args.rec, flip=True)
    keys = [int(key) for key in dataset.image_keys[: args.images]]
    reader, count = dataset.reader, len(keys)
    payloads = [unpack(reader.read(key))[1] for key in keys]
    decoded = [decode_rgb(payload) for payload in payloads]
    transform, rng = ImageTransform(decoded[0].shape[:2], flip=True), np.random.default_rng(0)
    batches = [list(range(start, min(start + args.batch, count))) for start in range(0, count, args.batch)]

    def plain() -> None:
        for key in keys:
            cv2.imdecode(np.frombuffer(unpack(reader.read(key))[1], np.uint8), cv2.IMREAD_COLOR)

    figures = {
        "plain_read_imdecode": _rate(count, plain, args.repeats),
        "read": _rate(count, lambda: [unpack(reader.read(key)) for key in keys], args.repeats),
        "decode": _rate(count, lambda: [decode_rgb(payload) for payload in payloads], args.repeats),
        "augment": _rate(count, lambda: [transform(image, rng) for image in decoded], args.repeats),
        "pipeline": _rate(count, lambda: [dataset.__getitems__(batch) for batch in batches], args.repeats),
    }
    if args.workers > 0:
        sampler = DistributedEpochSampler(count, seed=0)
        loader = build_loader(dataset, args.batch, sampler, num_workers=args.workers, drop_last=False)
        iter(loader)  # start the workers before timing
        loader_rate = _rate(count, lambda: [None for _ in loader], args.repeats)
        figures["loader_per_worker"] = loader_rate / args.workers
    result = {"bench": "data", "decoder": DECODER, "images": count, "workers": args.workers}
    result.update({f"{name}_img_s": round(value, 1) for name, value in figures.items()})
    result["pipeline_over_plain"] = round(figures["pipeline"] / figures["plain_read_imdecode"], 3)
    result["decode_over_imdecode"] = round(
        figures["decode"] / _rate(count, lambda: [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in payloads], args.repeats), 3
    )
    print(json.dumps(result), flush=True)
    return 0
