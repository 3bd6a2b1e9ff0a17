"""The distributed head at sample_rate 1 equals a single-process float64 full softmax, on 1-3 real ranks."""

import pytest
import torch

from tests.launchers import launch, worker
from tests.numerics import TOLERANCE, relative_error
from tests.reference import make_problem, reference_run

CLASSES, DIM, MARGIN = 11, 8, (16.0, 1.0, 0.5, 0.0)


def check_against_reference(out_dir, ranks: int, backend: str) -> None:
    problem = make_problem(ranks, CLASSES, DIM, steps=2, seed=3)
    expected = reference_run(problem, *MARGIN)
    for rank in range(ranks):
        result = torch.load(out_dir / f"rank{rank}.pt")
        assert result["backend"] == backend and result["world_size"] == ranks
        rows = problem.rank_rows(rank)
        for dtype, tolerance in TOLERANCE.items():
            start, count = result[dtype]["shard"]
            for got, want in zip(result[dtype]["steps"], expected):
                assert abs(got["loss"] - want["loss"]) <= tolerance * abs(want["loss"]), (rank, dtype)
                # each rank's embeddings get world_size x d(global loss)/d(its rows): averaging makes it exact
                expected_grad = ranks * want["grad"][rows]
                assert relative_error(got["grad"], expected_grad) <= tolerance, (rank, dtype, "embedding grad")
                assert relative_error(got["centers"], want["centers"][start : start + count]) <= tolerance, (
                    rank,
                    dtype,
                    "centers after SGD",
                )


LAUNCHES = [
    *[pytest.param("mpirun", ranks, "torch", marks=pytest.mark.mpi) for ranks in (1, 2, 3)],
    *[pytest.param("horovodrun-gloo", ranks, "horovod", marks=pytest.mark.horovod) for ranks in (1, 2, 3)],
    pytest.param("horovodrun-mpi", 2, "horovod", marks=pytest.mark.horovod),
    pytest.param("torchrun", 3, "torch"),
]


@pytest.mark.parametrize("launcher, ranks, backend", LAUNCHES)
def test_distributed_head_matches_single_process_reference(tmp_path, launcher, ranks, backend):
    job = launch(launcher, ranks, [worker("head_step.py"), "--out", str(tmp_path)])
    assert job.returncode == 0, job.stdout + job.stderr
    check_against_reference(tmp_path, ranks, backend)


@pytest.mark.mpi
def test_a_rank_without_the_c_passes_leads_every_rank_to_torchs_ops(tmp_path):
    """Ranks agree on the softmax's path before its collectives: one rank lacking the C passes (no compiler,
    another thread count) must not leave the others on the fixed-shift path with their different all-reduces."""
    job = launch("mpirun", 2, [worker("head_step.py"), "--out", str(tmp_path), "--torch-softmax-rank", "1"])
    assert job.returncode == 0, job.stdout + job.stderr
    check_against_reference(tmp_path, 2, "torch")
