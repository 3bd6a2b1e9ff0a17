"""Compiling the head's C routines (`row_copy.c`, `softmax_kernels.c`) once per machine into a shared library.

Each source is compiled with the system's C compiler (`CC`, else `cc`) on first use into ~/.cache/partial_fc
(`XDG_CACHE_HOME`), else the temporary directory, under a name hashed from the source, compiler and flags; ranks
building at once each build and rename, so any one of them wins. None where no library can be built or loaded,
and the callers then run torch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "partial_fc" / "native"


def _build(source: Path, flags: tuple[str, ...], compiler: str) -> Path | None:
    """The shared library compiled from `source`, built once per source, compiler and flags, kept in the cache."""
    digest = hashlib.sha256(source.read_bytes() + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "partial_fc-native"):
        library = directory / f"{source.stem}-{digest}.so"
        if library.exists():
            return library
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run(
                [compiler, *flags, "-shared", "-fPIC", "-o", partial, str(source), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, library)
            return library
        except (OSError, subprocess.SubprocessError):
            Path(partial).unlink(missing_ok=True)
            return None
    return None


def load_library(source: Path, flags: tuple[str, ...], disable_variable: str) -> ctypes.CDLL | None:
    """The library built from `source`, or None where `disable_variable`=0 or it cannot be built or loaded."""
    if os.environ.get(disable_variable, "1") == "0":
        return None
    library_path = _build(source, flags, os.environ.get("CC", "cc"))
    if library_path is None:
        return None
    try:
        return ctypes.CDLL(str(library_path))
    except OSError:
        return None
