"""Image features of an IJB release: each loose crop aligned by its 5 points, embedded with its flip, on all ranks.

The images are cut into global batches of ``batch_size`` in list order and each rank embeds a contiguous run of
whole batches, so every image is embedded in the same batch on any number of ranks and the gathered features
equal one rank's. Images are decoded batch by batch; only the features stay in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from partial_fc.comm import Communicator
from partial_fc.comm.agreement import agree
from partial_fc.data.align import norm_crop
from partial_fc.data.decode import decode_rgb, normalize_images
from partial_fc.errors import InputError, MissingInputError
from partial_fc.eval.ijb_meta import ImageList
from partial_fc.fileio import atomic_path

Embedder = Callable[[torch.Tensor], np.ndarray]
"""Normalised images [B, 3, 112, 112] float32 -> embeddings [B, D] float32."""


def aligned_image(folder: Path, images: ImageList, index: int) -> np.ndarray:
    """Image ``index`` decoded (RGB) and aligned into 112x112 uint8; a missing or broken file names it."""
    path = folder / images.names[index]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such image (line {index + 1} of {images.source})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    return norm_crop(decode_rgb(data, str(path)), images.landmarks[index])


def aligned_batches(folder: Path, images: ImageList, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
    """Images ``start:stop`` aligned, as uint8 batches [B, 112, 112, 3] of ``batch_size`` (the last may be short)."""
    for first in range(start, stop, batch_size):
        yield np.stack([aligned_image(folder, images, i) for i in range(first, min(first + batch_size, stop))])


def embed_with_flip(embed: Embedder, batch: np.ndarray, device: torch.device) -> np.ndarray:
    """Embedding plus horizontal-flip embedding [B, D] float32 of an aligned uint8 batch, in one forward pass."""
    both = np.concatenate([batch, batch[:, :, ::-1]])
    out = embed(normalize_images(torch.from_numpy(both).to(device)).contiguous())
    return (out[: batch.shape[0]] + out[batch.shape[0] :]).astype(np.float32)


def rank_share(count: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` image range of ``rank``: a contiguous run of whole global batches."""
    batches = -(-count // batch_size)
    lo, hi = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(lo * batch_size, count), min(hi * batch_size, count)


def image_features(
    embed: Embedder,
    folder: Path,
    images: ImageList,
    comm: Communicator,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """[N, D] float32 embedding + flip embedding of every image, this rank's share embedded here and gathered."""
    start, stop = rank_share(len(images.names), batch_size, comm.rank, comm.world_size)
    chunks, error = [], None
    try:
        for batch in aligned_batches(folder, images, start, stop, batch_size):
            chunks.append(embed_with_flip(embed, batch, device))
            if progress is not None:
                progress(sum(c.shape[0] for c in chunks), stop - start)
    except InputError as failure:
        error = failure
    agree(comm, error)
    local = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    dim = torch.tensor([local.shape[1]], dtype=torch.int64, device=comm.device)
    dims = comm.all_gather(dim, sizes=[1] * comm.world_size).tolist()
    width = max(dims)
    if local.shape[0] == 0:
        local = np.zeros((0, width), dtype=np.float32)
    sizes = comm.gather_sizes(local.shape[0])
    gathered = comm.all_gather(torch.from_numpy(local).to(comm.device), sizes=sizes)
    return gathered.cpu().numpy()


def names_file(features_file: Path) -> Path:
    """The image list saved beside a features ``.npy``: ``<stem>_images.txt``, one name per row."""
    return features_file.with_name(f"{features_file.stem}_images.txt")


def save_features(path: Path, features: np.ndarray, images: ImageList) -> None:
    """``features`` as ``.npy`` and the image order beside it (see :func:`names_file`), both written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features)
    with atomic_path(names_file(path)) as tmp:
        Path(tmp).write_text("".join(f"{name}\n" for name in images.names))


def load_features(path: Path, images: ImageList) -> np.ndarray:
    """Features saved by :func:`save_features`, checked to be of exactly the images of ``images``, in order."""
    order = names_file(path)
    for needed in (path, order):
        if not needed.is_file():
            raise MissingInputError(f"{needed}: no such file (--features needs the .npy and its image list)")
    try:
        features = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputError(f"{path}: not a .npy array ({error})") from None
    names = order.read_text().splitlines()
    if features.ndim != 2 or features.shape[0] != len(names):
        raise InputError(f"{path}: shape {features.shape} does not match the {len(names)} images of {order}")
    if names != images.names:
        line = next(
            (i for i, (a, b) in enumerate(zip(names, images.names)) if a != b), min(len(names), len(images.names))
        )
        raise InputError(f"{order}:{line + 1}: the saved image order differs from {images.source} there")
    return features.astype(np.float32, copy=False)
