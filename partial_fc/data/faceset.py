"""insightface's face-set layout inside an indexed RecordIO file (MS1M, Glint360K, WebFace), read and written.

Images are keys 1..N; then one identity record per class (flag 2, label [first key, end key), no payload);
key 0, written last, is the header (flag 2, label [N + 1, N + K + 1)). A `property` file beside the set holds
`num_classes,height,width`. A set whose key 0 is missing or is an ordinary image is read by its `.idx` keys.

float32 labels hold integers exactly only up to 2**24. Where a class id or a key is larger, this writer keeps
it losslessly in the header's integer fields: an image's label becomes -1 and its class goes to `id2`; a
range's label becomes [-1, -1] and its ends go to `id` and `id2`. The reader understands both forms, and
for sets written elsewhere it finds the image/identity boundary by looking at the records when the header's
float32 label is past 2**24 (Glint360K has 17M images, so its header cannot say exactly where images end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partial_fc.data.recordio import (
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    RecordReader,
    pack,
    scan_offsets,
    unpack,
    write_index,
)

EXACT_LIMIT = 1 << 24
_MARK = -1.0
_RANGE_FLAG = 2


def image_header(label: int, index: int = 0) -> IRHeader:
    """The header of an image record of class `label` (lossless above 2**24, see the module docstring)."""
    if label < EXACT_LIMIT:
        return IRHeader(0, float(label), index, 0)
    return IRHeader(0, _MARK, index, label)


def _range_header(start: int, end: int) -> IRHeader:
    if end < EXACT_LIMIT:
        return IRHeader(_RANGE_FLAG, [float(start), float(end)], 0, 0)
    return IRHeader(_RANGE_FLAG, [_MARK, _MARK], start, end)


def record_label(header: IRHeader, *, path: str, key: int, num_classes: int | None = None) -> int:
    """The class id of an image record: its scalar label, the first of an array label, or the lossless form;
    refused (naming file and key) when not a non-negative integer, or outside ``[0, num_classes)`` when given."""
    if header.flag > 0:
        labels = np.asarray(header.label)
        if labels.size == 0:
            raise RecordIOError("image record has an empty label array", path=path, key=key)
        value = float(labels[0])
    else:
        value = float(header.label)
    if value == _MARK and header.id2 >= EXACT_LIMIT:
        label = int(header.id2)
    elif not value.is_integer() or value < 0:
        raise RecordIOError(f"label {value:g} is not a class id (a non-negative integer)", path=path, key=key)
    else:
        label = int(value)
    if num_classes is not None and label >= num_classes:
        raise RecordIOError(f"label {label} is outside [0, num_classes={num_classes})", path=path, key=key)
    return label


def _range_of(header: IRHeader, *, path: str, key: int) -> tuple[int, int]:
    labels = np.asarray(header.label, dtype=np.float64).ravel()
    if header.flag < 2 or labels.size < 2:
        raise RecordIOError("expected a range record (flag 2, label [start, end))", path=path, key=key)
    if labels[0] == _MARK and labels[1] == _MARK:
        return int(header.id), int(header.id2)
    return int(labels[0]), int(labels[1])


def _is_range_record(reader: IndexedRecordReader, key: int) -> bool:
    header, payload = unpack(reader.read(key))
    return header.flag >= _RANGE_FLAG and not payload


@dataclass(frozen=True)
class FaceSetIndex:
    """Which keys of a set are images (in order), and its identity ranges when the set has them."""

    image_keys: np.ndarray
    identity_ranges: np.ndarray | None

    @property
    def num_identities(self) -> int | None:
        return None if self.identity_ranges is None else len(self.identity_ranges)


def read_faceset_index(reader: IndexedRecordReader) -> FaceSetIndex:
    """Read the header (key 0) if there is one; otherwise every key of the `.idx`, in its order, is an image."""
    keys = reader.key_array
    if 0 not in reader:
        return FaceSetIndex(keys.copy(), None)
    header, payload = unpack(reader.read(0))
    if header.flag < _RANGE_FLAG or payload:  # key 0 is an image (im2rec --pack-label writes array labels too)
        return FaceSetIndex(keys.copy(), None)
    first_range, end_range = _range_of(header, path=reader.path, key=0)
    if first_range >= EXACT_LIMIT and header.id == 0:
        first_range = _boundary_near(reader, first_range)
    image_keys = np.sort(keys[(keys >= 1) & (keys < first_range)])
    expected = first_range - 1
    if len(image_keys) != expected:
        raise RecordIOError(
            f"header says images are keys 1..{first_range - 1}, but the index has {len(image_keys)} of them",
            path=reader.idx_path,
            key=0,
        )
    ranges = []
    for key in range(first_range, end_range):
        if key not in reader:
            raise RecordIOError("identity record listed by the header is missing", path=reader.idx_path, key=key)
        ranges.append(_range_of(unpack(reader.read(key))[0], path=reader.path, key=key))
    return FaceSetIndex(image_keys, np.asarray(ranges, dtype=np.int64).reshape(-1, 2))


def _boundary_near(reader: IndexedRecordReader, approximate: int) -> int:
    """The first identity-record key near a float32-rounded boundary (within the rounding of float32)."""
    spread = max(1, approximate >> 23)
    for key in range(max(1, approximate - spread), approximate + spread + 1):
        if key in reader and _is_range_record(reader, key):
            return key
    raise RecordIOError(f"no identity record found near key {approximate} named by the header", path=reader.path, key=0)


def rebuild_faceset_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Rebuild a lost `.idx`: keys 1..N-1 then 0 when the last record is a face-set header, else 0..N-1."""
    offsets = scan_offsets(rec_path)
    keys = np.arange(len(offsets), dtype=np.int64)
    if len(offsets) and _is_trailing_header(
        RecordReader(rec_path).read_at(int(offsets[-1])), len(offsets), str(rec_path)
    ):
        keys += 1
        keys[-1] = 0
    write_index(idx_path, keys, offsets)
    return len(offsets)


