"""Unpacking insightface RecordIO face sets (Glint360K, MS1M, ...) to `OUT/id_<label>/<label>_<n>.jpg`.

What insightface's `recognition/partial_fc/unpack_glint360k.py` does (`partial-fc unpack` runs it), without
MXNet, in parallel and resumable:

- Each DIR holds `train.rec` and `train.idx`; sets are read in the order given. An image's class is its record's
  label: a scalar, the first value of an array label (Glint360K), or the lossless large-id form (`record_label`).
  With several sets, each set's labels are offset by the class counts of the sets before it (a count is the
  set's `property` value, else its number of identity records, else its largest label + 1), so identities of
  different sets never share a folder, and a label at or past its own set's count is an error. insightface's
  script wrote every set's labels unchanged, mixing same-numbered identities of two sets in one folder; its
  `dataset_merge.py` renumbers identities across sets instead, which is what the offset amounts to.
- `n` numbers an identity's images from 0: in a set with identity records (insightface's layout) it is the
  image's place in its identity's key range; in a set without them, its rank among its label's images in `.idx`
  order, found by a first pass over the labels. (insightface's script used one running count over all images;
  per-identity numbers do not depend on the order of the work, which parallel, resumable unpacking needs.)
  Image bytes are written as stored, without re-encoding.
- Work is cut into chunks of `--chunk-size` consecutive image records, read by `--workers` processes through
  their own file handles. Each file is written under a temporary name ending in `.part` and then renamed
  (`fileio.atomic_path`), so a file under its final name is complete. Finished chunks are recorded in
  `OUT/.unpack-state.json`; a restart with the same inputs skips them and, in the other chunks, keeps every
  file already present with the right size.
- At the end the output is counted: each `id_<label>` folder must hold exactly `<label>_0.jpg` ..
  `<label>_<c-1>.jpg`, and all folders together one file per image record; leftover `.part` files are removed.
- Memory: each set's index (int64 arrays) and one chunk per worker; no payload is kept and no Python object is
  made per image (a set without identity records adds three int64 arrays for its labels and numbers).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from partial_fc.data.faceset import FaceSetIndex, read_faceset_index, read_property, record_label
from partial_fc.data.recordio import IndexedRecordReader, RecordIOError, unpack
from partial_fc.errors import InputError, PartialFCError
from partial_fc.fileio import atomic_path
from partial_fc.progress import Progress

STATE_NAME = ".unpack-state.json"
_PART = ".part"
_IMAGE_NAME = re.compile(r"(0|[1-9][0-9]*)_(0|[1-9][0-9]*)\.jpg")


@dataclass
class SetPlan:
    """One input set as the workers see it: its reader, its image keys, and where labels and numbers come from."""

    directory: str
    reader: IndexedRecordReader
    image_keys: np.ndarray
    starts: np.ndarray | None  # identity ranges [start, end), sorted by start, when the set has identity records
    ends: np.ndarray | None
    classes: int | None  # class count from `property` or the identity records
    numbers: np.ndarray | None = None  # n of every image, for a set without identity records
    offset: int = 0  # added to the set's labels
    label_bound: int | None = None  # the set's labels must stay below it (when merging)

    def chunks(self, size: int) -> int:
        """Number of chunks of `size` image records."""
        return -(-len(self.image_keys) // size)


class ChunkResult(NamedTuple):
    """What one chunk did."""

    chunk: int
    images: int
    written: int
    kept: int
    bytes: int


def open_set(directory: str) -> SetPlan:
    """Open one set folder; missing files and a bad header are errors naming the file."""
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: no such set folder")
    rec, idx = (os.path.join(directory, f"train{ext}") for ext in (".rec", ".idx"))
    for path in (rec, idx):
        if not os.path.isfile(path):
            raise InputError(f"{path}: missing (a set folder holds train.rec and train.idx)")
    reader = IndexedRecordReader(rec, idx)
    try:
        index = _faceset_index(reader)
        prop = read_property(directory)
    except BaseException:
        reader.close()
        raise
    starts = ends = None
    if index.identity_ranges is not None:
        ranges = index.identity_ranges[np.argsort(index.identity_ranges[:, 0], kind="stable")]
        starts, ends = ranges[:, 0].copy(), ranges[:, 1].copy()
    classes = prop[0] if prop is not None else (len(starts) if starts is not None else None)
    return SetPlan(directory, reader, index.image_keys, starts, ends, classes)


def _faceset_index(reader: IndexedRecordReader) -> FaceSetIndex:
    """`read_faceset_index`, its errors naming the set's file."""
    try:
        return read_faceset_index(reader)
    except RecordIOError as error:
        raise _located(error, reader.path, 0) from None


