"""Files that readers never see half written (written beside the target, then renamed over it), written durably
(flushed to disk, hashed on the way), and torch files read without running pickled code."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from partial_fc.errors import InputError, MissingInputError, PartialFCError

PathLike = str | os.PathLike[str]
_CHUNK = 1 << 20


class WriteError(PartialFCError):
    """A file could not be written (disk full, read-only or unwritable folder...); the message names it and why."""


def fsync_path(path: PathLike) -> None:
    """Flush a file's (or a directory's) data to disk; best effort where a directory cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_cause(error: BaseException) -> str:
    """The operating system's reason in `error` or in the errors it arose from, as "No space left on device
    (ENOSPC)"; torch wraps a failed write in a RuntimeError ("enforce fail at inline_container.cc")."""
    seen: BaseException | None = error
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} ({errno.errorcode.get(seen.errno, seen.errno)})"
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def atomic_path(target: PathLike, durable: bool = False, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside ``target`` to write to; renamed over ``target`` when the block succeeds.

    On failure the temporary file is removed and ``target`` is untouched. The file gets the mode a plain
    ``open()`` would give it. ``durable`` also fsyncs the file before the rename and the folder after it.
    The temporary's name is ``.<target's name>.<random><suffix>``, so a folder's leftovers can be told by it.
    """
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        if durable:
            fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(directory)


def sha256_file(path: PathLike) -> str:
    """The hex sha256 of the file at `path`, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingWriter:
    """A file handle for torch.save that hashes the bytes on their way out (torch's zip writer only appends), so
    a multi-GB file is not read back to hash it."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        written = self.handle.write(data)
        self.size += written
        return written

    def flush(self) -> None:
        self.handle.flush()


@contextlib.contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """torch.save without the zip records' CRC-32, which it computes at ~0.1 GB/s (16 s of a 1.5 GB shard's 17
    here): the sha256 that `save_durably` returns is the integrity check, and torch.load does not read the CRCs."""
    serialization = torch.serialization
    if not hasattr(serialization, "set_crc32_options"):
        yield
        return
    before = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(before)


def _write_error(path: PathLike, error: BaseException) -> WriteError:
    return WriteError(f"cannot write {path}: {os_error_cause(error)}")


def save_durably(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path`, flushed to disk; returns the file's size and sha256 (a WriteError when it fails)."""
    try:
        with open(path, "wb") as handle, _without_zip_crc32():
            writer = _HashingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        size = path.stat().st_size
    except (OSError, RuntimeError) as error:  # torch reports a failed write as RuntimeError("enforce fail ...")
        raise _write_error(path, error) from error
    if size != writer.size:  # not everything torch wrote went through the writer: hash the file instead
        return {"size": size, "sha256": sha256_file(path)}
    return {"size": size, "sha256": writer.digest.hexdigest()}


def write_text_durably(path: Path, text: str) -> None:
    """Write `text` to `path` in UTF-8, flushed to disk (a WriteError when it fails)."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _write_error(path, error) from error


def load_torch_file(path: Path, what: str = "file", mmap: bool = False) -> Any:
    """torch.load with weights_only=True onto the CPU (memory-mapped with `mmap`); a missing or unreadable file is
    an InputError naming it (as `what`)."""
    if not path.is_file():
        raise MissingInputError(f"{what} {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle is a bad file
        raise InputError(f"{path} cannot be loaded as a torch file with weights_only=True: {error}") from error
