"""A short multi-rank training of a small network plus the head: the loss falls, backbones stay identical."""

import json

import pytest

from tests.launchers import launch

DEMO = ["-m", "partial_fc", "demo", "--steps", "60", "--log-every", "20", "--classes", "500", "--batch", "64"]


def summary(output: str) -> dict:
    for line in output.splitlines():
        if '"job": "demo"' in line:
            return json.JSONDecoder().raw_decode(line[line.index("{") :])[0]
    raise AssertionError(f"no summary line in:\n{output}")


@pytest.mark.parametrize(
    "launcher, ranks, backend",
    [
        ("mpirun", 2, "torch"),
        ("horovodrun-gloo", 2, "horovod"),
        ("horovodrun-mpi", 3, "horovod"),
        ("torchrun", 2, "torch"),
    ],
)
def test_loss_falls_and_replicas_stay_identical(launcher, ranks, backend):
    job = launch(launcher, ranks, DEMO)
    assert job.returncode == 0, job.stdout + job.stderr
    result = summary(job.stdout)
    assert result["backend"] == backend and result["world_size"] == ranks
    assert result["replicas_identical"] is True
    assert result["last_loss"] < 0.5 * result["first_loss"], result


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_two_ranks_equal_one_process_on_the_whole_batch(launcher):
    arguments = [*DEMO, "--sample-rate", "1", "--steps", "5", "--log-every", "1"]
    two = summary(launch(launcher, 2, arguments).stdout)
    one = summary(launch(launcher, 1, [*arguments, "--batch", "128"]).stdout)
    assert abs(two["last_loss"] - one["last_loss"]) < 1e-4 * one["last_loss"]
