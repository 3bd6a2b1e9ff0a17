"""Training and verification datasets: RecordIO face sets, image folders, pair lists, random in-memory faces.

Training datasets return ``(image uint8 RGB [H, W, 3], label int64 scalar tensor)`` and are safe in forked
DataLoader workers (files are opened lazily in each process; index arrays are numpy, so forked workers share
them without copy-on-write growth). A batch that comes as a ``SeededBatch`` (from ``EpochBatchSampler``) draws
each sample's flip from the sample's global position in the epoch, so flips are the same on any number of
ranks and workers; single items draw from a per-process generator seeded from torch's initial seed (which
DataLoader sets per worker).

A batch of a fixed image size is decoded straight into one batch tensor (in shared memory inside a worker, as
DataLoader's own collate does) and comes back as ``StackedSamples``: still a list of ``(image, label)`` views,
so any collate function works, but ``loader.collate`` hands the batch tensors on without stacking a copy.
Verification sets (pair lists) come normalised, float32 [N, 3, H, W], as ``binfile.load_bin`` gives them.

A batch of a fixed image size skips records that cannot be used (bad framing, a truncated payload, bytes that
are no image, an unreadable file): each slot whose record fails is refilled with the next record in data set
order that loads (wrapping around), so the batch keeps its size and its content depends only on the indices,
never on the rank or worker; the skipped records travel back with it as ``StackedSamples.bad_records``. A
RecordIO set's labels are read from every record header when it is opened, so a bad label or magic number fails
before training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from partial_fc.data.bad_records import BadRecord, reason_of
from partial_fc.data.decode import Buffer, DecodeError, decode_into, decode_rgb, flip_images, normalize_images
from partial_fc.data.faceset import read_faceset_index, read_property, record_label
from partial_fc.data.headers import scan_labels
from partial_fc.data.imagefolder import list_images
from partial_fc.data.recordio import IndexedRecordReader, RecordIOError, unpack
from partial_fc.data.sampler import SeededBatch
from partial_fc.errors import DatasetError, InputError
from partial_fc.fileio import PathLike

__all__ = [
    "ImageFolderDataset",
    "PairListDataset",
    "RandomFaceDataset",
    "RecordFaceDataset",
    "StackedSamples",
    "SyntheticDataset",
]

Size = tuple[int, int] | None
Sample = tuple[torch.Tensor, torch.Tensor]
UNFILLED_LABEL = -1
"""The label of a batch slot left unfilled, more than ``max_bad_per_batch`` records having failed (the head
refuses it)."""
DEFAULT_MAX_BAD_PER_BATCH = 100
_UNUSABLE = (RecordIOError, DecodeError, OSError)  # what a record that cannot be used raises


class StackedSamples(list):
    """A batch's ``(image, label)`` samples as views of one uint8 images tensor [B, H, W, 3] and one labels [B],
    with the ``bad_records`` skipped to fill it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, bad_records: Sequence[BadRecord] = ()):
        super().__init__(zip(images.unbind(0), labels.unbind(0)))
        self.images, self.labels, self.bad_records = images, labels, list(bad_records)


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor; in a DataLoader worker its storage is shared memory, so sending it copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # what DataLoader's default collate uses
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _image_size(size: Size) -> Size:
    """``(height, width)`` as ints, checked positive; None stays None (each image keeps its own size)."""
    if size is None:
        return None
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {size}")
    return height, width