def _is_trailing_header(record: bytes, records: int, path: str) -> bool:
    """Whether the file's last record is the face-set header written last, naming exactly `records` keys."""
    try:
        header, payload = unpack(record)
        return header.flag >= _RANGE_FLAG and not payload and _range_of(header, path=path, key=0)[1] == records
    except RecordIOError:
        return False


def read_property(directory: str | os.PathLike) -> tuple[int, int, int] | None:
    """(num_classes, height, width) from the set's `property` file, or None when there is none."""
    path = Path(directory) / "property"
    if not path.exists():
        return None
    fields = path.read_text().strip().split(",")
    try:
        num_classes, height, width = (int(field) for field in fields)
    except ValueError:
        raise RecordIOError(
            f"expected 'num_classes,height,width', got {path.read_text().strip()!r}", path=str(path)
        ) from None
    return num_classes, height, width


class FaceSetWriter:
    """Writes a face set in insightface's layout: `write(label, image_bytes)` per image, grouped by identity.

    Images of one identity must be written together (the identity records name contiguous key ranges);
    closing writes the identity records, the header (key 0) and the `property` file.
    """

    def __init__(self, directory: str | os.PathLike, image_size: tuple[int, int] = (112, 112), name: str = "train"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.image_size = image_size
        self._writer = IndexedRecordWriter(self.directory / f"{name}.rec", self.directory / f"{name}.idx")
        self._ranges: list[tuple[int, int, int]] = []  # (label, first key, end key)
        self._next_key = 1
        self._seen: set[int] = set()

    def write(self, label: int, image: bytes) -> int:
        """Append one encoded image of class `label`; returns its key."""
        if label < 0:
            raise RecordIOError(f"label {label} is negative", path=str(self._writer.path), key=self._next_key)
        if not self._ranges or self._ranges[-1][0] != label:
            if label in self._seen:
                raise RecordIOError(
                    f"images of label {label} are not contiguous: identity {label} was already closed",
                    path=str(self._writer.path),
                    key=self._next_key,
                )
            self._seen.add(label)
            self._ranges.append((label, self._next_key, self._next_key))
        key = self._next_key
        self._writer.write(key, pack(image_header(label, key), image))
        label_, first, _ = self._ranges[-1]
        self._ranges[-1] = (label_, first, key + 1)
        self._next_key += 1
        return key

    def close(self) -> None:
        """Write the identity records, the header and `property`, and close the files."""
        first_range = self._next_key
        for offset, (_, first, end) in enumerate(self._ranges):
            self._writer.write(first_range + offset, pack(_range_header(first, end), b""))
        self._writer.write(0, pack(_range_header(first_range, first_range + len(self._ranges)), b""))
        self._writer.close()
        num_classes = max((label for label, _, _ in self._ranges), default=-1) + 1
        height, width = self.image_size
        (self.directory / "property").write_text(f"{num_classes},{height},{width}\n")

    def __enter__(self) -> FaceSetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
