"""SIGTERM or SIGINT to one rank of a real `partial-fc train` job: every rank stops after the same step, a
checkpoint is written, the job exits with PREEMPTED_STATUS and says how to resume, and the resumed run
continues loss for loss like an uninterrupted one."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from partial_fc.engine.preemption import PREEMPTED_STATUS, StopSignals
from tests.launchers import launch, rank_process, start, wait_for_step
from tests.train_runs import losses, train_argv

EPOCHS = 6  # 60 steps at 2 ranks x batch 16: long enough to be interrupted mid-run
LAUNCHER_REPORT = {"horovodrun-gloo": f"Exit code: {PREEMPTED_STATUS}", "torchrun": f"exitcode  : {PREEMPTED_STATUS}"}


@pytest.fixture(scope="module")
def uninterrupted(faceset, tmp_path_factory) -> dict[int, float]:
    output = tmp_path_factory.mktemp("whole")
    job = launch("mpirun", 2, train_argv(faceset, output, num_epoch=EPOCHS), timeout=400)
    assert job.returncode == 0, job.stderr
    return losses(output)


def test_signals_only_set_a_flag_while_installed_and_a_second_one_is_ignored(single):
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    stop = StopSignals(rank=0)
    stop.install()
    try:
        assert stop.agreed(single) is None
        os.kill(os.getpid(), signal.SIGTERM)  # caught: only a flag
        os.kill(os.getpid(), signal.SIGINT)  # while stopping: ignored (no KeyboardInterrupt either)
        assert stop.agreed(single) == "SIGTERM"
    finally:
        stop.uninstall()
    assert {number: signal.getsignal(number) for number in before} == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, target, signal_number",
    [
        ("mpirun", 1, signal.SIGTERM),
        ("mpirun", "launcher", signal.SIGTERM),
        ("horovodrun-gloo", 0, signal.SIGINT),
        ("horovodrun-gloo", "launcher", signal.SIGTERM),
        ("torchrun", 1, signal.SIGTERM),
        ("torchrun", "launcher", signal.SIGTERM),
    ],
)
def test_a_signal_stops_every_rank_with_a_checkpoint_then_resume_is_exact(
    faceset, uninterrupted, tmp_path, launcher, target, signal_number
):
    """The signal goes to one rank (`target`), or to the launcher, which forwards it to every rank."""
    output = tmp_path / "run"
    job = start(launcher, 2, train_argv(faceset, output, num_epoch=EPOCHS))
    try:
        wait_for_step(output, 5, job)
        receiver = psutil.Process(job.pid) if target == "launcher" else rank_process(job.pid, target)
        assert receiver is not None, f"no process of rank {target}"
        signalled = time.monotonic()
        receiver.send_signal(signal_number)
        stdout, stderr = job.communicate(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    if launcher == "mpirun" and target != "launcher":
        assert job.returncode == PREEMPTED_STATUS, stderr
    elif launcher == "horovodrun-gloo" and target == "launcher":  # horovodrun's own status races its shutdown
        assert job.returncode in (0, 1), stdout + stderr
    else:  # a signalled launcher, horovodrun and torchrun exit 1 themselves whatever the ranks' status
        assert job.returncode == 1, stdout + stderr
    if launcher in LAUNCHER_REPORT and target != "launcher":
        assert LAUNCHER_REPORT[launcher] in stdout + stderr, stdout + stderr
    stopped = max(losses(output))
    assert 5 <= stopped < EPOCHS * 10 and seconds < 60
    assert f"stopped by {signal.Signals(signal_number).name} after step {stopped} of {EPOCHS * 10}" in stdout
    assert stdout.count("--resume") == 1 and "partial_fc/" not in stderr  # no traceback through our code
    assert (output / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
    resumed = launch(launcher, 2, train_argv(faceset, output, "--resume", num_epoch=EPOCHS), timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    curve = losses(output)  # metrics.jsonl continues on resume
    assert sorted(curve) == list(range(1, EPOCHS * 10 + 1))
    assert curve == uninterrupted  # the steps before the stop and after the resume, loss for loss
