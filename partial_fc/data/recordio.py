"""Native reader and writer for dmlc/MXNet RecordIO (``.rec`` + ``.idx``), byte-identical to MXNet, no MXNet needed.

File layout (as dmlc-core's ``RecordIOWriter`` writes it): a sequence of parts, each

- ``uint32`` magic ``0xced7230a``, little-endian;
- ``uint32`` ``lrec = cflag << 29 | length`` (``length < 2**29``);
- ``length`` payload bytes, then zero bytes up to a multiple of 4.

A payload that holds the magic number at a 4-byte-aligned offset is split there and those 4 bytes are dropped:
the parts carry ``cflag`` 1 (first), 2 (middle) and 3 (last); a whole record has ``cflag`` 0. An aligned magic
at offset 0 gives an empty first part, one at the very end an empty last part, and ``k`` consecutive ones give
``k - 1`` empty middle parts. Only the last part is padded (the others end at aligned offsets). The reader puts
the magic back between the parts. Every record starts at a multiple of 4.

The ``.idx`` file (written by ``MXIndexedRecordIO``) is text, one line ``key<TAB>offset`` per record, offset being
the byte offset of the record's first part.

Image records (``mx.recordio.pack``): a ``struct`` ``"IfQQ"`` header (flag, label, id, id2), then, when
``flag > 0``, ``flag`` float32 labels (the header's label field is then 0), then the image bytes.
"""

from __future__ import annotations

import io
import math
import numbers
import operator
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from partial_fc.errors import InputError, MissingInputError
from partial_fc.fileio import PathLike, atomic_path

__all__ = [
    "MAGIC",
    "IRHeader",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "pack",
    "pack_header",
    "read_header",
    "rebuild_index",
    "scan_offsets",
    "unpack",
    "write_index",
]


MAGIC = 0xCED7230A
"""The number every RecordIO part starts with (stored little-endian)."""
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_MAX_PART = 1 << _LENGTH_BITS  # a part's length must fit in 29 bits
_MAX_RECORD = 1 << 30  # dmlc-core refuses records of 2**30 bytes or more
_IR = struct.Struct("IfQQ")  # native order, exactly as mx.recordio uses it
_FLOAT32_EXACT_INT = 1 << 24
_NO_END = 1 << 62  # a file size no offset reaches (for indexes of truncated files)


