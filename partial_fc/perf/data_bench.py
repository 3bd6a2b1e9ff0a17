"""Images per second per worker (one process, one thread) for each stage of loading, for `partial-fc bench data`.

On the same records in the same run: the plain path (read + `unpack` + `cv2.imdecode`, no augmentation), our
stages timed apart (read, decode into a batch slot, flip), a worker's whole batch path
(`RecordFaceDataset.__getitems__`: read, decode and flip into one uint8 batch), the normalisation that follows
on the training device (timed here on this CPU), and our loader with `workers` processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from partial_fc.data.datasets import RecordFaceDataset
from partial_fc.data.decode import DECODER, decode_into, decode_rgb, flip_images, normalize_images
from partial_fc.data.loader import build_loader
from partial_fc.data.recordio import unpack
from partial_fc.data.sampler import DistributedEpochSampler
from partial_fc.fileio import PathLike
from partial_fc.perf.conditions import BenchConditions


def _rates(works: dict[str, tuple[int, Callable[[], object]]], repeats: int) -> dict[str, float]:
    """Images per second of each ``(count, work)``, the best of ``repeats`` passes; passes go round-robin over
    the works, so a shared machine's slow spells fall on every figure alike rather than on one."""
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeats):
        for name, (_, work) in works.items():
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: works[name][0] / seconds for name, seconds in best.items()}


def run_data_bench(rec: PathLike, images: int, batch: int, workers: int, repeats: int) -> dict:
    """Each stage's images per second on the first `images` records of the set in folder `rec`, the best of
    `repeats` passes, with the ratios to the plain path and the conditions they were measured under."""
    torch.set_num_threads(1)
    conditions = BenchConditions()
    dataset = RecordFaceDataset(rec, flip=True)
    keys = [int(key) for key in dataset.image_keys[:images]]
    reader, count = dataset.reader, len(keys)
    payloads = [unpack(reader.read(key))[1] for key in keys]
    size = dataset.image_size or decode_rgb(payloads[0]).shape[:2]
    slots = np.empty((batch, *size, 3), dtype=np.uint8)
    batches = [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]
    flags = np.random.default_rng(0).random(batch) < 0.5
    uint8_batches = [dataset.__getitems__(indices).images for indices in batches]

    def plain() -> None:
        for key in keys:
            cv2.imdecode(np.frombuffer(unpack(reader.read(key))[1], np.uint8), cv2.IMREAD_COLOR)

    def decode() -> None:
        for i, payload in enumerate(payloads):
            decode_into(payload, slots[i % batch])

    flipped = len(batches) * batch
    figures = _rates(
        {
            "plain_read_imdecode": (count, plain),
            "read": (count, lambda: [unpack(reader.read(key)) for key in keys]),
            "decode": (count, decode),
            "flip": (flipped, lambda: [flip_images(slots, flags) for _ in batches]),
            "pipeline": (count, lambda: [dataset.__getitems__(indices) for indices in batches]),
            "normalize_cpu": (count, lambda: [normalize_images(images) for images in uint8_batches]),
        },
        repeats,
    )
    conditions.sample()
    if workers > 0:
        sampler = DistributedEpochSampler(count, seed=0)
        loader = build_loader(dataset, batch, sampler, num_workers=workers, drop_last=False)
        iter(loader)  # start the workers before timing
        loader_rate = _rates({"loader": (count, lambda: [None for _ in loader])}, repeats)["loader"]
        figures["loader_per_worker"] = loader_rate / workers
    result = {"bench": "data", "decoder": DECODER, "images": count, "workers": workers}
    result.update({f"{name}_img_s": round(value, 1) for name, value in figures.items()})
    plain_rate = figures["plain_read_imdecode"]
    result["pipeline_over_plain"] = round(figures["pipeline"] / plain_rate, 3)
    with_normalize = 1 / (1 / figures["pipeline"] + 1 / figures["normalize_cpu"])
    result["pipeline_and_cpu_normalize_over_plain"] = round(with_normalize / plain_rate, 3)
    result.update(conditions.finish())
    return result
