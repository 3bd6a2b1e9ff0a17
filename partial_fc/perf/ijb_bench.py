"""Images per second of IJB decode + align + embed with flip, and pairs per second of 1:1 scoring, for
`partial-fc bench eval-ijb`: each with the conditions it was measured under and the time it extrapolates to for
IJB-C."""

from __future__ import annotations

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
from partial_fc.perf.conditions import BenchConditions

IJBC_IMAGES, IJBC_PAIRS = 469_375, 15_658_489


def run_ijb_bench(network: str, embedding_size: int, identities: int, batch_size: int, pairs: int) -> dict[str, dict]:
    """The two figures, `{"embed": ..., "scoring": ...}`: `network` embedding a synthetic IJB-C set of
    `identities` x 24 loose crops `batch_size` at a time, and `pairs` random template pairs scored."""
    model = get_model(network, num_features=embedding_size).eval()
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_ijb(Path(folder), identities=identities, seed=0)
        protocol = load_protocol(folder, "IJBC")

        def embed(images: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return model(images).numpy()

        embed(torch.zeros(2 * batch_size, 3, 112, 112))  # warm-up: the first pass allocates and plans
        conditions = BenchConditions()
        start = time.perf_counter()
        image_features(
            embed,
            protocol.image_folder,
            protocol.images,
            SingleProcessCommunicator(),
            batch_size,
            torch.device("cpu"),
        )
        images_per_s = len(protocol.images.names) / (time.perf_counter() - start)
    embedding = {
        "bench": "eval-ijb embed",
        "network": network,
        "images": len(protocol.images.names),
        "batch": batch_size,
        "images_per_s": round(images_per_s, 2),
        "ijbc_hours": round(IJBC_IMAGES / images_per_s / 3600, 2),
        **conditions.finish(),
    }
    rng = np.random.default_rng(0)
    templates = 23_124
    ids, feats = pool_templates(
        rng.normal(size=(templates, embedding_size)).astype(np.float32), np.arange(templates), np.arange(templates)
    )
    first, second = rng.integers(0, templates, pairs), rng.integers(0, templates, pairs)
    same = rng.random(pairs) < 0.0013
    conditions = BenchConditions()
    start = time.perf_counter()
    tar_at_fars(pair_scores(ids, feats, first, second), same)
    pairs_per_s = pairs / (time.perf_counter() - start)
    scoring = {
        "bench": "eval-ijb scoring",
        "pairs": pairs,
        "pairs_per_s": round(pairs_per_s),
        "ijbc_s": round(IJBC_PAIRS / pairs_per_s, 1),
        **conditions.finish(),
    }
    return {"embed": embedding, "scoring": scoring}