class RecordIOError(InputError):
    """A RecordIO file, index or record is invalid; the message names the file and the record (offset/key/line)."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        key: int | None = None,
        line: int | None = None,
    ):
        where = []
        if path is not None:
            where.append(str(path) if line is None else f"{path}, line {line}")
        record = []
        if key is not None:
            record.append(f"key {key}")
        if offset is not None:
            record.append(f"offset {offset}")
        if record:
            where.append("record at " + ", ".join(record))
        full = f"{': '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.path, self.offset, self.key, self.line = path, offset, key, line
        self.reason = message  # what is wrong, without the place

    def __reduce__(self):
        """Pickle as the finished message (so errors cross process boundaries intact)."""
        return (_rebuild_error, (self.args[0], self.path, self.offset, self.key, self.line, self.reason))


def _rebuild_error(message: str, path, offset, key, line, reason) -> RecordIOError:
    """Recreate a pickled RecordIOError without re-formatting its message."""
    err = RecordIOError.__new__(RecordIOError)
    Exception.__init__(err, message)
    err.path, err.offset, err.key, err.line = path, offset, key, line
    err.reason = reason
    return err


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _encode(payload: bytes) -> bytes:
    """The bytes dmlc-core writes for one payload: split at aligned magics, last part zero-padded to 4."""
    n = len(payload)
    out = bytearray()
    start = 0  # first byte of the current part (dmlc's ``dptr``)
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            out += _HEAD.pack(MAGIC, ((1 if start == 0 else 2) << _LENGTH_BITS) | (pos - start))
            out += payload[start:pos]
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    out += _HEAD.pack(MAGIC, ((3 if start != 0 else 0) << _LENGTH_BITS) | (n - start))
    out += payload[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def _check_lengths(payload: bytes, path: str, offset: int) -> None:
    """Refuse payloads dmlc-core cannot write (2**30 bytes or more, or a part of 2**29 bytes or more)."""
    n = len(payload)
    if n >= _MAX_RECORD:
        raise RecordIOError(
            f"payload of {n} bytes is too large (RecordIO records must be < {_MAX_RECORD} bytes)",
            path=path,
            offset=offset,
        )
    if n < _MAX_PART:
        return
    start, pos = 0, payload.find(_MAGIC_BYTES)
    while True:
        end = n if pos == -1 else pos
        if pos == -1 or pos % 4 == 0:
            if end - start >= _MAX_PART:
                raise RecordIOError(
                    f"payload of {n} bytes has a part of {end - start} bytes between aligned "
                    f"magic numbers; a part must be < {_MAX_PART} bytes",
                    path=path,
                    offset=offset,
                )
            if pos == -1:
                return
            start = pos + 4
        pos = payload.find(_MAGIC_BYTES, pos + (4 if pos % 4 == 0 else 1))


def _as_bytes(payload: Any, path: str, offset: int) -> bytes:
    """Accept bytes-like payloads only (bytes, bytearray, memoryview, ...)."""
    if isinstance(payload, bytes):
        return payload
    try:
        return memoryview(payload).tobytes()
    except TypeError:
        raise RecordIOError(
            f"payload must be bytes-like, got {type(payload).__name__}", path=path, offset=offset
        ) from None


class RecordWriter:
    """Writes a ``.rec`` file (truncating it), one record per ``write``, byte-identical to ``MXRecordIO('w')``."""

    def __init__(self, path: PathLike):
        """Open ``path`` for writing."""
        self.path = os.fspath(path)
        self._fh: BinaryIO | None = open(self.path, "wb")
        self._pos = 0
        self._pid = os.getpid()

    def tell(self) -> int:
        """Byte offset where the next record will start."""
        return self._pos

    def write(self, payload: bytes) -> int:
        """Append one record; return the offset of its first byte (what ``.idx`` files store)."""
        fh = self._file()
        offset = self._pos
        data = _as_bytes(payload, self.path, offset)
        _check_lengths(data, self.path, offset)
        encoded = _encode(data)
        fh.write(encoded)
        self._pos += len(encoded)
        return offset

    def _file(self) -> BinaryIO:
        """The open handle; refuses a closed writer and writes from a process other than the one that opened it."""
        if self._fh is None:
            raise ValueError(f"{self.path}: write to a closed RecordWriter")
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self.path}: a RecordWriter cannot be used from a forked process")
        return self._fh

    def flush(self) -> None:
        """Flush buffered records to the operating system."""
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        fh, self._fh = self._fh, None
        if fh is not None and os.getpid() == self._pid:
            fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled (it holds a file open for writing)")


class IndexedRecordWriter(RecordWriter):
    """Writes a ``.rec`` and its ``.idx`` (``key<TAB>offset`` lines), byte-identical to ``MXIndexedRecordIO('w')``."""

    def __init__(self, rec_path: PathLike, idx_path: PathLike):
        """Open both files for writing (truncating them)."""
        super().__init__(rec_path)
        self.idx_path = os.fspath(idx_path)
        try:
            self._idx: io.TextIOWrapper | None = open(self.idx_path, "w", encoding="ascii", newline="\n")
        except BaseException:
            super().close()
            raise
        self._keys: set = set()

    def write(self, key: int, payload: bytes) -> int:  # type: ignore[override]
        """Append one record under integer ``key``; return its offset. Keys must be unique."""
        try:
            k = operator.index(key)
        except TypeError:
            raise RecordIOError(f"key must be an integer, got {key!r}", path=self.idx_path) from None
        if k in self._keys:
            raise RecordIOError("duplicate key", path=self.idx_path, key=k)
        offset = super().write(payload)
        assert self._idx is not None
        self._idx.write(f"{k}\t{offset}\n")
        self._keys.add(k)
        return offset

    def flush(self) -> None:
        """Flush both files."""
        super().flush()
        if self._idx is not None:
            self._idx.flush()

    def close(self) -> None:
        """Close both files (idempotent)."""
        try:
            super().close()
        finally:
            idx, self._idx = self._idx, None
            if idx is not None and os.getpid() == self._pid:
                idx.close()


# ----------------------------------------------------------------------------------------------------------------
# Reading


class RecordReader:
    """Reads a ``.rec`` file: sequential iteration over payloads (no ``.idx`` needed) and ``read_at(offset)``.

    Safe in DataLoader workers: the file is opened lazily in each process (the opener's pid is tracked), and the
    reader pickles without its file handle.
    """

    def __init__(self, path: PathLike):
        """Open ``path`` (lazily); fail now if it does not exist."""
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise MissingInputError(f"{self.path}: no such RecordIO file")
        self._fh: BinaryIO | None = None
        self._pid: int | None = None
        self._lock: threading.Lock | None = None

    # -- per-process handle --------------------------------------------------------------------------------------
    def _handle(self) -> tuple[BinaryIO, threading.Lock]:
        """This process's file handle and lock (opened on first use in each process)."""
        pid = os.getpid()
        if self._fh is None or self._pid != pid:
            # a handle inherited through fork shares its file position with the parent: never touch it, open anew
            self._fh = open(self.path, "rb")
            self._lock = threading.Lock()
            self._pid = pid
        assert self._lock is not None
        return self._fh, self._lock

    def close(self) -> None:
        """Close this process's handle (the reader reopens on next use)."""
        fh, self._fh = self._fh, None
        if fh is not None and self._pid == os.getpid():
            fh.close()
        self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"] = state["_pid"] = state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- reading -------------------------------------------------------------------------------------------------
    def read_at(self, offset: int) -> bytes:
        """The payload of the record whose first part starts at byte ``offset``."""
        return self._read_checked(offset, key=None)

    def _read_checked(self, offset: int, key: int | None) -> bytes:
        """``read_at`` with offset validation; errors name ``key`` too when given."""
        fh, lock = self._handle()
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
            raise RecordIOError(f"offset must be an integer, got {offset!r}", path=self.path, key=key)
        offset = int(offset)
        with lock:
            size = os.fstat(fh.fileno()).st_size
            if offset < 0 or offset >= size:
                raise RecordIOError(
                    f"offset is past the end of the file ({size} bytes)" if offset >= 0 else "offset is negative",
                    path=self.path,
                    offset=offset,
                    key=key,
                )
            if offset % 4:
                raise RecordIOError(
                    "offset is not at a record start (records start at multiples of 4)",
                    path=self.path,
                    offset=offset,
                    key=key,
                )
            fh.seek(offset)
            payload, _ = _read_record(fh, self.path, offset, key=key, at_start=True)
        assert payload is not None
        return payload

    def read_span(self, offset: int, end: int) -> bytes:
        """The payload of the record at ``offset``, read with one ``pread`` of ``[offset, end)``.

        ``end`` is where the next record starts (``record_ends`` gives it), so a whole record comes in one system
        call with no seek and no lock. Anything unusual (a split record, a short read, a bad header) is read
        again through ``read_at``, whose checks name the problem.
        """
        fh, _ = self._handle()
        data = os.pread(fh.fileno(), end - offset, offset) if end > offset else b""
        if len(data) >= _HEAD.size:
            magic, lrec = _HEAD.unpack_from(data)
            length = lrec & _LENGTH_MASK
            if magic == MAGIC and lrec >> _LENGTH_BITS == 0 and _HEAD.size + length <= len(data):
                return data[_HEAD.size : _HEAD.size + length]
        return self.read_at(offset)

    def read_prefix(self, offset: int, size: int) -> bytes:
        """The first ``size`` bytes of the payload of the record at ``offset`` (all of it when shorter), read with
        one ``pread`` of just those bytes; a split record, or anything unusual, goes through ``read_at``."""
        fh, _ = self._handle()
        data = os.pread(fh.fileno(), _HEAD.size + size, offset)
        if len(data) >= _HEAD.size:
            magic, lrec = _HEAD.unpack_from(data)
            want = _HEAD.size + min(size, lrec & _LENGTH_MASK)
            if magic == MAGIC and lrec >> _LENGTH_BITS == 0 and len(data) >= want:
                return data[_HEAD.size : want]
        return self.read_at(offset)[:size]

    def __iter__(self) -> Iterator[bytes]:
        """Every payload in file order (reads through its own handle, so it does not disturb ``read_at``)."""
        for _, payload in self.scan():
            yield payload  # type: ignore[misc]

    def scan(self, payloads: bool = True) -> Iterator[tuple[int, bytes | None]]:
        """Yield ``(offset, payload)`` for every record in file order (payload ``None`` when ``payloads=False``)."""
        with open(self.path, "rb", buffering=1 << 20) as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while True:
                payload, end = _read_record(fh, self.path, offset, key=None, at_start=False, want=payloads, size=size)
                if end is None:
                    return
                yield offset, payload
                offset = end


def _read_record(
    fh: BinaryIO, path: str, offset: int, *, key: int | None, at_start: bool, want: bool = True, size: int = 0
) -> tuple[bytes | None, int | None]:
    """Read the record starting at ``offset`` (``fh`` positioned there): ``(payload, next offset)``.

    At end of file returns ``(None, None)`` unless ``at_start`` (the caller promised a record is there).
    With ``want=False`` the payload bytes are skipped (not read, checked against the file ``size``) and ``None``
    is returned for them.
    """
    parts = []
    pos = offset
    first = True
    while True:
        head = fh.read(8)
        if len(head) < 8:
            if first and not head and not at_start:
                return None, None
            if first:
                raise RecordIOError(
                    f"truncated file: record header cut short ({len(head)} of 8 bytes)",
                    path=path,
                    offset=offset,
                    key=key,
                )
            raise RecordIOError(
                f"truncated file: record is split into parts and the part header at byte {pos} "
                f"is cut short ({len(head)} of 8 bytes)",
                path=path,
                offset=offset,
                key=key,
            )
        magic, lrec = _HEAD.unpack(head)
        if magic != MAGIC:
            what = "not at a record start" if first and at_start else "corrupt file"
            where = "" if pos == offset else f" (part header at byte {pos})"
            raise RecordIOError(
                f"{what}: bad magic number 0x{magic:08x}{where}, expected 0x{MAGIC:08x}",
                path=path,
                offset=offset,
                key=key,
            )
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if first and cflag in (2, 3):
            raise RecordIOError(
                f"continuation part (cflag {cflag}) without its first part"
                + (" (offset is not at a record start)" if at_start else ""),
                path=path,
                offset=offset,
                key=key,
            )
        if not first and cflag in (0, 1):
            raise RecordIOError(
                f"record split into parts is missing its last part: part at byte {pos} has "
                f"cflag {cflag}, expected 2 or 3",
                path=path,
                offset=offset,
                key=key,
            )
        padded = (length + 3) & ~3
        if want:
            data = fh.read(padded)
            if len(data) < padded:
                raise RecordIOError(
                    f"truncated file: payload cut short ({len(data)} of {padded} bytes of the part at byte {pos})",
                    path=path,
                    offset=offset,
                    key=key,
                )
            parts.append(data[:length] if padded != length else data)
        else:
            if pos + 8 + padded > size:
                raise RecordIOError(
                    f"truncated file: payload cut short ({max(0, size - pos - 8)} of {padded} bytes "
                    f"of the part at byte {pos})",
                    path=path,
                    offset=offset,
                    key=key,
                )
            fh.seek(padded, os.SEEK_CUR)
        pos += 8 + padded
        if cflag in (0, 3):
            break
        first = False
    return (_MAGIC_BYTES.join(parts) if want else None), pos


# ----------------------------------------------------------------------------------------------------------------
# Index


def _parse_index(idx_path: str, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into int64 arrays (file order); errors name the line."""
    with open(idx_path, "rb") as f:
        fast = _parse_index_fast(f.read(), rec_size)
    return fast if fast is not None else _parse_index_lines(idx_path, rec_size)


def _parse_index_fast(data: bytes, rec_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectorised parse of a valid index in MXNet's exact form (``digits<TAB>digits<LF>`` lines), else ``None``.

    Anything unusual (blank lines, negative keys, spaces, bad offsets, ...) returns ``None`` and is left to the
    line-by-line parser, which accepts the same files and names the line of any error.
    """
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not data.endswith(b"\n") or data.translate(None, b"0123456789\t\n"):
        return None
    buf = np.frombuffer(data, np.uint8)
    tabs, nls = np.flatnonzero(buf == 9), np.flatnonzero(buf == 10)
    if len(tabs) != len(nls):
        return None
    starts = np.concatenate(([0], nls[:-1] + 1))
    key_len, off_len = tabs - starts, nls - tabs - 1  # both in [1, 18] means one tab per line, no overflow
    if key_len.min() < 1 or key_len.max() > 18 or off_len.min() < 1 or off_len.max() > 18:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = np.fromstring(data, dtype=np.int64, sep=" ")  # any whitespace separates
    if values.size != 2 * len(nls):
        return None
    keys, offsets = values[0::2].copy(), values[1::2].copy()
    if offsets.max() >= rec_size or np.any(offsets % 4):
        return None
    return keys, offsets


def _parse_index_lines(idx_path: str, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Line-by-line ``.idx`` parser: lenient like MXNet about whitespace and blank lines, strict on content."""
    keys, offsets = [], []
    with open(idx_path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(b"\t")
            if len(fields) != 2:
                raise RecordIOError(
                    f"malformed index line {raw!r}: expected 'key<TAB>offset'", path=idx_path, line=lineno
                )
            try:
                key, offset = int(fields[0]), int(fields[1])
            except ValueError:
                raise RecordIOError(
                    f"malformed index line {raw!r}: key and offset must be integers", path=idx_path, line=lineno
                ) from None
            if not -(1 << 63) <= key < (1 << 63):
                raise RecordIOError(f"key {key} does not fit in 64 bits", path=idx_path, line=lineno)
            if offset < 0 or offset >= rec_size:
                raise RecordIOError(
                    f"offset {offset} of key {key} is past the end of the .rec file ({rec_size} bytes)"
                    if offset >= 0
                    else f"offset {offset} of key {key} is negative",
                    path=idx_path,
                    line=lineno,
                )
            if offset % 4:
                raise RecordIOError(
                    f"offset {offset} of key {key} is not at a record start (records start at multiples of 4)",
                    path=idx_path,
                    line=lineno,
                )
            keys.append(key)
            offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class IndexedRecordReader(RecordReader):
    """Random access to a ``.rec`` through its ``.idx``: ``keys``, ``read(key)``, ``len()``.

    The index is held in int64 numpy arrays (no per-key Python objects), so forked workers share it cheaply.
    Iterating the reader still yields payloads in file order (see ``RecordReader``).
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike, *, past_end_ok: bool = False):
        """Open the ``.rec`` (lazily) and parse the ``.idx`` now (its errors name the line). With ``past_end_ok``,
        offsets past the end of a truncated ``.rec`` are kept (reading them raises) instead of refused."""
        super().__init__(rec_path)
        self.idx_path = os.fspath(idx_path)
        if not os.path.isfile(self.idx_path):
            raise MissingInputError(
                f"{self.idx_path}: no such RecordIO index (partial-fc rebuild-idx makes one from the .rec)"
            )
        rec_size = _NO_END if past_end_ok else os.path.getsize(self.path)
        self._keys, self._offsets = _parse_index(self.idx_path, rec_size)
        n = len(self._keys)
        self._base: int | None = None  # keys are base, base+1, ...: direct lookup
        self._sorter: np.ndarray | None = None
        self._sorted_keys: np.ndarray | None = None
        if n and int(self._keys[-1]) - int(self._keys[0]) == n - 1 and bool(np.all(np.diff(self._keys) == 1)):
            self._base = int(self._keys[0])
        elif n:
            self._sorter = np.argsort(self._keys, kind="stable")
            sorted_keys = self._keys[self._sorter]
            dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
            if dup.size:
                key = int(sorted_keys[dup[0]])
                lines = _lines_of_key(self.idx_path, key)
                raise RecordIOError(
                    f"duplicate key {key} (lines {', '.join(map(str, lines))})", path=self.idx_path, line=lines[-1]
                )
            self._sorted_keys = sorted_keys

    @property
    def keys(self) -> list:
        """The keys in ``.idx`` order (a new list of ints)."""
        return self._keys.tolist()

    @property
    def key_array(self) -> np.ndarray:
        """The keys in ``.idx`` order as a read-only int64 array (no per-key objects: for sets of millions)."""
        view = self._keys.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        """Number of records in the index."""
        return len(self._keys)

    def _position(self, key: int) -> int:
        """Row of ``key`` in the index, or -1."""
        n = len(self._keys)
        if self._base is not None:
            i = key - self._base
            return i if 0 <= i < n else -1
        if self._sorter is None or self._sorted_keys is None:
            return -1
        j = int(np.searchsorted(self._sorted_keys, key))
        if j < n and int(self._sorted_keys[j]) == key:
            return int(self._sorter[j])
        return -1

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in the index."""
        try:
            k = operator.index(key)  # type: ignore[arg-type]  # non-integers are simply absent
        except TypeError:
            return False
        return -(1 << 63) <= k < (1 << 63) and self._position(k) >= 0

    def offset_of(self, key: int) -> int:
        """Byte offset of ``key``'s record (``KeyError`` if absent)."""
        k = operator.index(key)
        i = self._position(k) if -(1 << 63) <= k < (1 << 63) else -1
        if i < 0:
            raise KeyError(f"{self.idx_path}: no record with key {k}")
        return int(self._offsets[i])

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Byte offsets (int64) of the records of ``keys``, vectorised (``KeyError`` naming the first absent key)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._base is not None:
            rows = keys - self._base
            present = (rows >= 0) & (rows < len(self._keys))
        else:
            sorted_keys = self._sorted_keys if self._sorted_keys is not None else np.empty(0, np.int64)
            places = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
            present = sorted_keys[places] == keys if len(sorted_keys) else np.zeros(len(keys), bool)
            rows = self._sorter[places] if self._sorter is not None else places
        if not present.all():
            raise KeyError(f"{self.idx_path}: no record with key {int(keys[np.argmin(present)])}")
        return self._offsets[rows]

    def record_ends(self, offsets: np.ndarray) -> np.ndarray:
        """For each record offset, where the next indexed record starts (the file size after the last one): an
        upper bound of the record's bytes, for ``read_span``."""
        starts = np.unique(self._offsets)
        following = np.searchsorted(starts, np.asarray(offsets, dtype=np.int64), side="right")
        bounded = np.append(starts, os.path.getsize(self.path))
        return bounded[following]

    def read(self, key: int) -> bytes:
        """The payload stored under ``key`` (``KeyError`` if absent; ``RecordIOError`` if the record is bad)."""
        offset = self.offset_of(key)
        return self._read_checked(offset, key=operator.index(key))


def _lines_of_key(idx_path: str, key: int) -> list:
    """Line numbers where ``key`` occurs in a (valid-looking) ``.idx`` (for error messages only)."""
    out = []
    with open(idx_path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            fields = raw.strip().split(b"\t")
            if fields and fields[0] and int(fields[0]) == key:
                out.append(lineno)
    return out


def scan_offsets(rec_path: PathLike) -> np.ndarray:
    """Byte offsets of every record of a ``.rec``, in file order (headers only are read: payloads are skipped)."""
    return np.fromiter((offset for offset, _ in RecordReader(rec_path).scan(payloads=False)), dtype=np.int64)


def write_index(idx_path: PathLike, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Write a ``.idx`` (``key<TAB>offset`` lines) through a temporary file, so a failure leaves no partial index."""
    with atomic_path(idx_path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as out:
        for key, offset in zip(keys.tolist(), offsets.tolist()):
            out.write(f"{key}\t{offset}\n")


def rebuild_index(rec_path: PathLike, idx_path: PathLike) -> int:
    """Rebuild a lost ``.idx`` by scanning the ``.rec``; keys are 0..N-1 in file order. Return N.

    This reproduces the ``.idx`` MXNet's im2rec wrote when keys were written as 0, 1, 2, ... in order (the usual
    case); other key orders cannot be recovered here (``faceset.rebuild_faceset_index`` knows insightface's).
    """
    offsets = scan_offsets(rec_path)
    write_index(idx_path, np.arange(len(offsets), dtype=np.int64), offsets)
    return len(offsets)


# ----------------------------------------------------------------------------------------------------------------
# Image records (mx.recordio.pack / unpack)


class IRHeader(NamedTuple):
    """Image record header: ``flag`` (number of float32 labels, 0 = scalar), ``label``, ``id``, ``id2``."""

    flag: int
    label: float | np.ndarray | Sequence[float]
    id: int = 0
    id2: int = 0


def _check_exact(value: Any, where: str) -> None:
    """Raise if ``value`` is an integer (or integer-valued float) that float32 cannot hold exactly."""
    if isinstance(value, (bool, np.bool_)):
        return
    if isinstance(value, numbers.Integral):
        v: int | float = int(value)
    elif isinstance(value, numbers.Real):
        v = float(value)
        if not (math.isfinite(v) and v.is_integer()):
            return
    else:
        return
    try:
        stored = _F32.unpack(_F32.pack(v))[0]
    except OverflowError:
        stored = None
    if stored != v:
        if stored is None or not math.isfinite(stored):
            back = "it overflows float32"
        else:
            back = f"it would be read back as {int(stored)}"
        raise RecordIOError(
            f"{where} {int(v)} cannot be stored exactly as a float32 RecordIO label (integers are "
            f"exact only up to 2**24 = {_FLOAT32_EXACT_INT}); {back}"
        )


_F32 = struct.Struct("f")


def _uint(value: Any, bits: int, name: str) -> int:
    """Check an unsigned header field the way ``struct`` would, with a clear error."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral,)):
        raise RecordIOError(f"IRHeader.{name} must be an integer, got {value!r}")
    v = int(value)
    if not 0 <= v < (1 << bits):
        raise RecordIOError(f"IRHeader.{name}={v} is outside [0, 2**{bits})")
    return v


def pack_header(header: IRHeader | Sequence[Any]) -> bytes:
    """The bytes ``mx.recordio.pack`` puts before the payload: the ``IfQQ`` header and, for array labels, the labels.

    Like MXNet, a scalar label (any ``numbers.Number``) forces ``flag = 0``; anything else is converted to a
    float32 array whose size becomes ``flag`` (the header's label field is then 0 and the given flag is ignored).
    Unlike MXNet, an integer label that float32 cannot hold exactly (above 2**24) raises ``RecordIOError``.
    """
    _flag, label, id_, id2 = tuple(header)
    id_, id2 = _uint(id_, 64, "id"), _uint(id2, 64, "id2")
    if isinstance(label, numbers.Number):
        _check_exact(label, "label")
        try:
            return _IR.pack(0, label, id_, id2)
        except (struct.error, OverflowError, TypeError) as e:
            raise RecordIOError(f"label {label!r} cannot be packed as float32: {e}") from None
    try:
        given = np.asarray(label)  # the values as given (huge Python ints stay exact in an object array)
        if given.dtype.kind in "biufO":
            for i, v in enumerate(given.ravel().tolist()):
                _check_exact(v, f"label[{i}]" if given.ndim else "label")
        labels = np.asarray(label, dtype=np.float32)  # what MXNet stores; too-large values were refused above
    except (TypeError, ValueError) as e:
        if isinstance(e, RecordIOError):
            raise
        raise RecordIOError(f"label {label!r} is neither a number nor an array of numbers: {e}") from None
    if labels.size >= (1 << 32):
        raise RecordIOError(f"label has {labels.size} values, more than a uint32 flag can count")
    return _IR.pack(labels.size, 0.0, id_, id2) + labels.tobytes()


def pack(header: IRHeader | Sequence[Any], payload: bytes) -> bytes:
    """Pack an image record exactly as ``mx.recordio.pack(header, payload)`` does (see ``pack_header``)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise RecordIOError(f"payload must be bytes-like, got {type(payload).__name__}")
    return pack_header(header) + bytes(payload)


def read_header(reader: RecordReader, offset: int) -> IRHeader:
    """The image-record header (with its float32 labels) of the record at ``offset``, without reading the image."""
    head = reader.read_prefix(offset, _IR.size)
    flag = _IR.unpack_from(head)[0] if len(head) == _IR.size else 0
    if _IR.size + 4 * flag >= _MAX_RECORD:
        raise RecordIOError(
            f"image record header claims {flag} float32 labels, more than a record can hold",
            path=reader.path,
            offset=offset,
        )
    if flag > 0:
        head = reader.read_prefix(offset, _IR.size + 4 * flag)
    return unpack(head)[0]


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into ``(IRHeader, payload)`` like ``mx.recordio.unpack``; ``flag > 0`` gives float32 labels."""
    record = bytes(record)
    if len(record) < _IR.size:
        raise RecordIOError(f"image record of {len(record)} bytes is shorter than its {_IR.size}-byte header")
    flag, label, id_, id2 = _IR.unpack_from(record)
    if flag > 0:
        end = _IR.size + 4 * flag
        if len(record) < end:
            raise RecordIOError(
                f"image record of {len(record)} bytes is too short for its {flag} float32 labels (needs {end} bytes)"
            )
        return IRHeader(flag, np.frombuffer(record, np.float32, flag, _IR.size).copy(), id_, id2), record[end:]
    return IRHeader(flag, label, id_, id2), record[_IR.size :]
