"""An image folder to a `.lst`, and a `.lst` to a face set in insightface's RecordIO layout (`partial-fc im2rec`).

Two stages, as in MXNet's `tools/im2rec.py`:

- `make_list` (`partial-fc im2rec --list PREFIX ROOT`) lists ROOT with `imagefolder.list_images`, the scan
  `ImageFolderDataset` makes (one sub-folder per identity, classes numbered 0, 1, ... by sorted folder name,
  files sorted by name within a folder, only files with one of `--exts`; `--recursive` also takes images from
  folders nested inside an identity folder). It writes `PREFIX.lst` in MXNet's format,
  `index<TAB>label<TAB>relative/path` with the label printed by `%f` (`3.000000`); indices number the sorted
  listing, then the lines are shuffled (`--no-shuffle` keeps them sorted) with Python's
  `random.Random(--seed).shuffle`, which with the default seed 100 is the order MXNet's
  `im2rec.py --list --recursive` writes for the same folder.
- `pack_list` (`partial-fc im2rec PREFIX ROOT`) reads `PREFIX.lst` (paths relative to ROOT) and writes
  `PREFIX.rec`, `PREFIX.idx` and a `property` file beside them through `FaceSetWriter`: images sorted by label
  (stably, so an identity keeps its `.lst` order) are keys 1..N, then the identity records and the header
  (key 0). The set is written into a staging folder and moved into place when complete, so a failure leaves
  no partial set.
  Images are decoded (`--color`), optionally center-cropped to a square (`--center-crop`) and resized so
  their shorter side is `--resize` pixels (MXNet's rule; with `--center-crop` the result is exactly
  N x N), then encoded (`--encoding`, `--quality`: JPEG quality 1-100, PNG compression 0-9).
  `--pass-through` stores each file's bytes unchanged (they are still decoded once, to refuse broken
  files). `--num-thread` threads decode and encode (OpenCV releases the GIL); records are written in
  list order whatever the thread count. `property` records the first image's height and width.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from partial_fc.data.faceset import FaceSetWriter
from partial_fc.data.imagefolder import IMAGE_EXTENSIONS, ImageTable, list_images
from partial_fc.data.lst import LstEntry, read_lst, write_lst
from partial_fc.errors import InputError
from partial_fc.progress import Progress

_COLOR_FLAGS = {1: cv2.IMREAD_COLOR, 0: cv2.IMREAD_GRAYSCALE, -1: cv2.IMREAD_UNCHANGED}
_BATCH = 32  # images per thread-pool task


def _check_lst_path(root: str, relative: str) -> None:
    """Refuse a path that a `.lst` line cannot hold: a tab or line break in it, or bytes that are not UTF-8."""
    if "\t" in relative or "\n" in relative or "\r" in relative:
        raise InputError(
            f"{os.path.join(root, relative)}: a tab or line break in the path cannot be written to a .lst file"
        )
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{os.fsdecode(os.path.join(root, relative))!r}: the path is not valid UTF-8, which a .lst file needs"
        ) from None


def make_list(
    prefix: str,
    root: str,
    exts: Iterable[str] = IMAGE_EXTENSIONS,
    recursive: bool = False,
    shuffle: bool = True,
    seed: int = 100,
) -> dict:
    """Write PREFIX.lst for the images under ROOT; returns the summary."""
    started = time.monotonic()
    table = list_images(root, exts, recursive).images
    for i in range(len(table)):
        _check_lst_path(root, table.path(i))
    order = array("q", range(len(table)))
    if shuffle:
        random.Random(seed).shuffle(order)  # the same swaps as shuffling MXNet's list of tuples
    lst = f"{prefix}.lst"
    os.makedirs(os.path.dirname(lst) or ".", exist_ok=True)
    lines = write_lst(lst, (LstEntry(i, table.labels[i], table.path(i)) for i in order))
    return {
        "lst": lst,
        "images": lines,
        "identities": table.labels[-1] + 1,
        "seconds": round(time.monotonic() - started, 3),
    }


# ----------------------------------------------------------------------------------------------------------------
# packing


def read_listing(lst: str) -> ImageTable:
    """The entries of a `.lst` with their line numbers; malformed lines are errors naming the file and line."""
    if not os.path.isfile(lst):
        raise InputError(f"{lst}: no such .lst file (write one with `partial-fc im2rec --list PREFIX ROOT`)")
    table = ImageTable()
    with open(lst, "rb") as raw:
        numbers = (number for number, line in enumerate(raw, start=1) if line.strip())  # read_lst skips blank lines
        for entry, number in zip(read_lst(lst), numbers):
            table.append(entry.path, entry.label, number)
    if not len(table):
        raise InputError(f"{lst}: lists no images")
    return table


@dataclass(frozen=True)
class EncodeOptions:
    """How each image becomes a record payload; checked when made (the errors name the im2rec options)."""

    resize: int = 0
    center_crop: bool = False
    quality: int | None = None  # JPEG quality 1-100 or PNG compression 0-9; None: 95 or 3
    encoding: str = ".jpg"
    pass_through: bool = False
    color: int = 1

    def __post_init__(self) -> None:
        png = self.encoding == ".png"
        quality = self.encoding_quality
        if not (0 <= quality <= 9 if png else 1 <= quality <= 100):
            raise InputError(
                f"--quality {quality} is outside {'0-9 (PNG compression)' if png else '1-100 (JPEG quality)'}"
            )
        if self.resize < 0:
            raise InputError(f"--resize {self.resize} is negative")
        if self.pass_through and (self.resize or self.center_crop):
            raise InputError(
                "--pass-through stores files unchanged; it cannot be combined with --resize or --center-crop"
            )

    @property
    def encoding_quality(self) -> int:
        """`quality`, or the encoding's default when it is None."""
        if self.quality is not None:
            return self.quality
        return 3 if self.encoding == ".png" else 95

    def params(self) -> list[int]:
        """OpenCV's encoder parameters."""
        flag = cv2.IMWRITE_PNG_COMPRESSION if self.encoding == ".png" else cv2.IMWRITE_JPEG_QUALITY
        return [int(flag), self.encoding_quality]


