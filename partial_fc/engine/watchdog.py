"""A step watchdog: a rank whose training makes no progress for `stall_timeout` seconds ends the job, naming the
rank that stalled and its step.

Collectives cannot tell a slow rank from a stopped one (a hung NFS read, a wedged GPU, SIGSTOP) and may wait
forever, so each rank runs a thread that (1) every few seconds writes a heartbeat file, `rank_<k>.json` in the
run's heartbeat folder, with its last finished step and current phase, and (2) when its own rank has finished no
step for longer than the phase allows, reads every rank's heartbeat, names the ranks that fell silent or stayed
behind, and exits the process with `STALLED_STATUS`, which makes the launcher end the job. A stopped rank writes
no heartbeat; the ranks waiting for it in a collective name it. Evaluation, checkpoints and the first step (data
workers starting) are allowed `SLOW_PHASE_FACTOR` times longer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from partial_fc.progress import print_line

STALLED_STATUS = 76
SLOW_PHASE_FACTOR = 10
SLOW_PHASES = frozenset({"startup", "evaluation", "checkpoint"})
UNWATCHED_COLLECTIVE_TIMEOUT = 1800.0


def collective_timeout(stall_timeout: float) -> float:
    """How long a collective may wait for a peer (gloo, NCCL, Horovod): a backstop behind the watchdog, longer
    than any phase it allows, so the watchdog's message naming the stalled rank always comes first."""
    return 2 * SLOW_PHASE_FACTOR * stall_timeout if stall_timeout > 0 else UNWATCHED_COLLECTIVE_TIMEOUT


class StepWatchdog:
    """Watches this rank's progress (`progress(step)`, `slow(phase)`) from a daemon thread; see the module doc."""

    def __init__(
        self, rank: int, world_size: int, folder: Path, timeout_s: float, locate: Callable[[], str] = lambda: "training"
    ) -> None:
        """`locate()` says where in a step the rank is (the trainer's innermost phase: data, backbone, head...)."""
        self.rank, self.world_size, self.folder, self.timeout_s = rank, world_size, Path(folder), float(timeout_s)
        self.locate = locate
        self.step, self.current_phase = 0, "startup"
        self.last_progress = self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout_s <= 0 or self._thread is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="partial_fc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def progress(self, step: int) -> None:
        """A step finished: the clock starts again, in the training phase."""
        self.step, self.current_phase, self.last_progress = step, "training", time.monotonic()

    @contextmanager
    def slow(self, name: str) -> Iterator[None]:
        """A phase allowed `SLOW_PHASE_FACTOR` times the timeout (evaluation, checkpoint); training resumes after."""
        self.current_phase, self.last_progress = name, time.monotonic()
        try:
            yield
        finally:
            self.current_phase, self.last_progress = "training", time.monotonic()

    def _allowance(self) -> float:
        return self.timeout_s * (SLOW_PHASE_FACTOR if self.current_phase in SLOW_PHASES else 1)

    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        record = {
            "rank": self.rank,
            "step": self.step,
            "phase": self.current_phase,
            "where": self.locate(),
            "time": time.time(),
        }
        path = self.folder / f"rank_{self.rank}.json"
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            temporary.write_text(json.dumps(record))
            os.replace(temporary, path)
        except OSError:  # a full or vanished folder must not kill a healthy run; the stall check still works
            pass

    def _watch(self) -> None:
        interval = max(0.2, min(5.0, self.timeout_s / 4))
        while not self._stop.wait(interval):
            frozen = time.monotonic() - self.last_beat  # long only if this whole process was stopped or starved
            self._beat()
            if time.monotonic() - self.last_progress > self._allowance():
                self._end_job(frozen)

    def stalled_ranks(self) -> list[str]:
        """Who the heartbeats blame: ranks gone silent (stopped, dead, cut off) or behind this rank's step; else
        ranks busy somewhere other than where most ranks are (a rank stuck reading data while the rest wait in
        the head's collectives)."""
        now, records, missing = time.time(), {}, []
        for rank in range(self.world_size):
            try:
                records[rank] = json.loads((self.folder / f"rank_{rank}.json").read_text())
            except (OSError, ValueError):
                missing.append(rank)
        blamed = [
            rank
            for rank, record in records.items()
            if now - record["time"] > self.timeout_s / 2 or record["step"] < self.step
        ]
        if not blamed and not missing and records:
            places = [record["where"] for record in records.values()]
            usual = max(set(places), key=places.count)
            blamed = [rank for rank, record in records.items() if record["where"] != usual]
        found = [f"rank {rank} (no heartbeat in {self.folder})" for rank in missing]
        for rank in blamed:
            record = records[rank]
            found.append(
                f"rank {rank} (step {record['step']}, in {record['phase']}/{record['where']}, last "
                f"heartbeat {now - record['time']:.0f} s ago)"
            )
        return found

    def _end_job(self, frozen: float) -> None:
        waited = time.monotonic() - self.last_progress
        if frozen > self.timeout_s / 2:
            blame = f"stalled: this rank itself, frozen for {frozen:.0f} s (stopped, or starved of CPU)"
        else:
            culprits = self.stalled_ranks()
            blame = ("stalled: " + ", ".join(culprits)) if culprits else "every rank is where this one is"
        print_line(
            f"partial-fc: error: rank {self.rank}: no progress for {waited:.0f} s after step {self.step} "
            f"(in {self.current_phase}/{self.locate()}; stall_timeout={self.timeout_s:g}); {blame}; "
            "ending the job"
        )
        os._exit(STALLED_STATUS)
