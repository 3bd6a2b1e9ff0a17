"""The demo job: a short multi-rank training of a small network plus the head (the loss falls, backbones stay
identical), and `run_demo`'s lines and summary in one process."""

import json

import pytest
import torch

from partial_fc.engine.demo import DemoSettings, run_demo
from partial_fc.heads import CosFace
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


def test_run_demo_logs_its_steps_and_returns_the_summary(single):
    settings = DemoSettings(
        classes=200,
        dim=32,
        batch=32,
        sample_rate=0.5,
        steps=30,
        margin=CosFace(s=32.0),
        storage_dtype=torch.float32,
        fp16=False,
        seed=0,
        input_dim=16,
        noise=0.5,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        log_every=10,
    )
    lines = []
    result = run_demo(settings, single, lines.append)
    assert lines[0] == "demo: 1 rank(s) on single, 200 identities, batch 32 per rank, sample rate 0.5"
    assert [line.split()[1] for line in lines[1:]] == ["1", "10", "20", "30"]
    assert result["job"] == "demo" and result["world_size"] == 1 and result["steps"] == 30
    assert result["replicas_identical"] is True and result["last_loss"] < result["first_loss"]