class _FaceDataset(Dataset):
    """Shared sample path: decode into uint8 [H, W, 3], flip with the batch's or this process's generator.

    Samples are ``(uint8 RGB [H, W, 3], int64 label)``; ``decode.normalize_images`` makes network input of a
    batch on the device it is trained on.
    """

    def __init__(self, image_size: Size, flip: bool, max_bad_per_batch: int):
        self.image_size = _image_size(image_size)
        self.flip = flip
        self.max_bad_per_batch = max_bad_per_batch
        self._rng: tuple[int, np.random.Generator] | None = None  # (pid, generator), made on first use

    def _read(self, index: int) -> tuple[Buffer, int]:
        """The encoded image of sample ``index`` and its class."""
        raise NotImplementedError

    def _source(self, index: int) -> str:
        """How errors name sample ``index`` (its file, and key or path)."""
        raise NotImplementedError

    def _bad_record(self, index: int, error: Exception) -> BadRecord:
        """Sample ``index`` as a bad record failing with ``error``."""
        raise NotImplementedError

    def _decode_into(self, index: int, payload: Buffer, out: np.ndarray) -> None:
        """Decode sample ``index``'s payload into ``out``; a ``DecodeError`` names the sample."""
        try:
            decode_into(payload, out)
        except DecodeError as error:
            raise DecodeError(str(error), self._source(index)) from None

    def _process_rng(self) -> np.random.Generator:
        """This process's generator, seeded from ``torch.initial_seed()`` (distinct per DataLoader worker)."""
        pid = os.getpid()
        if self._rng is None or self._rng[0] != pid:
            self._rng = (pid, np.random.default_rng(torch.initial_seed()))
        return self._rng[1]

    def _sample(self, index: int, draw: float) -> Sample:
        """Load one sample on its own (no batch tensor); flipped when flipping is on and ``draw`` < 0.5."""
        payload, label = self._read(index)
        if self.image_size is None:
            image = decode_rgb(payload, self._source(index))
        else:
            image = np.empty((*self.image_size, 3), dtype=np.uint8)
            self._decode_into(index, payload, image)
        if self.flip and draw < 0.5:
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(label, dtype=torch.int64)

    def __getitem__(self, index: int) -> Sample:
        """One ``(image, label)``, flipped (when enabled) by this process's generator."""
        return self._sample(index, self._process_rng().random())

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """A batch decoded into one uint8 tensor, unusable records skipped and refilled (images kept at their own
        sizes, ``image_size=None``, come one by one, unskipped); a ``SeededBatch``'s flips come from its slots'
        global epoch positions, so they depend on neither the worker nor the number of ranks."""
        if isinstance(indices, SeededBatch):
            draws = indices.uniforms()
        else:
            draws = self._process_rng().random(len(indices))
        if self.image_size is None:  # images keep their own sizes: no common batch tensor
            return [self._sample(index, draw) for index, draw in zip(indices, draws)]
        images = _batch_tensor((len(indices), *self.image_size, 3))
        labels = torch.empty(len(indices), dtype=torch.int64)
        slots, label_values = images.numpy(), labels.numpy()
        bad: list[BadRecord] = []
        for slot, index in enumerate(indices):
            label = self._fill(slots[slot], index, bad)
            if label is None:
                slots[slot] = 0
            label_values[slot] = UNFILLED_LABEL if label is None else label
        if self.flip:
            flip_images(slots, draws < 0.5)
        return StackedSamples(images, labels, bad)

    def _fill(self, out: np.ndarray, index: int, bad: list[BadRecord]) -> int | None:
        """Decode record ``index`` into ``out`` and return its label; when it cannot be used, the next record in
        index order that can (each failure added to ``bad``); None once ``bad`` holds more than
        ``max_bad_per_batch`` records, or when no record can be used."""
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            try:
                payload, label = self._read(candidate)
                decode_into(payload, out)
                return label
            except _UNUSABLE as error:
                record = self._bad_record(candidate, error)
                if record not in bad:
                    bad.append(record)
                if len(bad) > self.max_bad_per_batch:
                    return None
        return None


