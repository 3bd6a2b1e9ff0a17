"""`partial-fc bench eval-ijb`: images per second of decode + align + embed with flip, and pairs per second of
1:1 scoring, each with the conditions it was measured under and the time it extrapolates to for IJB-C."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from partial_fc.backbones import get_model
from partial_fc.comm import SingleProcessCommunicator
from partial_fc.data.synthetic_ijb import write_synthetic_ijb
from partial_fc.eval.ijb import pair_scores, pool_templates, tar_at_fars
from partial_fc.eval.ijb_embed import image_features
from partial_fc.eval.ijb_meta import load_protocol
from partial_fc.perf.conditions import BenchConditions, print_warnings

IJBC_IMAGES, IJBC_PAIRS = 469_375, 15_658_489


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", default="r50")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument(
        "--identities", type=int, default=6, help="identities of the synthetic loose crops (x24 images)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2_000_000, help="template pairs to score")


def run(args: argparse.Namespace) -> int:
    model = get_model(args.network, num_features=args.embedding_size).eval()
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_ijb(Path(folder), identities=args.identities, seed=0)
        protocol = load_protocol(folder, "IJBC")

        def embed(images: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return model(images).numpy()

        embed(torch.zeros(2 * args.batch_size, 3, 112, 112))  # warm-up: the first pass allocates and plans
        conditions = BenchConditions()
        start = time.perf_counter()
        image_features(
            embed,
            protocol.image_folder,
            protocol.images,
            SingleProcessCommunicator(),
            args.batch_size,
            torch.device("cpu"),
        )
        images_per_s = len(protocol.images.names) / (time.perf_counter() - start)
    _report(
        {
            "bench": "eval-ijb embed",
            "network": args.network,
            "images": len(protocol.images.names),
            "batch": args.batch_size,
            "images_per_s": round(images_per_s, 2),
            "ijbc_hours": round(IJBC_IMAGES / images_per_s / 3600, 2),
            **conditions.finish(),
        }
    )
    rng = np.random.default_rng(0)
    templates = 23_124
    ids, feats = pool_templates(
        rng.normal(size=(templates, args.embedding_size)).astype(np.float32), np.arange(templates), np.arange(templates)
    )
    first, second = rng.integers(0, templates, args.pairs), rng.integers(0, templates, args.pairs)
    same = rng.random(args.pairs) < 0.0013
    conditions = BenchConditions()
    start = time.perf_counter()
    tar_at_fars(pair_scores(ids, feats, first, second), same)
    pairs_per_s = args.pairs / (time.perf_counter() - start)
    _report(
        {
            "bench": "eval-ijb scoring",
            "pairs": args.pairs,
            "pairs_per_s": round(pairs_per_s),
            "ijbc_s": round(IJBC_PAIRS / pairs_per_s, 1),
            **conditions.finish(),
        }
    )
    return 0


def _report(result: dict) -> None:
    print(json.dumps(result), flush=True)
    print_warnings("partial-fc bench eval-ijb", result)