def _located(error: RecordIOError, path: str, key: int) -> RecordIOError:
    """The error itself when it names its file, else the same message naming `path` and `key`."""
    return error if error.path is not None else RecordIOError(str(error), path=path, key=key)


# ----------------------------------------------------------------------------------------------------------------
# Work done in the worker processes


_WORK: tuple[SetPlan, str, int] | None = None  # this process's (plan, output folder, chunk size)


def _init_worker(plan: SetPlan, output: str, chunk_size: int) -> None:
    """Give this process its work description (the reader opens its own file handle on first read)."""
    global _WORK
    _WORK = (plan, output, chunk_size)


def _read_image(plan: SetPlan, key: int) -> tuple[int, bytes]:
    """The set's own label and the image bytes of one record."""
    path = plan.reader.path
    try:
        header, payload = unpack(plan.reader.read(key))
        label = record_label(header, path=path, key=key)
    except RecordIOError as error:
        raise _located(error, path, key) from None
    if plan.label_bound is not None and label >= plan.label_bound:
        raise RecordIOError(
            f"label {label} is not below the set's {plan.label_bound} classes, so merged sets would share identities",
            path=path,
            key=key,
        )
    if not payload:
        raise RecordIOError("image record holds no image bytes", path=path, key=key)
    return label, payload


def _chunk_keys(plan: SetPlan, chunk: int, size: int) -> tuple[int, np.ndarray]:
    """First position and image keys of one chunk."""
    first = chunk * size
    return first, plan.image_keys[first : first + size]


def _chunk_labels(chunk: int) -> tuple[int, np.ndarray]:
    """Labels of one chunk's images (the first pass over a set without identity records)."""
    assert _WORK is not None
    plan, _, size = _WORK
    _, keys = _chunk_keys(plan, chunk, size)
    return chunk, np.fromiter((_read_image(plan, key)[0] for key in keys.tolist()), np.int64, len(keys))


def _chunk_numbers(plan: SetPlan, first: int, keys: np.ndarray) -> np.ndarray:
    """n of each image of a chunk: from the label pass, or its place in its identity's key range."""
    if plan.numbers is not None:
        return plan.numbers[first : first + len(keys)]
    assert plan.starts is not None and plan.ends is not None
    at = np.searchsorted(plan.starts, keys, side="right") - 1
    inside = (at >= 0) & (keys < plan.ends[np.maximum(at, 0)])
    if not inside.all():
        raise RecordIOError(
            "image key lies in no identity range of the header", path=plan.reader.path, key=int(keys[~inside][0])
        )
    return keys - plan.starts[at]


def _write_atomically(target: str, payload: bytes) -> None:
    """Write `target` under a temporary name, then rename it into place."""
    with atomic_path(target, suffix=_PART) as part, open(part, "wb") as file:
        file.write(payload)


