"""Inter-class filtering (arcface_torch's interclass_filtering_threshold) against a float64 reference, 1-3 ranks."""

from types import SimpleNamespace

import pytest
import torch

from partial_fc.errors import InputError
from partial_fc.heads import ArcFace, CombinedMargin, CosFace, PartialFC, SparseSGD
from tests.launchers import launch
from tests.numerics import TOLERANCE, relative_error
from tests.reference import (
    check_runs,
    make_problem,
    negatives_above,
    reference_cosines,
    reference_loss,
    reference_run,
)
from tests.workers.head_variants import build_head, command_line, run_steps

THRESHOLD = 0.3


def filtered_per_step(problem, expected, threshold: float) -> list[int]:
    """How many negatives the reference filters at each step; also checks that none lies within 1e-5 of the
    threshold, so that float32 rounding cannot flip an entry across it."""
    counts = []
    centers = problem.centers
    for embeddings, labels, step in zip(problem.embeddings, problem.labels, expected):
        cosine = reference_cosines(embeddings, centers)
        assert (cosine - threshold).abs().min() > 1e-5
        counts.append(int(negatives_above(cosine, labels, threshold).sum()))
        centers = step["centers"]
    return counts


@pytest.mark.parametrize(
    "margin", [CosFace(s=16.0, margin=0.35), CombinedMargin(s=16.0, m1=0.9, m2=0.4, m3=0.15), ArcFace(s=16.0)], ids=str
)
@pytest.mark.parametrize("update_in_backward", [True, False])
def test_single_process_filtering_matches_reference(single, margin, update_in_backward):
    problem = make_problem(1, classes=13, dim=8, steps=3, seed=5)
    expected = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3, threshold=THRESHOLD)
    unfiltered = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3)
    assert all(count > 0 for count in filtered_per_step(problem, expected, THRESHOLD))
    assert all(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(expected, unfiltered))
    head = build_head(problem, single, torch.float64, margin, THRESHOLD)
    optimizer = SparseSGD(
        head, problem.lr, problem.momentum, problem.weight_decay, update_in_backward=update_in_backward
    )
    for got, want in zip(run_steps(head, optimizer, problem, 0), expected):
        assert abs(got["loss"] - want["loss"]) <= 1e-12 * want["loss"]
        assert relative_error(got["grad"], want["grad"]) < 1e-10
        assert relative_error(got["centers"], want["centers"]) < 1e-10


def test_filtered_negatives_get_no_gradient(single):
    """A center that is a filtered negative for every row it meets, and no row's positive, does not move."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    head = PartialFC(CosFace(s=8.0), 2, 3, comm=single, storage_dtype=torch.float64, interclass_filtering_threshold=0.5)
    head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.05], [-1.0, 0.3]], dtype=torch.float64))
    optimizer = SparseSGD(head, lr=1.0, momentum=0.0, weight_decay=0.0)
    before = head.weight.clone()
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    optimizer.step()
    assert torch.equal(head.weight[1], before[1])
    assert not torch.equal(head.weight[2], before[2]) and not torch.equal(head.weight[0], before[0])
    want = reference_loss(embeddings, before, labels, 8.0, 1.0, 0.0, 0.4, threshold=0.5)
    assert abs(loss.item() - want.item()) <= 1e-12 * want.item()


@pytest.mark.parametrize("storage_dtype, fp16", [(torch.float32, False), (torch.float32, True), (torch.float64, False)])
def test_a_threshold_that_filters_nothing_is_bit_identical_to_none(single, storage_dtype, fp16):
    embeddings, labels = torch.randn(24, 16), torch.randint(0, 200, (24,))
    results = []
    for threshold in (0.0, 0.999):
        torch.manual_seed(1)
        head = PartialFC(
            ArcFace(),
            16,
            200,
            0.5,
            fp16,
            comm=single,
            storage_dtype=storage_dtype,
            chunk_rows=7,
            interclass_filtering_threshold=threshold,
        )
        optimizer = SparseSGD(head, lr=0.1)
        assert reference_cosines(embeddings.double(), head.weight.double()).max() < 0.999
        x = embeddings.to(storage_dtype).requires_grad_(True)
        loss = head(x, labels)
        loss.backward()
        optimizer.step()
        results.append((loss.detach(), x.grad, head.weight.clone()))
    for unfiltered, filtered in zip(*results):
        assert torch.equal(unfiltered, filtered)


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5, "0.3", True, float("nan")])
def test_bad_thresholds_are_rejected(single, threshold):
    with pytest.raises(InputError, match="interclass_filtering_threshold"):
        PartialFC(ArcFace(), 8, 10, comm=single, interclass_filtering_threshold=threshold)


def test_threshold_carried_by_an_arcface_torch_margin(single):
    margin = SimpleNamespace(s=64.0, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.2)
    assert PartialFC(margin, 8, 10, comm=single).interclass_filtering_threshold == 0.2
    both = PartialFC(margin, 8, 10, comm=single, interclass_filtering_threshold=0.2)
    assert both.interclass_filtering_threshold == 0.2
    with pytest.raises(InputError, match="differs from the margin_loss"):
        PartialFC(margin, 8, 10, comm=single, interclass_filtering_threshold=0.4)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_distributed_filtering_matches_reference(tmp_path, ranks):
    classes, dim, margin, steps = 11, 8, (16.0, 1.0, 0.5, 0.0), 3
    argv = command_line(tmp_path, "filtering", classes, dim, steps, margin, "--threshold", str(THRESHOLD))
    job = launch("mpirun", ranks, argv, timeout=400.0)
    assert job.returncode == 0, job.stdout + job.stderr
    problem = make_problem(ranks, classes, dim, steps=steps, seed=3)
    expected = reference_run(problem, *margin, threshold=THRESHOLD)
    assert all(count > 0 for count in filtered_per_step(problem, expected, THRESHOLD))
    for rank in range(ranks):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world_size"] == ranks
        assert "interclass_filtering_threshold differs between ranks" in result["mismatch_error"]
        rows = problem.rank_rows(rank)
        assert len(result["runs"]) == 2
        check_runs(result["runs"], expected, rows, TOLERANCE, ranks)
