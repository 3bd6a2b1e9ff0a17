"""Writing files so that readers never see a partial one: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator


def fsync_path(path: str | os.PathLike) -> None:
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
def atomic_path(target: str | os.PathLike, durable: bool = False, suffix: str = ".tmp") -> Iterator[str]:
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
