"""Automatic restart: a rank killed mid-run, and the job started again by run.sh's MAX_RESTARTS (mpirun,
horovodrun) or by torchrun's --max-restarts, continues from the newest checkpoint to the same last step, loss
for loss; what must not be restarted (a bad input, a stop on request) is not."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.jobs import finish, run, run_settings, start_job, wait_for_folder
from tests.launchers import rank_process, require, wait_for_step
from tests.train_runs import losses

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
SETTINGS = dict(checkpoint_every=4, num_epoch=2)  # 20 steps on 2 ranks x 16


def settings(faceset: Path, output: Path, **extra: str) -> dict[str, str]:
    return {**run_settings(faceset, output, **SETTINGS), "NP": "2", "PARTIAL_FC_COMM": "torch", **extra}


@pytest.fixture(scope="module")
def uninterrupted(faceset, tmp_path_factory) -> dict[int, float]:
    output = tmp_path_factory.mktemp("whole")
    job = run(["bash", "run.sh"], settings(faceset, output), timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    return losses(output)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun", "torchrun"])
def test_a_killed_rank_is_restarted_from_the_newest_checkpoint(faceset, uninterrupted, tmp_path, launcher):
    require("horovodrun-mpi" if launcher == "horovodrun" else "mpirun")
    output = tmp_path / "out"
    env = settings(faceset, output, MAX_RESTARTS="2", LAUNCHER=launcher)
    job = start_job(["bash", "run.sh"], env)
    wait_for_folder(job, output / "checkpoints" / "step_00000008", 200)
    victim = rank_process(job.pid, 1)
    assert victim is not None
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = finish(job, 300, "no recovery after a killed rank")
    seconds = time.monotonic() - killed_at
    (tmp_path / "stderr.txt").write_text(stderr)
    assert job.returncode == 0, stdout[-1500:] + stderr[-3000:]
    if launcher != "torchrun":  # run.sh's loop; torchrun restarts its workers itself
        assert "restart 1 of 2 on 2 ranks" in stderr
    assert re.search(r"resumed from \S+step_0000000[89] at step [89]", stdout), stdout[-3000:]
    assert losses(output) == uninterrupted  # every step to the last, loss for loss (resumed steps replace)
    print(f"{launcher}: rank 1 killed after step 8, job finished 20 steps {seconds:.1f} s later")


def test_a_bad_input_is_not_restarted(faceset, tmp_path):
    require("mpirun")
    job = run(["bash", "run.sh"], settings(faceset, tmp_path / "out", MAX_RESTARTS="2", PFC_LR="-1"), timeout=120)
    assert job.returncode == 2, job.stderr[-3000:]
    assert "run.sh: the job failed" not in job.stderr
    assert "partial-fc: error: invalid config: lr = -1.0 (from environment variable PFC_LR)" in job.stderr


def test_a_stopped_run_sh_stops_its_job_with_a_checkpoint_and_is_not_restarted(faceset, tmp_path):
    require("mpirun")
    output = tmp_path / "out"
    job = start_job(["bash", "run.sh"], settings(faceset, output, MAX_RESTARTS="2"))
    wait_for_step(output, 3, job)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = finish(job, 120, "run.sh did not stop")
    assert job.returncode == 75, stderr[-3000:]
    assert "run.sh: the job failed" not in stderr and "continue with the same command and --resume" in stdout
    stopped_at = max(losses(output))
    assert (output / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