def _unpack_chunk(chunk: int) -> ChunkResult:
    """Write one chunk's images, keeping files already complete."""
    assert _WORK is not None
    plan, output, size = _WORK
    first, keys = _chunk_keys(plan, chunk, size)
    written = kept = nbytes = 0
    made = None
    for key, number in zip(keys.tolist(), _chunk_numbers(plan, first, keys).tolist()):
        label, payload = _read_image(plan, key)
        label += plan.offset
        folder = os.path.join(output, f"id_{label}")
        target = os.path.join(folder, f"{label}_{number}.jpg")
        try:
            if os.stat(target).st_size == len(payload):
                kept += 1
                continue
        except FileNotFoundError:
            pass
        if made != label:
            os.makedirs(folder, exist_ok=True)
            made = label
        _write_atomically(target, payload)
        written += 1
        nbytes += len(payload)
    return ChunkResult(chunk, len(keys), written, kept, nbytes)


def _map(function: Callable, chunks: list[int], plan: SetPlan, output: str, chunk_size: int, workers: int) -> Iterator:
    """`function` over `chunks` in worker processes (in this one when `workers` is 1), results as they finish."""
    global _WORK
    if workers == 1 or len(chunks) <= 1:
        _init_worker(plan, output, chunk_size)
        try:
            yield from map(function, chunks)
        finally:
            _WORK = None
        return
    # fork shares the index arrays with the workers instead of copying them into each
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(min(workers, len(chunks)), _init_worker, (plan, output, chunk_size)) as pool:
        yield from pool.imap_unordered(function, chunks)


# ----------------------------------------------------------------------------------------------------------------
# The run