class RecordFaceDataset(_FaceDataset):
    """A face set in indexed RecordIO (insightface layout or header-less), labels checked against num_classes."""

    def __init__(
        self,
        root: PathLike | None = None,
        *,
        rec: PathLike | None = None,
        idx: PathLike | None = None,
        num_classes: int | None = None,
        image_size: Size = None,
        flip: bool = True,
        name: str = "train",
        max_bad_per_batch: int = DEFAULT_MAX_BAD_PER_BATCH,
    ):
        """Open ``root/<name>.rec`` + ``.idx`` (or ``rec`` and ``idx``); ``property`` beside them gives
        num_classes and the size images are resized to, unless ``num_classes`` / ``image_size`` are given.

        Every image record's header is read now: a bad magic number or label fails here, naming file and key."""
        if root is not None:
            if rec is not None or idx is not None:
                raise DatasetError("give either root or both rec and idx, not both")
            rec, idx = Path(root) / f"{name}.rec", Path(root) / f"{name}.idx"
        if rec is None or idx is None:
            raise DatasetError("give either root or both rec and idx")
        self.reader = IndexedRecordReader(rec, idx, past_end_ok=True)
        prop = read_property(Path(self.reader.path).parent)
        if prop is not None:
            num_classes = prop[0] if num_classes is None else num_classes
            image_size = prop[1:] if image_size is None else image_size
        if num_classes is not None and num_classes < 1:
            raise DatasetError(f"{self.reader.path}: num_classes must be positive, got {num_classes}")
        super().__init__(image_size, flip, max_bad_per_batch)
        index = read_faceset_index(self.reader)
        self.image_keys = index.image_keys
        self._offsets = self.reader.offsets_of(self.image_keys)
        self._ends = self.reader.record_ends(self._offsets)
        self._num_classes = num_classes if num_classes is not None else index.num_identities
        scan = scan_labels(self.reader, self.image_keys, self._offsets, self._num_classes)
        if scan.invalid:
            first, more = scan.invalid[0], len(scan.invalid) - 1
            also = f" (and {more} more; `partial-fc check-data` lists every bad record)" if more else ""
            raise RecordIOError(first.reason + also, path=first.file, key=first.key, offset=first.offset)
        self._labels = scan.labels
        self.cut_off = scan.cut_off  # records a truncated .rec lost: skipped when read

    def __len__(self) -> int:
        return len(self.image_keys)

    @property
    def num_classes(self) -> int:
        """Classes: given, from ``property``, from the header's identity count, else ``max(label) + 1``."""
        if self._num_classes is None:
            self._num_classes = int(self.labels().max(initial=-1)) + 1
        return self._num_classes

    def labels(self) -> np.ndarray:
        """Every image's class (int64, in sample order), as read from the record headers when the set was opened;
        -1 for the records ``cut_off`` lists."""
        return self._labels

    def _read(self, index: int) -> tuple[Buffer, int]:
        offset, key = int(self._offsets[index]), int(self.image_keys[index])
        header, payload = unpack(self.reader.read_span(offset, int(self._ends[index])))
        return payload, record_label(header, path=self.reader.path, key=key, num_classes=self._num_classes)

    def _source(self, index: int) -> str:
        return f"{self.reader.path}, key {int(self.image_keys[index])}"

    def _bad_record(self, index: int, error: Exception) -> BadRecord:
        return BadRecord(self.reader.path, int(self.image_keys[index]), int(self._offsets[index]), reason_of(error))


