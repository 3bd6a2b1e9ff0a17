"""Every image record's class, read from the record headers alone, before training: fast enough for 17M records.

The framing (magic, length) and the ``IfQQ`` header of each record are gathered from a memory map of the
``.rec``, nine little-endian 32-bit words a record (records start at multiples of 4), and checked vectorised
over chunks of records. A record that does not look plainly right (bad magic, a split record, a label that is
not a class id, ...) is read again through the reader's own checks, whose error names the problem. Records cut
off by a truncated ``.rec`` are set apart: reading them fails, so the loader skips them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from partial_fc.data.bad_records import BadRecord, reason_of
from partial_fc.data.faceset import EXACT_LIMIT, record_label
from partial_fc.data.recordio import MAGIC, RecordIOError, RecordReader, read_header

__all__ = ["LabelScan", "scan_labels"]

_FRAME = 8  # uint32 magic, uint32 cflag << 29 | length
_HEADER = 24  # "IfQQ": flag, label, id, id2
_WORDS = (_FRAME + _HEADER + 4) // 4  # and the first float32 of an array label
_CHUNK = 1 << 16  # records gathered at a time
_LARGEST_LABEL = 1 << 62  # float32 labels past this are no class ids (and would not fit the int64 labels)


class LabelScan(NamedTuple):
    """Labels (int64, -1 where unknown), records whose header is invalid, and records cut off by a truncation."""

    labels: np.ndarray
    invalid: list[BadRecord]
    cut_off: list[BadRecord]


def scan_labels(
    reader: RecordReader, keys: np.ndarray, offsets: np.ndarray, num_classes: int | None = None
) -> LabelScan:
    """The class of each record at ``offsets`` (named by ``keys``), checked like ``record_label`` (in
    ``[0, num_classes)`` when given), without reading the images."""
    keys, offsets = np.asarray(keys, np.int64), np.asarray(offsets, np.int64)
    size = os.path.getsize(reader.path)
    labels = np.full(len(keys), -1, dtype=np.int64)
    invalid: list[BadRecord] = []
    cut_off: list[BadRecord] = []
    words = size // 4
    data = np.memmap(reader.path, dtype="<u4", mode="r", shape=(words,)) if words else np.zeros(0, "<u4")
    for begin in range(0, len(keys), _CHUNK):
        chunk = slice(begin, begin + _CHUNK)
        plain, values, truncated = _fast_labels(data, size, offsets[chunk], num_classes)
        labels[chunk][plain] = values[plain]
        for row in np.flatnonzero(truncated):
            key, offset = int(keys[chunk][row]), int(offsets[chunk][row])
            why = (
                f"offset is past the end of the file ({size} bytes)"
                if offset >= size
                else f"truncated file: the record runs past the end of the file ({size} bytes)"
            )
            cut_off.append(BadRecord(reader.path, key, offset, why))
        for row in np.flatnonzero(~plain & ~truncated):
            key, offset = int(keys[chunk][row]), int(offsets[chunk][row])
            try:
                label = record_label(read_header(reader, offset), path=reader.path, key=key, num_classes=num_classes)
            except RecordIOError as error:
                invalid.append(BadRecord(reader.path, key, offset, reason_of(error)))
                continue
            if label > _LARGEST_LABEL:
                invalid.append(BadRecord(reader.path, key, offset, f"label {label} is too large for a class id"))
            else:
                labels[begin + row] = label
    return LabelScan(labels, invalid, cut_off)


def _fast_labels(
    data: np.ndarray, size: int, offsets: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(plain, labels, truncated)`` for one chunk: ``plain`` marks whole, unsplit records with a valid label."""
    available = size - offsets
    rows = np.minimum(offsets[:, None] // 4 + np.arange(_WORDS), max(len(data) - 1, 0))
    block = data[rows] if len(data) else np.zeros((len(offsets), _WORDS), "<u4")
    magic, lrec, flag = block[:, 0], block[:, 1], block[:, 2].astype(np.int64)
    length = (lrec & ((1 << 29) - 1)).astype(np.int64)
    scalar, first = block[:, 3].view("<f4"), block[:, 8].view("<f4")
    id2 = block[:, 6].astype(np.uint64) | block[:, 7].astype(np.uint64) << np.uint64(32)
    framed = (magic == MAGIC) & (lrec >> 29 == 0)
    truncated = (available < _FRAME) | (framed & (available < _FRAME + length))
    value = np.where(flag > 0, first, scalar).astype(np.float64)
    lossless = (value == -1.0) & (id2 >= EXACT_LIMIT) & (id2 <= _LARGEST_LABEL)
    whole_label = lossless | ((value >= 0) & (value <= _LARGEST_LABEL) & (value == np.floor(value)))
    labels = np.where(lossless, id2.astype(np.int64), np.where(whole_label, value, -1).astype(np.int64))
    in_range = labels < num_classes if num_classes is not None else True
    plain = framed & ~truncated & (length >= _HEADER + 4 * flag) & whole_label & in_range
    return plain, labels, truncated
