"""A rank stopped mid-training (SIGSTOP: not dead, like a hung NFS read or a wedged GPU) ends a real job within
`stall_timeout` plus the launcher's teardown, on every launcher, with one line naming the stalled rank and step."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from partial_fc.engine.watchdog import STALLED_STATUS, StepWatchdog
from tests.engine.test_preemption import EPOCHS
from tests.launchers import rank_process, start, wait_for_step
from tests.train_runs import train_argv

STALL_TIMEOUT = 5.0


def test_heartbeats_blame_the_silent_rank_then_the_odd_one_out(tmp_path):
    folder = tmp_path / "heartbeat"
    folder.mkdir()
    watchdog = StepWatchdog(0, 3, folder, timeout_s=10.0)
    watchdog.progress(7)

    def beat(rank: int, step: int, where: str, age: float) -> None:
        record = {"rank": rank, "step": step, "phase": "training", "where": where, "time": time.time() - age}
        (folder / f"rank_{rank}.json").write_text(json.dumps(record))

    for rank in range(3):
        beat(rank, 7, "head", 1.0)
    assert watchdog.stalled_ranks() == []
    beat(2, 7, "data", 1.0)  # alive, but busy where nobody else is
    assert watchdog.stalled_ranks() == ["rank 2 (step 7, in training/data, last heartbeat 1 s ago)"]
    beat(1, 7, "head", 30.0)  # silent: stopped, dead or cut off
    assert watchdog.stalled_ranks() == ["rank 1 (step 7, in training/head, last heartbeat 30 s ago)"]
    (folder / "rank_1.json").unlink()
    assert watchdog.stalled_ranks() == [f"rank 1 (no heartbeat in {folder})"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, stopped", [("mpirun", 1), ("horovodrun-gloo", 1), ("torchrun", 0)])
def test_a_stopped_rank_ends_the_job_naming_it(faceset, tmp_path, launcher, stopped):
    job = start(launcher, 2, train_argv(faceset, tmp_path, num_epoch=EPOCHS, stall_timeout=STALL_TIMEOUT))
    try:
        wait_for_step(tmp_path, 5, job)
        target = rank_process(job.pid, stopped)
        assert target is not None
        target.send_signal(signal.SIGSTOP)
        since = time.monotonic()
        stdout, stderr = job.communicate(timeout=120)
        seconds = time.monotonic() - since
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        try:
            target.kill()
        except Exception:  # noqa: BLE001 - already gone with its launcher
            pass
    assert job.returncode != 0
    # The waiting rank names the stopped one; a launcher that sends SIGCONT before killing (mpirun) lets the
    # stopped rank say so too.
    lines = [line for line in stderr.splitlines() if "no progress for" in line]
    waiting, woken = f"rank {1 - stopped}: no progress for", f"rank {stopped}: no progress for"
    assert lines and waiting in lines[0] and f"stalled: rank {stopped} (step " in lines[0], stderr
    assert "stall_timeout=5" in lines[0]
    assert all("stalled: this rank itself, frozen for" in line for line in lines if woken in line), lines
    assert seconds < 60, seconds
    print(
        f"{launcher}: job ended {seconds:.1f} s after SIGSTOP to rank {stopped}; status {job.returncode} "
        f"(ranks exit {STALLED_STATUS})"
    )