class ImageFolderDataset(_FaceDataset):
    """``root/<identity>/<image>``: one sub-folder per identity, classes numbered by sorted folder name, the images
    ``imagefolder.list_images`` lists (the ones ``partial-fc im2rec --list`` packs)."""

    def __init__(
        self,
        root: PathLike,
        *,
        image_size: Size = (112, 112),
        flip: bool = True,
        max_bad_per_batch: int = DEFAULT_MAX_BAD_PER_BATCH,
    ):
        """Scan ``root``; images are resized to ``image_size`` where they differ (None: keep each one's size).

        An empty root or an identity folder without images is an error naming the folder."""
        super().__init__(image_size, flip, max_bad_per_batch)
        self.root = Path(root)
        self.classes, self._images = list_images(self.root)  # flat buffers: not millions of objects
        self._labels = np.frombuffer(self._images.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_classes(self) -> int:
        """One class per identity folder."""
        return len(self.classes)

    def labels(self) -> np.ndarray:
        """Every image's class (int64, in sample order)."""
        return self._labels

    def path(self, index: int) -> Path:
        """The file of sample ``index``."""
        return self.root / self._images.path(index)

    def _read(self, index: int) -> tuple[Buffer, int]:
        return self.path(index).read_bytes(), int(self._labels[index])

    def _source(self, index: int) -> str:
        return str(self.path(index))

    def _bad_record(self, index: int, error: Exception) -> BadRecord:
        return BadRecord(str(self.path(index)), None, None, reason_of(error))


class PairListDataset(Dataset):
    """Verification pairs from a ``pair.list`` of ``path1 path2 issame(0/1)`` lines, paths under ``image_root``."""

    def __init__(self, pair_list: PathLike, image_root: PathLike, image_size: tuple[int, int] = (112, 112)):
        """Parse the list now (a malformed line is an error naming file and line); images load on demand."""
        self.pair_list, self.image_root = Path(pair_list), Path(image_root)
        self.image_size = _image_size(image_size)
        self.pairs: list[tuple[str, str, bool]] = []
        with open(self.pair_list, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                if len(fields) != 3 or fields[2] not in ("0", "1"):
                    raise DatasetError(
                        f"{self.pair_list}, line {lineno}: expected 'path1 path2 issame(0/1)', got {line.strip()!r}"
                    )
                self.pairs.append((fields[0], fields[1], fields[2] == "1"))
        if not self.pairs:
            raise DatasetError(f"{self.pair_list}: no pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def _images(self, relatives: Sequence[str]) -> torch.Tensor:
        """Listed images, normalised [N, 3, H, W]; unreadable files name the list too."""
        pixels = np.empty((len(relatives), *self.image_size, 3), dtype=np.uint8)
        for slot, relative in enumerate(relatives):
            path = self.image_root / relative
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DatasetError(f"{path} (listed in {self.pair_list}): cannot read: {exc.strerror}") from None
            decode_into(data, pixels[slot], str(path))
        return normalize_images(torch.from_numpy(pixels)).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Pair ``index``: both images (normalised [3, H, W]) and whether they show the same identity."""
        first, second, issame = self.pairs[index]
        images = self._images([first, second])
        return images[0], images[1], issame

    def load(self) -> tuple[torch.Tensor, list[bool]]:
        """Every pair as ``(images [2N, 3, H, W], issame [N])``, the form ``load_bin`` returns and
        ``evaluate_model`` takes (pair ``i`` is images ``2i`` and ``2i + 1``)."""
        images = self._images([path for first, second, _ in self.pairs for path in (first, second)])
        return images, [issame for _, _, issame in self.pairs]


class RandomFaceDataset(Dataset):
    """In-memory random images and labels for benchmarks: no files, no decoding, deterministic in ``seed``."""

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        image_size: tuple[int, int] = (112, 112),
        seed: int = 0,
        distinct_images: int = 64,
    ):
        """``num_samples`` samples; images cycle through ``distinct_images`` random uint8 [H, W, 3] ones."""
        if num_samples < 1 or num_classes < 1 or distinct_images < 1:
            raise InputError(
                "num_samples, num_classes and distinct_images must be positive, got "
                f"{num_samples}, {num_classes}, {distinct_images}"
            )
        rng = np.random.default_rng([seed, 0xBE4C])
        pixels = rng.integers(0, 256, size=(min(distinct_images, num_samples), *image_size, 3), dtype=np.uint8)
        self.images = torch.from_numpy(pixels)
        self._labels = torch.from_numpy(rng.integers(0, num_classes, size=num_samples, dtype=np.int64))
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        """Every sample's class (int64)."""
        return self._labels.numpy()

    def __getitem__(self, index: int) -> Sample:
        return self.images[index % len(self.images)], self._labels[index]


SyntheticDataset = RandomFaceDataset  # the name arcface_torch gives its benchmark set
