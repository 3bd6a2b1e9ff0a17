"""One run per output folder: a lock file that names its owner, and that a dead owner does not hold forever.

`<output>/run.lock` is created with O_EXCL (atomic on local filesystems and on NFSv3 and later) and holds its
owner as JSON: host, pid, boot id, the process's start time and when the lock was taken. The owner touches the
file every `HEARTBEAT_S` seconds. A lock is stale, and the next run takes it over, when its owner ran on this
host and that process is gone (or the host rebooted since), or, for an owner on another host, when its heartbeat
is older than `STALE_AFTER_S` (hosts need distinct names, and clocks within minutes of the file server's). A
restart of the same job (run.sh's `MAX_RESTARTS`, torchrun's `--max-restarts`, which end every rank first)
takes over its earlier attempt's lock at once, on any host. To free a folder whose owner is known to be dead
sooner, delete the lock file by hand.

`.partial` folders of checkpoint saves carry the same owner record, so only a dead owner's are cleaned up.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from partial_fc.errors import PartialFCError
from partial_fc.fileio import os_error_cause
from partial_fc.progress import print_line

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class OutputFolderError(PartialFCError):
    """The output folder cannot be used: another run owns it, or it is not writable; the message says which."""


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process `pid` from /proc, or None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (command) "
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _job_attempt() -> tuple[str, int]:
    """(job id, attempt) as run.sh (PARTIAL_FC_JOB_ID, PARTIAL_FC_ATTEMPT) or torchrun (TORCHELASTIC_RUN_ID,
    TORCHELASTIC_RESTART_COUNT) publish them; ("", 0) under other launchers. torchrun's default id "none" is
    shared by unrelated jobs, so it does not count."""
    for job_name, attempt_name in (
        ("PARTIAL_FC_JOB_ID", "PARTIAL_FC_ATTEMPT"),
        ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
    ):
        job = os.environ.get(job_name, "")
        if job and job != "none" and os.environ.get(attempt_name, "0").isdigit():
            return job, int(os.environ.get(attempt_name, "0"))
    return "", 0


@dataclass(frozen=True)
class Owner:
    """A process that owns a folder: where it runs, which process it is (pid reuse is told apart), since when."""

    host: str
    pid: int
    boot_id: str
    process_start: str
    since: float
    job: str = ""  # the launcher's id of the job, the same for each of its restarts ("" when unknown)
    attempt: int = 0  # which start of that job this is (0 first, 1 the first restart, ...)

    @classmethod
    def of_process(cls, pid: int) -> Owner:
        """Process `pid` of this host, as an owner from now on."""
        stat = _process_stat(pid)
        job, attempt = _job_attempt()
        return cls(socket.gethostname(), pid, _boot_id(), stat[1] if stat else "", time.time(), job, attempt)

    @classmethod
    def this_process(cls) -> Owner:
        return cls.of_process(os.getpid())

    def is_this_process(self) -> bool:
        """The same process as this one (its start time tells a reused pid apart)."""
        mine = Owner.this_process()
        return (self.host, self.pid, self.boot_id, self.process_start) == (
            mine.host,
            mine.pid,
            mine.boot_id,
            mine.process_start,
        )

    def is_alive(self, heartbeat: float, stale_after: float = STALE_AFTER_S) -> bool:
        """On this host: the process still runs (and the host did not reboot); elsewhere: a recent `heartbeat`.
        An earlier attempt of this process's own job is over: its launcher ended it before restarting."""
        job, attempt = _job_attempt()
        if self.job and self.job == job and self.attempt < attempt:
            return False
        if self.host != socket.gethostname():
            return time.time() - heartbeat < stale_after
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        stat = _process_stat(self.pid)
        if stat is None:
            return True
        state, start = stat
        return state not in ("Z", "X") and (not self.process_start or start == self.process_start)

    def describe(self) -> str:
        """As "host h, pid 12, started 2026-12-01 10:00:00 UTC"."""
        since = datetime.datetime.fromtimestamp(self.since, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, pid {self.pid}, started {since}"


def write_owner(path: Path, owner: Owner) -> None:
    """Create `path` (it must not exist) holding `owner`, flushed to disk; nothing is left when that fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, json.dumps(asdict(owner)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def read_owner(path: Path) -> tuple[Owner, float] | None:
    """The owner recorded in `path` and its heartbeat (the file's modification time); None if missing or unreadable."""
    try:
        heartbeat = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
        return Owner(
            str(data["host"]),
            int(data["pid"]),
            str(data["boot_id"]),
            str(data["process_start"]),
            float(data["since"]),
            str(data.get("job", "")),
            int(data.get("attempt", 0)),
        ), heartbeat
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The lock on an output folder held by this process; `release()` frees it, a heartbeat thread keeps it fresh."""

    def __init__(self, path: Path, owner: Owner, took_over: Owner | None) -> None:
        self.path, self.owner, self.took_over = path, owner, took_over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, folder: Path, stale_after: float = STALE_AFTER_S) -> RunLock:
        """Lock `folder` (created if missing) for this process, taking over a stale lock; OutputFolderError when
        a live run holds it or the folder is not writable."""
        path = Path(folder) / LOCK_NAME
        took_over = None
        for _ in range(3):
            owner = Owner.this_process()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_owner(path, owner)
                return cls(path, owner, took_over)
            except FileExistsError:
                pass
            except OSError as error:
                raise OutputFolderError(
                    f"cannot create the run lock {path}: {os_error_cause(error)}; the output folder must be writable"
                ) from error
            holder, heartbeat = read_owner(path) or (None, _modified(path))
            if holder is None and time.time() - heartbeat < stale_after:
                raise OutputFolderError(
                    f"output folder {folder} is locked by {path}, which does not say by whom "
                    f"(unreadable); if no run uses this folder, delete {path}"
                )
            if holder is not None and holder.is_alive(heartbeat, stale_after):
                raise OutputFolderError(
                    f"output folder {folder} is in use by another run ({holder.describe()}; heartbeat "
                    f"{max(0.0, time.time() - heartbeat):.0f} s ago, lock file {path}): use another output folder, "
                    f"or wait for that run to end; if it is dead, delete {path}"
                )
            if _break_stale(path, holder):
                took_over = holder
        raise OutputFolderError(f"output folder {folder}: other runs keep taking the lock {path}; try again")

    def start_heartbeat(self, interval: float = HEARTBEAT_S) -> None:
        """Touch the lock file every `interval` seconds from a daemon thread, while it is still ours."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._beat, args=(interval,), name="partial_fc-run-lock", daemon=True
            )
            self._thread.start()

    def _holds(self) -> bool:
        held = read_owner(self.path)
        return held is not None and held[0] == self.owner

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self._holds():
                print_line(
                    f"partial-fc: warning: the run lock {self.path} is no longer this run's (deleted by hand, "
                    "or taken over after a missed heartbeat): another run may now write to this folder"
                )
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or read-only disk: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._holds():
            try:
                self.path.unlink()
            except OSError:
                pass  # the next run sees this process gone and takes the lock over


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _break_stale(path: Path, holder: Owner | None) -> bool:
    """Move the stale lock of `holder` (None: unreadable) out of the way; False when another run replaced it
    meanwhile (then it is put back)."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another run broke it first
    moved = read_owner(aside)
    if (moved[0] if moved else None) == holder:
        aside.unlink()
        return True
    try:
        os.link(aside, path)  # it was a fresh lock: put it back unless yet another run took the name
    except OSError:
        pass
    aside.unlink()
    return False