def _transform(image: np.ndarray, options: EncodeOptions) -> np.ndarray:
    """Center crop and shorter-side resize, with MXNet im2rec's integer arithmetic."""
    height, width = image.shape[:2]
    if options.center_crop:
        margin = abs(height - width) // 2
        image = image[margin : margin + width] if height > width else image[:, margin : margin + height]
        height, width = image.shape[:2]
    if options.resize:
        size = (
            (options.resize, height * options.resize // width)
            if height > width
            else (width * options.resize // height, options.resize)
        )
        image = cv2.resize(image, size)
    return image


def load_image(root: str, relative: str, lst: str, line: int, options: EncodeOptions) -> tuple[bytes, tuple[int, int]]:
    """The record payload for one `.lst` entry and the stored image's (height, width)."""
    path = os.path.join(root, relative)
    where = f"{lst}, line {line}: {path}"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise InputError(f"{where}: cannot read the image ({error.strerror or error})") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _COLOR_FLAGS[options.color]) if data else None
    if image is None:
        raise InputError(f"{where}: cannot decode the image (empty, truncated or not an image file)")
    if options.pass_through:
        return data, image.shape[:2]
    image = _transform(image, options)
    ok, encoded = cv2.imencode(options.encoding, image, options.params())
    if not ok:
        raise InputError(f"{where}: OpenCV could not encode the image as {options.encoding}")
    return encoded.tobytes(), image.shape[:2]


def _load_batch(root: str, batch: list[tuple[str, int]], lst: str, options: EncodeOptions) -> list:
    """`load_image` for a batch of (path, line) pairs (one thread-pool task)."""
    return [load_image(root, relative, lst, line, options) for relative, line in batch]


def _write_records(
    writer: FaceSetWriter,
    table: ImageTable,
    root: str,
    lst: str,
    options: EncodeOptions,
    num_thread: int,
    bar: Progress,
) -> set[tuple[int, int]]:
    """Load the images on `num_thread` threads and write them sorted by label (stably); returns the image sizes."""
    order = np.argsort(np.frombuffer(table.labels, np.int64), kind="stable")
    sizes: set[tuple[int, int]] = set()
    pending: deque[tuple[np.ndarray, Future]] = deque()

    def write_next() -> None:
        positions, future = pending.popleft()
        for position, (payload, size) in zip(positions, future.result()):
            if not sizes:
                writer.image_size = size
            sizes.add(size)
            writer.write(int(table.labels[position]), payload)
        bar.update(len(positions))

    with ThreadPoolExecutor(num_thread) as pool:
        try:
            for start in range(0, len(order), _BATCH):
                positions = order[start : start + _BATCH]
                batch = [(table.path(p), table.lines[p]) for p in positions]
                pending.append((positions, pool.submit(_load_batch, root, batch, lst, options)))
                if len(pending) >= 4 * num_thread:
                    write_next()
            while pending:
                write_next()
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return sizes


def pack_list(
    prefix: str, root: str, options: EncodeOptions = EncodeOptions(), num_thread: int = 1, progress: bool = True
) -> dict:
    """Write PREFIX.rec/.idx (and `property`) from PREFIX.lst; returns the summary.

    The set is written into a staging folder beside PREFIX and moved into place when complete.
    """
    if num_thread < 1:
        raise InputError(f"--num-thread {num_thread} must be at least 1")
    started = time.monotonic()
    lst = f"{prefix}.lst"
    table = read_listing(lst)
    directory, name = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    staging = os.path.join(directory, f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    bar = Progress(len(table), "im2rec", interval=1.0 if progress else float("inf"))
    try:
        with FaceSetWriter(staging, name=name) as writer:  # closed (and completed) on failure too: staging goes
            sizes = _write_records(writer, table, root, lst, options, num_thread, bar)
        for file in (f"{name}.rec", f"{name}.idx", "property"):
            os.replace(os.path.join(staging, file), os.path.join(directory, file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        bar.close()
    height, width = writer.image_size
    if len(sizes) > 1:
        print(
            f"im2rec: warning: images differ in size ({len(sizes)} sizes); property records the first, "
            f"{height}x{width}",
            file=sys.stderr,
        )
    rec = os.path.join(directory, f"{name}.rec")
    identities = len(np.unique(np.frombuffer(table.labels, np.int64)))
    return {
        "rec": rec,
        "images": len(table),
        "identities": identities,
        "bytes": os.path.getsize(rec),
        "image_size": [height, width],
        "seconds": round(time.monotonic() - started, 3),
    }
