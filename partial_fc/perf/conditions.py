"""The conditions a benchmark ran under, stated in its JSON, and warnings when they make its figures doubtful.

Every benchmark records the 1-minute load average at its start and end (and the highest reading taken in
between, at the points where it calls `sample()`), the machine's core count, torch threads per rank, ranks,
the share of the run its compute (main) thread spent runnable but waiting for a core (Linux schedstat), and
the share of the machine's CPU time the hypervisor gave to other guests (steal, /proc/stat), which a virtual
machine's own counters cannot see as waiting. It warns when the machine was loaded:
- the compute thread waited for a core more than `WAIT_SHARE_LIMIT` of the run. A load average above the
  core count alone is not load where that wait was small: a benchmark's own ranks and their sleeping
  background threads count in the load average (2 ranks on 2 cores read 2.0-2.8);
- a load average above the core count where the platform cannot tell the wait;
- steal above `STEAL_SHARE_LIMIT` of the machine's CPU time: the host ran other guests on this one's cores;
- (the head benchmark) a matmul floor during the steps more than `FLOOR_SLOWDOWN_LIMIT` times slower than the
  same products timed alone at start (on the same rank, before the head exists; floors under a millisecond
  are not judged).
Warnings go into the JSON's `warnings` list and onto stderr.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

import torch

# The floor during the steps may be this many times the floor timed alone at start before it counts as loaded;
# floors shorter than MIN_CHECKED_FLOOR_S (cache effects and timer noise at toy sizes) are not judged.
FLOOR_SLOWDOWN_LIMIT = 1.25
MIN_CHECKED_FLOOR_S = 1e-3
# The share of the run the compute thread may spend waiting for a core before the machine counts as loaded.
WAIT_SHARE_LIMIT = 0.05
# The share of the machine's CPU time the hypervisor may steal for other guests before it counts as loaded.
STEAL_SHARE_LIMIT = 0.05


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return math.nan


def runqueue_wait_s() -> float:
    """Seconds the calling thread has spent runnable but waiting for a core (Linux schedstat; NaN elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return math.nan


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) ticks of all the machine's cores since boot (Linux /proc/stat; (0, 0) elsewhere)."""
    try:
        with open("/proc/stat") as stats:
            fields = [int(value) for value in stats.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user and nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(start: tuple[int, int], end: tuple[int, int]) -> float:
    """The share of the machine's CPU time between two `cpu_ticks()` readings stolen by the hypervisor (NaN: none)."""
    total = end[1] - start[1]
    return (end[0] - start[0]) / total if total > 0 else math.nan


def core_count() -> int:
    """The machine's logical cores."""
    return os.cpu_count() or 1


class BenchConditions:
    """Readings taken from a benchmark's start to its end; `finish()` gives the JSON fields and warnings."""

    def __init__(self, ranks: int = 1) -> None:
        self.ranks = int(ranks)
        self.cores = core_count()
        self.load_start = load_average()
        self.load_readings = [self.load_start]
        self.wait_start, self.started = runqueue_wait_s(), time.perf_counter()
        self.ticks_start = cpu_ticks()
        self.floor: dict[str, float] | None = None

    def sample(self) -> None:
        """Take one more load-average reading (call it between the timed parts of a run)."""
        self.load_readings.append(load_average())

    def record_floor(self, reference_s: float, median_s: float, slowdown: float | None = None) -> None:
        """The matmul floor timed alone at start (`reference_s`) and its median during the steps (`median_s`);
        `slowdown` is the worst rank's median / reference when it is not their plain ratio."""
        if slowdown is None:
            slowdown = median_s / reference_s if reference_s > 0 else math.inf
        self.floor = {"reference_s": reference_s, "median_s": median_s, "slowdown": slowdown}

    def wait_share(self) -> float:
        """The share of the run so far the compute thread spent waiting for a core (NaN where unknown)."""
        return (runqueue_wait_s() - self.wait_start) / max(time.perf_counter() - self.started, 1e-9)

    def warnings(self, load_end: float, wait_share: float = math.nan, steal: float = math.nan) -> list[str]:
        """Why the figures may be slower than a quiet machine's; empty when nothing says so."""
        found = []
        readings = [value for value in [*self.load_readings, load_end] if not math.isnan(value)]
        load_text = (
            (
                f"the 1-min load average reached {max(readings):.2f} on {self.cores} cores "
                f"({self.load_start:.2f} at start, {load_end:.2f} at end)"
            )
            if readings
            else "no load average"
        )
        if wait_share > WAIT_SHARE_LIMIT:
            found.append(
                f"machine loaded: the compute thread waited for a core {100 * wait_share:.0f}% of the run "
                f"({load_text}); other work, or this benchmark's own background threads, shared its core, so the "
                "figures are slower than a quiet machine's"
            )
        elif math.isnan(wait_share) and readings and max(readings) > self.cores:
            found.append(
                f"machine loaded: {load_text}; other work shared the cores, so the figures are slower than a "
                "quiet machine's"
            )
        if steal > STEAL_SHARE_LIMIT:
            found.append(
                f"machine loaded: the hypervisor stole {100 * steal:.0f}% of this machine's CPU time for other "
                "guests during the run; the figures are slower than a quiet machine's"
            )
        if (
            self.floor is not None
            and self.floor["reference_s"] >= MIN_CHECKED_FLOOR_S
            and self.floor["slowdown"] > FLOOR_SLOWDOWN_LIMIT
        ):
            found.append(
                f"machine loaded: the matmul floor ran {self.floor['slowdown']:.2f}x slower during the steps "
                f"(median {self.floor['median_s']:.4g} s) than the same products timed alone at start "
                f"({self.floor['reference_s']:.4g} s), more than {FLOOR_SLOWDOWN_LIMIT}x; the figures are slower "
                "than a quiet machine's"
            )
        return found

    def finish(self, threads_per_rank: int | None = None, wait_share: float | None = None) -> dict:
        """The JSON fields: load averages, cores, threads per rank, ranks, the compute thread's wait for a core
        (`wait_share`: the worst rank's, else this thread's), the hypervisor's steal, the floor check, `warnings`."""
        load_end = load_average()
        steal = steal_share(self.ticks_start, cpu_ticks())
        wait_share = self.wait_share() if wait_share is None else wait_share
        fields = {
            "load_average_start": _rounded(self.load_start),
            "load_average_end": _rounded(load_end),
            "load_average_max": _rounded(
                max((v for v in [*self.load_readings, load_end] if not math.isnan(v)), default=math.nan)
            ),
            "cores": self.cores,
            "threads_per_rank": torch.get_num_threads() if threads_per_rank is None else threads_per_rank,
            "ranks": self.ranks,
            "compute_thread_wait_share": None if math.isnan(wait_share) else round(wait_share, 3),
            "steal_share": None if math.isnan(steal) else round(steal, 3),
        }
        if self.floor is not None:
            fields["matmul_floor_reference_s"] = round(self.floor["reference_s"], 5)
            fields["floor_over_reference"] = round(self.floor["slowdown"], 3)
        fields["warnings"] = self.warnings(load_end, wait_share, steal)
        return fields


def print_warnings(name: str, fields: dict, stream: TextIO | None = None) -> None:
    """Each of `fields['warnings']` as one `NAME: warning: ...` line on stderr."""
    stream = sys.stderr if stream is None else stream
    for warning in fields.get("warnings", ()):
        print(f"{name}: warning: {warning}", file=stream, flush=True)


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)
