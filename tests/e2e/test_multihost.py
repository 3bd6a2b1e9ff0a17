"""Jobs across simulated hosts (network namespaces, tests/hosts.py): run.sh with HOSTS, horovodrun -H with
config.sh, multi-node torchrun, host-local output folders, and a lost host that run.sh restarts without."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.jobs import finish, run, run_settings, start_job, wait_for_folder
from tests.hosts import simulated_hosts
from tests.launchers import REPO, _environment, require, wait_for_step
from tests.train_runs import metrics

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def steps_of(output: Path) -> list[int]:
    return [row["step"] for row in metrics(output)]


def _two_host_run_sh(hosts, settings: dict) -> dict:
    """run.sh's environment for one rank on each of two simulated hosts, over torch.distributed on eth0."""
    return {
        **hosts.env(),
        **settings,
        "NP": "2",
        "HOSTS": hosts.host_list(),
        "NET_IF": "eth0",
        "PARTIAL_FC_COMM": "torch",
    }


def test_run_sh_trains_across_two_hosts(faceset, tmp_path):
    require("mpirun")
    output = tmp_path / "out"
    with simulated_hosts(2, tmp_path) as hosts:
        env = _two_host_run_sh(hosts, run_settings(faceset, output))
        job = run(hosts.on(0, ["bash", "run.sh"]), env, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "run.sh: trained r10_nano for 10 steps on 2 ranks" in job.stdout
    assert steps_of(output) == list(range(1, 11))
    assert (output / "model.onnx").is_file()


def test_horovodrun_starts_config_sh_on_two_hosts(faceset, tmp_path):
    """The design card's command, `horovodrun -np N -H ip1:n,ip2:n bash config.sh`, through ssh (here a shim)."""
    require("horovodrun-mpi")
    output = tmp_path / "out"
    with simulated_hosts(2, tmp_path) as hosts:
        env = {**hosts.env(), **run_settings(faceset, output), "NET_IF": "eth0"}
        argv = [
            "horovodrun",
            "-np",
            "2",
            "-H",
            hosts.host_list(),
            "--network-interface",
            "eth0",
            "bash",
            str(REPO / "config.sh"),
        ]
        job = run(hosts.on(0, argv), env, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert json.loads((output / "config.json").read_text())["network"] == "r10_nano"
    assert steps_of(output) == list(range(1, 11))
    assert '"ranks": 2' in job.stdout


def test_torchrun_across_two_nodes_with_a_rendezvous_endpoint(faceset, tmp_path):
    output = tmp_path / "out"
    with simulated_hosts(2, tmp_path) as hosts:
        env = _environment({**run_settings(faceset, output), "NET_IF": "eth0"})
        nodes = []
        for index in range(2):
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(index),
                "--rdzv-backend",
                "c10d",
                "--rdzv-id",
                "pfc-test",
                "--rdzv-endpoint",
                f"{hosts.addresses[0]}:29411",
                "--local-addr",
                hosts.addresses[index],
                "--rdzv-conf",
                f"is_host={int(index == 0)}",
                "--no-python",
                "bash",
                str(REPO / "config.sh"),
            ]
            # The hosts share one hostname that resolves to loopback, so each names its address and the store host.
            nodes.append(
                subprocess.Popen(
                    hosts.on(index, argv), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        try:
            outputs = [node.communicate(timeout=300) for node in nodes]
        except subprocess.TimeoutExpired:
            for node in nodes:
                node.kill()
            pytest.fail("multi-node torchrun hung")
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert steps_of(output) == list(range(1, 11))


def test_host_local_output_folders_fail_at_start_naming_the_ranks(faceset, tmp_path):
    require("mpirun")
    disk = tmp_path / "local"
    with simulated_hosts(2, tmp_path, disk=disk) as hosts:
        env = {
            **hosts.env(),
            **run_settings(faceset, disk / "out"),
            "NP": "2",
            "HOSTS": hosts.host_list(),
            "NET_IF": "eth0",
            "PARTIAL_FC_COMM": "torch",
        }
        started = time.monotonic()
        job = run(hosts.on(0, ["bash", "run.sh"], local_disk=True), env, timeout=120)
        seconds = time.monotonic() - started
    assert job.returncode == 2, job.stderr[-3000:]
    errors = [line for line in job.stderr.splitlines() if "partial-fc: error:" in line]
    assert len(errors) == 2 and all("is not shared by every rank: rank(s) 1 do not see" in line for line in errors)
    assert "this is rank 1, on host" in job.stderr
    print(f"host-local output folders: exit {job.returncode} after {seconds:.1f} s")


def test_run_sh_restarts_without_a_lost_host_and_finishes_the_plan(faceset, tmp_path):
    """3 ranks on 3 hosts; the host of rank 0 (which writes the manifests and holds the run lock) dies after a
    checkpoint; MAX_RESTARTS brings the job back on the 2 others, run.sh staying on the first host."""
    require("mpirun")
    output = tmp_path / "out"
    with simulated_hosts(3, tmp_path) as hosts:
        env = {
            **hosts.env(),
            **run_settings(faceset, output, checkpoint_every=3, num_epoch=2, batch_size=8),
            "NP": "3",
            "HOSTS": ",".join(f"{hosts.addresses[i]}:1" for i in (1, 2, 0)),
            "NET_IF": "eth0",
            "PARTIAL_FC_COMM": "torch",
            "MAX_RESTARTS": "2",
        }
        job = start_job(hosts.on(0, ["bash", "run.sh"]), env, new_session=False)
        wait_for_folder(job, output / "checkpoints" / "step_00000006", 200)
        lost_at = time.monotonic()
        hosts.lose(1)
        stdout, stderr = finish(job, 400, "run.sh hung after losing a host")
        recovered = time.monotonic() - lost_at
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"host {hosts.addresses[1]} does not answer" in stderr
    assert "restart 1 of 2 on 2 ranks" in stderr
    resumed = re.search(r"resumed from \S+ at step (\d+), epoch \d+ \(saved on 3 ranks, re-sharded\)", stdout)
    assert resumed, stdout[-3000:]
    start = int(resumed.group(1))
    assert start >= 6
    # 320 images: 13 steps per epoch on 3 ranks x 8, 20 on 2 ranks x 8; the plan (2 epochs) is finished on 2.
    rows = metrics(output)
    assert [row["step"] for row in rows[start - 40 :]] == list(range(start + 1, 41))
    assert rows[-1]["epoch"] == 2
    print(f"lost host: the job finished its plan on 2 ranks {recovered:.1f} s after the loss")


@pytest.mark.parametrize("fault", ["stalled rank", "stop request"])
def test_a_stalled_rank_or_a_stop_across_hosts_ends_the_job_cleanly(faceset, tmp_path, fault):
    """Rank 1 on the second host stopped (SIGSTOP), or run.sh on the first host asked to stop (SIGTERM)."""
    require("mpirun")
    output = tmp_path / "out"
    with simulated_hosts(2, tmp_path) as hosts:
        env = _two_host_run_sh(hosts, run_settings(faceset, output, num_epoch=30, stall_timeout=5))
        job = start_job(hosts.on(0, ["bash", "run.sh"]), env)
        wait_for_step(output, 5, job)
        target = hosts.rank_process(1, 1) if fault == "stalled rank" else psutil.Process(job.pid)
        assert target is not None
        target.send_signal(signal.SIGSTOP if fault == "stalled rank" else signal.SIGTERM)
        since = time.monotonic()
        stdout, stderr = finish(job, 120, f"the job did not end after the {fault}")
        seconds = time.monotonic() - since
    if fault == "stalled rank":
        assert job.returncode != 0 and "stalled: rank 1 (step " in stderr, stderr[-3000:]
        assert seconds < 60, seconds
    else:
        assert job.returncode == 75, stderr[-3000:]
        stopped = max(step for step in steps_of(output))
        assert (output / "checkpoints" / f"step_{stopped:08d}").is_dir()
        assert "continue with the same command and --resume" in stdout
    print(f"{fault} across hosts: the job ended {seconds:.1f} s later, status {job.returncode}")
