"""``partial-fc check-data``'s logic: every record of a face set checked (framing, header, label, image), in parallel.

A RecordIO set is checked range of records by range of records in worker processes: each record is read through
the reader's own checks (magic numbers, part framing, truncation); an image record's label must be a class id
below num_classes (from ``property``, else the set's header record) and its image must decode. The insightface
header (key 0) and identity records are checked for framing only; when the header itself is broken, that is
reported and a record counts as an image unless it looks like an identity record (flag >= 2, no payload). An image
folder is checked file by file the same way. Every bad record is listed; nothing stops at the first.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from partial_fc.data.bad_records import BadRecord, reason_of
from partial_fc.data.datasets import ImageFolderDataset
from partial_fc.data.decode import DecodeError, decode_rgb
from partial_fc.data.faceset import read_faceset_index, read_property, record_label
from partial_fc.data.recordio import IndexedRecordReader, RecordIOError, RecordReader, unpack
from partial_fc.errors import MissingInputError
from partial_fc.fileio import PathLike

__all__ = ["CheckReport", "check_data", "check_image_folder", "check_record_set"]

Progress = Callable[[int], None]
_IMAGE, _OTHER, _GUESS = 0, 1, 2  # what a record is: an image, a header/identity record, not known
_CHUNKS_PER_WORKER = 8


@dataclass
class CheckReport:
    """What a check found: the set, how many records were checked, the bad ones (in file order), the seconds taken."""

    source: str
    records: int
    bad: list[BadRecord] = field(default_factory=list)
    seconds: float = 0.0


def check_data(path: PathLike, workers: int = 1, progress: Progress | None = None) -> CheckReport:
    """Check the set at ``path``: a folder holding ``train.rec``/``.idx``, a ``.rec`` file (its ``.idx`` beside it),
    or an image folder (``<identity>/*.jpg``); ``progress`` is told how many records each finished range held."""
    root = Path(path)
    if root.is_file() and root.suffix == ".rec":
        return check_record_set(root, root.with_suffix(".idx"), workers, progress)
    if (root / "train.rec").is_file():
        return check_record_set(root / "train.rec", root / "train.idx", workers, progress)
    if root.is_dir() and not (root / "train.idx").exists():
        return check_image_folder(root, workers, progress)
    raise MissingInputError(f"{root}: no train.rec (with train.idx), not a .rec file and not an image folder")


def check_record_set(rec: PathLike, idx: PathLike, workers: int = 1, progress: Progress | None = None) -> CheckReport:
    """Check every record the ``.idx`` lists; an index or header that cannot be read is itself a bad record."""
    started = time.perf_counter()
    try:
        reader = IndexedRecordReader(rec, idx, past_end_ok=True)
    except RecordIOError as error:
        where = f"line {error.line}: " if error.line is not None else ""
        return CheckReport(
            str(rec),
            0,
            [BadRecord(str(error.path or idx), error.key, error.offset, where + reason_of(error))],
            time.perf_counter() - started,
        )
    bad: list[BadRecord] = []
    kinds, num_classes = _record_kinds(reader, bad)
    offsets = reader.offsets_of(reader.key_array)
    order = np.argsort(offsets, kind="stable")  # file order
    keys = reader.key_array[order]
    plan = _RecordPlan(reader, keys, offsets[order], kinds[order], num_classes)
    known = {(record.file, record.key) for record in bad}
    bad += [record for record in _run(plan, len(keys), workers, progress) if (record.file, record.key) not in known]
    return CheckReport(str(rec), len(keys), bad, time.perf_counter() - started)


def check_image_folder(root: PathLike, workers: int = 1, progress: Progress | None = None) -> CheckReport:
    """Check that every image of an image folder (one sub-folder per identity) can be read and decoded."""
    started = time.perf_counter()
    dataset = ImageFolderDataset(root, image_size=None, flip=False)
    plan = _FolderPlan([str(dataset.path(index)) for index in range(len(dataset))])
    bad = _run(plan, len(dataset), workers, progress)
    return CheckReport(str(root), len(dataset), bad, time.perf_counter() - started)


def _record_kinds(reader: IndexedRecordReader, bad: list[BadRecord]) -> tuple[np.ndarray, int | None]:
    """What each key (in ``.idx`` order) is, and num_classes; a broken header or ``property`` is added to ``bad``."""
    kinds = np.full(len(reader), _GUESS, dtype=np.int8)
    num_classes = None
    try:
        prop = read_property(Path(reader.path).parent)
        num_classes = prop[0] if prop is not None else None
    except RecordIOError as error:
        bad.append(BadRecord(str(error.path), None, None, reason_of(error)))
    try:
        index = read_faceset_index(reader)
    except RecordIOError as error:
        bad.append(BadRecord(str(error.path or reader.path), error.key, error.offset, reason_of(error)))
        return kinds, num_classes
    kinds[:] = _OTHER
    kinds[np.isin(reader.key_array, index.image_keys)] = _IMAGE
    return kinds, num_classes if num_classes is not None else index.num_identities


@dataclass
class _RecordPlan:
    """The records to check, in file order, and what each one is."""

    reader: RecordReader
    keys: np.ndarray
    offsets: np.ndarray
    kinds: np.ndarray
    num_classes: int | None

    def check(self, start: int, stop: int) -> list[BadRecord]:
        """The bad records among rows ``[start, stop)``."""
        found = []
        for row in range(start, stop):
            key, offset = int(self.keys[row]), int(self.offsets[row])
            try:
                header, payload = unpack(self.reader.read_at(offset))
                kind = int(self.kinds[row])
                if kind == _IMAGE or (kind == _GUESS and (header.flag < 2 or payload)):
                    record_label(header, path=self.reader.path, key=key, num_classes=self.num_classes)
                    decode_rgb(payload)
            except (RecordIOError, DecodeError) as error:
                found.append(BadRecord(self.reader.path, key, offset, reason_of(error)))
        return found


@dataclass
class _FolderPlan:
    """The image files to check."""

    paths: list[str]

    def check(self, start: int, stop: int) -> list[BadRecord]:
        """The unreadable or undecodable files among ``paths[start:stop]``."""
        found = []
        for path in self.paths[start:stop]:
            try:
                decode_rgb(Path(path).read_bytes())
            except (OSError, DecodeError) as error:
                found.append(BadRecord(path, None, None, reason_of(error)))
        return found


_PLAN: _RecordPlan | _FolderPlan | None = None  # a worker process's plan


def _adopt(plan: _RecordPlan | _FolderPlan) -> None:
    """Pool initializer: the plan this worker checks ranges of."""
    global _PLAN
    _PLAN = plan


def _check_range(bounds: tuple[int, int]) -> tuple[int, list[BadRecord]]:
    """In a worker: ``(rows, bad records)`` of one range."""
    assert _PLAN is not None
    return bounds[1] - bounds[0], _PLAN.check(*bounds)


def _run(plan: _RecordPlan | _FolderPlan, count: int, workers: int, progress: Progress | None) -> list[BadRecord]:
    """``plan.check`` over ranges of ``count`` rows in ``workers`` processes; the bad records in row order."""
    size = max(1, min(4096, -(-count // (workers * _CHUNKS_PER_WORKER))))
    ranges = [(start, min(start + size, count)) for start in range(0, count, size)]
    bad: list[BadRecord] = []
    for done, found in _results(plan, ranges, workers):
        bad += found
        if progress is not None:
            progress(done)
    return bad


def _results(
    plan: _RecordPlan | _FolderPlan, ranges: list[tuple[int, int]], workers: int
) -> Iterator[tuple[int, list[BadRecord]]]:
    """``(rows, bad records)`` of each range, in order: in this process for one worker, else in a pool."""
    if workers == 1 or len(ranges) <= 1:
        for start, stop in ranges:
            yield stop - start, plan.check(start, stop)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()  # workers share the plan without pickling it
    context = multiprocessing.get_context("fork" if fork else None)
    with context.Pool(min(workers, len(ranges)), initializer=_adopt, initargs=(plan,)) as pool:
        yield from pool.imap(_check_range, ranges)
