"""A training step on W ranks moves every parameter exactly as one process does on the concatenated batch.

The worker (tests/workers/whole_step.py) trains a small backbone and PartialFC for 3 steps in float64 with SGD
(momentum, weight decay) and AdamW, with and without gradient accumulation and clipping, without BatchNorm or
with it synchronised (`SyncBatchNorm` against plain BatchNorm in the one process), through `distribute_backbone`
and through the plain wrappers of other trainers (DDP, Horovod's DistributedOptimizer with its default op).
Every backbone parameter and buffer, every center row, the losses and the global gradient norm seen by clipping
must equal the single-process run on the whole batch, on 1-3 ranks (3 splits the 13 rows 5/4/4).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.launchers import REPO, launch, require, worker
from tests.numerics import relative_error
from tests.workers.whole_step import CLIP, VARIANTS, WRAPPERS, make_backbone

TOLERANCE = 1e-10  # float64; the runs differ only in the order of summation


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    job = subprocess.run(
        [sys.executable, worker("whole_step.py"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    return torch.load(out / "rank0.pt")


def test_reference_is_a_discriminating_problem(reference):
    """Every parameter moves well beyond the tolerance, and clipping acts wherever a variant asks for it."""
    for variant, (_, _, clip, batchnorm) in VARIANTS.items():
        start = make_backbone(batchnorm).state_dict()
        result = reference[variant, "engine"]
        for key, value in start.items():
            if value.is_floating_point() and "running" not in key:
                assert relative_error(result["backbone"][key], value) > 1e-4, (variant, key)
        assert min(result["norms"]) > CLIP if clip else True


def check_against_reference(out_dir, ranks: int, backend: str, reference: dict) -> None:
    for rank in range(ranks):
        result = torch.load(out_dir / f"rank{rank}.pt")
        assert (result["backend"], result["world_size"]) == (backend, ranks)
        for variant in VARIANTS:
            for wrapper in WRAPPERS:
                got, want = result[variant, wrapper], reference[variant, wrapper]
                where = (rank, variant, wrapper)
                for key, value in want["backbone"].items():
                    assert relative_error(got["backbone"][key], value) <= TOLERANCE, (*where, key)
                start, count = got["shard"]
                assert relative_error(got["centers"], want["centers"][start : start + count]) <= TOLERANCE, where
                assert got["losses"] == pytest.approx(want["losses"], rel=TOLERANCE), where
                assert got["norms"] == pytest.approx(want["norms"], rel=TOLERANCE), where


HOROVOD_UNDER_MPIRUN = {"PARTIAL_FC_COMM": "horovod"}
LAUNCHES = [
    *[
        pytest.param("mpirun", ranks, "torch", {}, marks=pytest.mark.mpi, id=f"mpirun-torch-{ranks}")
        for ranks in (1, 2, 3)
    ],
    pytest.param("torchrun", 2, "torch", {}, id="torchrun-2"),
    pytest.param("torchrun", 3, "torch", {}, id="torchrun-3"),
    *[
        pytest.param(
            "mpirun",
            ranks,
            "horovod",
            HOROVOD_UNDER_MPIRUN,
            marks=[pytest.mark.mpi, pytest.mark.horovod],
            id=f"mpirun-horovod-{ranks}",
        )
        for ranks in (2, 3)
    ],
    *[
        pytest.param("horovodrun-gloo", ranks, "horovod", {}, marks=pytest.mark.horovod, id=f"horovodrun-{ranks}")
        for ranks in (2, 3)
    ],
    pytest.param("horovodrun-mpi", 2, "horovod", {}, marks=pytest.mark.horovod, id="horovodrun-mpi-2"),
]


@pytest.mark.parametrize("launcher, ranks, backend, env", LAUNCHES)
def test_step_on_ranks_equals_one_process_on_the_whole_batch(tmp_path, reference, launcher, ranks, backend, env):
    if backend == "horovod":
        require("horovodrun-gloo")  # Horovod itself must be importable, whichever launcher starts it
    job = launch(launcher, ranks, [worker("whole_step.py"), "--out", str(tmp_path)], env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    check_against_reference(tmp_path, ranks, backend, reference)
