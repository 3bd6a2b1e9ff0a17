"""Aligning a folder of images by a landmark list (``partial-fc align``): the same relative paths, ArcFace crops."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from multiprocessing import get_context

import cv2
import numpy as np

from partial_fc.data.align import destination_points, norm_crop
from partial_fc.data.landmark_file import LandmarkEntry, read_landmark_file
from partial_fc.errors import InputError, MissingInputError, PartialFCError
from partial_fc.fileio import atomic_path, os_error_cause
from partial_fc.progress import Progress

_JPEG, _PNG = (".jpg", ".jpeg"), (".png",)
_MAX_CHUNK = 16  # images per worker task


def _encoder_params(ext: str, quality: int, where: str) -> list[int]:
    """OpenCV's encoder parameters for the output file's extension (JPEG or PNG)."""
    if ext in _JPEG:
        return [int(cv2.IMWRITE_JPEG_QUALITY), quality]
    if ext in _PNG:
        return [int(cv2.IMWRITE_PNG_COMPRESSION), 3]
    raise InputError(f"{where}: the output is written as JPEG or PNG by its extension; {ext or 'none'} is neither")


def align_file(entry: LandmarkEntry, root: str, out: str, where: str, size: int, quality: int) -> None:
    """Read, align and atomically write one image; an InputError names the landmark file, line and image."""
    source = os.path.join(root, entry.path)
    prefix = f"{where}, line {entry.line}: {source}"
    ext = os.path.splitext(entry.path)[1].lower()
    params = _encoder_params(ext, quality, prefix)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as error:
        raise InputError(f"{prefix}: cannot read the image ({error.strerror or error})") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise InputError(f"{prefix}: cannot decode the image (empty, truncated or not an image file)")
    try:
        crop = norm_crop(image, entry.landmarks, size)
    except InputError as error:
        raise InputError(f"{prefix}: {error}") from None
    ok, encoded = cv2.imencode(ext, crop, params)
    if not ok:
        raise InputError(f"{prefix}: OpenCV could not encode the aligned image")
    target = os.path.join(out, entry.path)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as file:
            file.write(encoded.tobytes())
    except OSError as error:  # not the input's fault: stops the job even with --skip-bad
        raise PartialFCError(f"{target}: cannot write the aligned image ({os_error_cause(error)})") from None


def _align_chunk(job: tuple[list[LandmarkEntry], str, str, str, int, int]) -> list[str | None]:
    """`align_file` for a chunk of entries (one worker task): None for each image written, else the error."""
    entries, root, out, where, size, quality = job
    errors: list[str | None] = []
    for entry in entries:
        try:
            align_file(entry, root, out, where, size, quality)
            errors.append(None)
        except InputError as error:
            errors.append(str(error))
    return errors


def align_folder(
    root: str,
    landmark_file: str,
    out: str,
    size: int = 112,
    workers: int = 1,
    skip_bad: bool = False,
    quality: int = 95,
    progress: bool = True,
) -> dict:
    """Align every image the landmark list names into `out` (same relative paths); returns the summary.

    A missing or undecodable image or a malformed line raises an InputError naming the file and line, or with
    `skip_bad` is counted and listed in the summary's `bad`.
    """
    started = time.monotonic()
    destination_points(size)  # checks the size
    if workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    if not 1 <= quality <= 100:
        raise InputError(f"--quality {quality} is outside 1-100 (JPEG quality)")
    if not os.path.isdir(root):
        raise MissingInputError(f"{root}: no such image folder")
    if os.path.realpath(out) == os.path.realpath(root):
        raise InputError(f"{out}: the output folder must not be the image folder (the images would be overwritten)")
    entries, bad = read_landmark_file(landmark_file, skip_bad)
    chunk = max(1, min(_MAX_CHUNK, len(entries) // (4 * workers)))
    jobs = [
        (entries[start : start + chunk], root, out, os.fspath(landmark_file), size, quality)
        for start in range(0, len(entries), chunk)
    ]
    bar = Progress(len(entries), "align", interval=1.0 if progress else float("inf"))
    written = 0
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise InputError(f"{out}: cannot make the output folder ({os_error_cause(error)})") from None
    with _chunk_results(jobs, workers) as results:
        for errors in results:
            for error in errors:
                if error is None:
                    written += 1
                elif skip_bad:
                    bad.append(error)
                else:
                    raise InputError(error)
            bar.update(len(errors))
    if progress:
        bar.close()
    return {
        "out": out,
        "images": written,
        "bad": len(bad),
        "bad_lines": bad,
        "size": size,
        "seconds": round(time.monotonic() - started, 3),
    }


@contextlib.contextmanager
def _chunk_results(jobs: list, workers: int) -> Iterator[Iterator[list[str | None]]]:
    """`_align_chunk` over the jobs, in order: in this process for one worker, else in a pool ended on exit."""
    if workers == 1 or len(jobs) <= 1:
        yield map(_align_chunk, jobs)
        return
    with get_context("fork").Pool(min(workers, len(jobs))) as pool:
        yield pool.imap(_align_chunk, jobs)