class _State:
    """Finished chunks per set, kept in OUT/.unpack-state.json for a restart with the same inputs."""

    def __init__(self, output: str, fingerprint: dict) -> None:
        self.path = os.path.join(output, STATE_NAME)
        self.fingerprint = fingerprint
        self.done: list[set[int]] = [set() for _ in fingerprint["sets"]]
        self._saved = time.monotonic()
        try:
            with open(self.path, encoding="utf-8") as file:
                stored = json.load(file)
            if stored.get("fingerprint") == fingerprint:
                self.done = [set(chunks) for chunks in stored["done"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable state: every chunk is redone, keeping the complete files it finds

    def mark(self, set_index: int, chunk: int) -> None:
        """Record a finished chunk (saved at most every second, and by `save`)."""
        self.done[set_index].add(chunk)
        if time.monotonic() - self._saved >= 1.0:
            self.save()

    def save(self) -> None:
        """Write the state atomically."""
        data = {"fingerprint": self.fingerprint, "done": [sorted(chunks) for chunks in self.done]}
        with atomic_path(self.path) as part, open(part, "w", encoding="utf-8") as file:
            json.dump(data, file)
        self._saved = time.monotonic()


def _fingerprint(plans: list[SetPlan], chunk_size: int) -> dict:
    """What the state is valid for: the input files (path, size, time), their class counts, the chunk size."""
    sets = []
    for plan in plans:
        rec, idx = os.stat(plan.reader.path), os.stat(plan.reader.idx_path)
        sets.append(
            {
                "rec": os.path.abspath(plan.reader.path),
                "rec_bytes": rec.st_size,
                "rec_mtime_ns": rec.st_mtime_ns,
                "idx_bytes": idx.st_size,
                "idx_mtime_ns": idx.st_mtime_ns,
                "images": len(plan.image_keys),
                "classes": plan.classes,
            }
        )
    return {"version": 1, "chunk_size": chunk_size, "sets": sets}


def numbers_from_labels(labels: np.ndarray) -> np.ndarray:
    """Each image's rank among the images of its label, in the given order."""
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    positions = np.arange(len(labels))
    group_first = np.maximum.accumulate(np.where(np.r_[True, ranked[1:] != ranked[:-1]], positions, 0))
    numbers = np.empty(len(labels), np.int64)
    numbers[order] = positions - group_first
    return numbers


def _label_pass(plan: SetPlan, output: str, chunk_size: int, workers: int, progress: bool) -> np.ndarray:
    """The labels of every image of a set without identity records."""
    labels = np.empty(len(plan.image_keys), np.int64)
    bar = Progress(len(labels), f"unpack: labels of {plan.directory}", interval=1.0 if progress else float("inf"))
    for chunk, values in _map(_chunk_labels, list(range(plan.chunks(chunk_size))), plan, output, chunk_size, workers):
        labels[chunk * chunk_size : chunk * chunk_size + len(values)] = values
        bar.update(len(values))
    if progress:
        bar.close()
    return labels


def verify_output(output: str, expected: int) -> tuple[int, int]:
    """Count the unpacked images and identities; remove stray `.part` files; gaps or a wrong total are errors."""
    images = identities = 0
    problems: list[str] = []
    for entry in os.scandir(output):
        if not (entry.is_dir() and entry.name.startswith("id_")):
            continue
        count, largest = 0, -1
        for file in os.scandir(entry.path):
            match = _IMAGE_NAME.fullmatch(file.name)
            if file.name.endswith(_PART):
                os.remove(file.path)
            elif match and f"id_{match.group(1)}" == entry.name:
                count, largest = count + 1, max(largest, int(match.group(2)))
            else:
                problems.append(f"unexpected {file.path}")
        if count != largest + 1:
            problems.append(f"{entry.path} holds {count} images but numbers them up to {largest}")
        images, identities = images + count, identities + (count > 0)
    if images != expected or problems:
        detail = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise PartialFCError(
            f"{output}: {images} images unpacked for {expected} image records" + (f"; {detail}" if detail else "")
        )
    return images, identities


def unpack_sets(
    directories: Iterable[str], output: str, workers: int = 1, chunk_size: int = 2048, progress: bool = True
) -> dict:
    """Unpack the sets into `output` (resuming an earlier run there) and check the result; returns the summary."""
    directories = list(directories)
    if not directories:
        raise InputError("--include names no set folder")
    if workers < 1 or chunk_size < 1:
        raise InputError(f"--workers {workers} and --chunk-size {chunk_size} must be at least 1")
    started = time.monotonic()
    plans: list[SetPlan] = []
    try:
        for directory in directories:
            plans.append(open_set(directory))
        os.makedirs(output, exist_ok=True)
        state = _State(output, _fingerprint(plans, chunk_size))
        try:
            totals = _unpack_plans(plans, output, state, workers, chunk_size, progress)
        finally:
            state.save()
    finally:
        for plan in plans:
            plan.reader.close()
    images, identities = verify_output(output, sum(len(plan.image_keys) for plan in plans))
    return {
        "output": output,
        "sets": len(plans),
        "images": images,
        "identities": identities,
        **totals,
        "seconds": round(time.monotonic() - started, 3),
    }


def _unpack_plans(
    plans: list[SetPlan], output: str, state: _State, workers: int, chunk_size: int, progress: bool
) -> dict:
    """Unpack every chunk the state does not record as finished, set after set; returns the counts."""
    pending = [[c for c in range(plan.chunks(chunk_size)) if c not in state.done[i]] for i, plan in enumerate(plans)]
    todo = sum(len(_chunk_keys(plan, c, chunk_size)[1]) for plan, chunks in zip(plans, pending) for c in chunks)
    bar = Progress(todo, "unpack", interval=1.0 if progress else float("inf"))
    totals = {"written": 0, "kept": 0, "bytes": 0, "resumed_chunks": sum(len(done) for done in state.done)}
    offset, merging = 0, len(plans) > 1
    for i, plan in enumerate(plans):
        plan.offset = offset
        plan.label_bound = plan.classes if merging else None
        if plan.starts is None and (pending[i] or (plan.classes is None and i + 1 < len(plans))):
            labels = _label_pass(plan, output, chunk_size, workers, progress)
            plan.numbers = numbers_from_labels(labels)
            if plan.classes is None:
                plan.classes = int(labels.max()) + 1 if len(labels) else 0
        for result in _map(_unpack_chunk, pending[i], plan, output, chunk_size, workers):
            state.mark(i, result.chunk)
            totals["written"] += result.written
            totals["kept"] += result.kept
            totals["bytes"] += result.bytes
            bar.update(result.images)
        offset += plan.classes or 0
    if progress:
        bar.close()
    return totals
