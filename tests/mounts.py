"""Real full and read-only filesystems for tests, in a private mount namespace (chmod does not stop root).

`full_disk(...)` and `read_only(...)` give a command prefix that runs a program (a launcher and its ranks)
with a size-limited tmpfs, or a read-only bind mount, at a folder; what the program leaves on the tmpfs is
copied to `keep` before the namespace, and the tmpfs with it, goes away.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from pathlib import Path

import pytest


@functools.cache
def _namespaces_allowed() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def require_mount_namespace() -> None:
    """Skip unless `unshare -m` may mount here; fail instead when PARTIAL_FC_REQUIRE_ALL=1."""
    if _namespaces_allowed():
        return
    if os.environ.get("PARTIAL_FC_REQUIRE_ALL") == "1":
        pytest.fail("`unshare -m` with mount is required in this run but not permitted")
    pytest.skip("`unshare -m` with mount is not permitted here (needs root or CAP_SYS_ADMIN)")


def _prefix(setup: str) -> list[str]:
    """`unshare -m sh -c SETUP-then-run`: the program is appended to the returned list."""
    require_mount_namespace()
    return ["unshare", "-m", "sh", "-c", setup, "mount-namespace"]


def full_disk(folder: Path, size_kib: int, keep: Path) -> list[str]:
    """Run with a `size_kib` KiB tmpfs at `folder`; its content is copied to `keep` afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    where, kept = shlex.quote(str(folder)), shlex.quote(str(keep))
    return _prefix(
        f'mount -t tmpfs -o size={size_kib}k tmpfs {where} || exit 97; "$@"; status=$?; '
        f"cp -a {where}/. {kept}/; exit $status"
    )


def read_only(folder: Path) -> list[str]:
    """Run with `folder` mounted read-only (EROFS on every write under it)."""
    folder.mkdir(parents=True, exist_ok=True)
    where = shlex.quote(str(folder))
    return _prefix(f'mount --bind {where} {where} && mount -o remount,ro,bind {where} || exit 97; exec "$@"')
