"""SparseAdamW: torch.optim.AdamW on the sampled rows with per-row step counts, on 1 process and 2 ranks."""

import io

import pytest
import torch

from partial_fc.heads import ArcFace, PartialFC, SparseAdamW
from tests.launchers import launch
from tests.numerics import TOLERANCE, relative_error
from tests.reference import adamw, check_runs, lazy_adamw_rows, make_problem, reference_loss, reference_run
from tests.workers.head_variants import build_head, command_line, run_steps

MARGIN = (16.0, 1.0, 0.5, 0.0)
LR, BETAS, EPS, WEIGHT_DECAY = 0.05, (0.9, 0.99), 1e-8, 0.1
SETTINGS = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
STATE = ("step", "exp_avg", "exp_avg_sq")


class RecordingHead:
    """Stands between a head and its optimizer and notes the rows each optimizer step was handed."""

    def __init__(self, head: PartialFC) -> None:
        self.head, self.weight, self.workspace = head, head.weight, head.workspace
        self.indices: list[torch.Tensor] = []

    @property
    def row_updater(self):
        return self.head.row_updater

    @row_updater.setter
    def row_updater(self, updater) -> None:
        self.head.row_updater = updater

    def take_sampled(self):
        records = self.head.take_sampled()
        self.indices.extend(record.index.clone() for record in records)
        return records


@pytest.mark.parametrize("update_in_backward", [True, False])
def test_sample_rate_one_equals_dense_adamw(single, update_in_backward):
    problem = make_problem(1, classes=13, dim=8, steps=4, seed=5)
    expected = reference_run(problem, *MARGIN, optimizer=adamw(**SETTINGS))
    head = build_head(problem, single, torch.float64, ArcFace(s=16.0), 0.0)
    optimizer = SparseAdamW(head, **SETTINGS, update_in_backward=update_in_backward)
    for got, want in zip(run_steps(head, optimizer, problem, 0), expected, strict=True):
        assert abs(got["loss"] - want["loss"]) <= 1e-12 * want["loss"]
        assert relative_error(got["grad"], want["grad"]) < 1e-10
        assert relative_error(got["centers"], want["centers"]) < 1e-10
    assert torch.equal(optimizer.state[head.weight]["step"], torch.full((13,), 4))


@pytest.mark.parametrize("update_in_backward", [True, False])
def test_unsampled_rows_are_untouched_and_sampled_rows_follow_per_row_adamw(single, update_in_backward):
    classes, dim, steps = 40, 8, 4
    problem = make_problem(1, classes, dim, steps=steps, seed=11)
    head = PartialFC(ArcFace(s=16.0), dim, classes, 0.25, comm=single, storage_dtype=torch.float64, chunk_rows=3)
    head.weight.copy_(problem.centers)
    recorder = RecordingHead(head)
    optimizer = SparseAdamW(recorder, **SETTINGS, update_in_backward=update_in_backward)
    state = optimizer.state[head.weight]
    for step, (embeddings, labels) in enumerate(zip(problem.embeddings, problem.labels)):
        weight_before = head.weight.clone()
        state_before = {key: state[key].clone() for key in STATE}
        head(embeddings, labels).backward()
        optimizer.step()
        index = recorder.indices[step]
        unsampled = torch.ones(classes, dtype=torch.bool)
        unsampled[index] = False
        assert 0 < index.numel() < classes and unsampled.sum() > 0
        assert torch.equal(head.weight[unsampled], weight_before[unsampled])
        for key in STATE:
            assert torch.equal(state[key][unsampled], state_before[key][unsampled]), key
        sampled_centers = weight_before[index].clone().requires_grad_(True)
        reference_loss(embeddings, sampled_centers, torch.searchsorted(index, labels), *MARGIN).backward()
        want_weight, want_state = lazy_adamw_rows(weight_before, state_before, index, sampled_centers.grad, **SETTINGS)
        assert relative_error(head.weight[index], want_weight[index]) < 1e-12
        for key in STATE:
            assert relative_error(state[key][index], want_state[key][index]) < 1e-12, key
    assert len(set(state["step"].tolist())) > 2  # rows really are at different step counts


@pytest.mark.parametrize("update_in_backward", [True, False])
def test_bfloat16_storage_keeps_float32_arithmetic(single, update_in_backward):
    embeddings, labels = torch.randn(12, 16), torch.randint(0, 50, (12,))
    initial = torch.randn(50, 16).bfloat16()
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        head = PartialFC(ArcFace(), 16, 50, 0.5, comm=single, storage_dtype=dtype, seed=4, chunk_rows=6)
        head.weight.copy_(initial)
        optimizer = SparseAdamW(head, **SETTINGS, update_in_backward=update_in_backward)
        for _ in range(2):
            head(embeddings, labels).backward()
            optimizer.step()
            if dtype == torch.float32:  # round the state as bfloat16 storage does, so the paths stay in step
                for tensor in (head.weight, *(optimizer.state[head.weight][key] for key in STATE[1:])):
                    tensor.copy_(tensor.bfloat16())
        state = optimizer.state[head.weight]
        results.append((head.weight, *(state[key] for key in STATE)))
    (weight, step, exp_avg, exp_avg_sq), exact = results
    assert weight.dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16 and step.dtype == torch.int64
    assert not torch.equal(weight, initial)
    for reduced, full in zip((weight, step, exp_avg, exp_avg_sq), exact):
        assert torch.equal(reduced, full.to(reduced.dtype))


def test_state_dict_round_trip_continues_identically(single):
    problem = make_problem(1, classes=30, dim=8, steps=3, seed=2)
    heads, optimizers = [], []
    for _ in range(2):
        head = PartialFC(ArcFace(s=16.0), 8, 30, 0.3, comm=single, storage_dtype=torch.float64, seed=9)
        head.weight.copy_(problem.centers)
        heads.append(head)
        optimizers.append(SparseAdamW(head, **SETTINGS))
    for embeddings, labels in zip(problem.embeddings[:2], problem.labels[:2]):
        heads[0](embeddings, labels).backward()
        optimizers[0].step()
    heads[1].weight.copy_(heads[0].weight)
    heads[1].generator.set_state(heads[0].generator.get_state())
    saved = io.BytesIO()
    torch.save(optimizers[0].state_dict(), saved)
    saved.seek(0)
    optimizers[1].load_state_dict(torch.load(saved))
    assert optimizers[1].state[heads[1].weight]["step"].dtype == torch.int64
    for head, optimizer in zip(heads, optimizers):
        head(problem.embeddings[2], problem.labels[2]).backward()
        optimizer.step()
    assert torch.equal(heads[0].weight, heads[1].weight)
    for key in STATE:
        assert torch.equal(optimizers[0].state[heads[0].weight][key], optimizers[1].state[heads[1].weight][key])


@pytest.mark.parametrize(
    "settings", [dict(lr=-1.0), dict(eps=-1e-8), dict(weight_decay=-0.1), dict(betas=(1.0, 0.9)), dict(betas=(0.9,))]
)
def test_bad_settings_are_rejected(single, settings):
    head = PartialFC(ArcFace(), 8, 10, comm=single)
    with pytest.raises(ValueError):
        SparseAdamW(head, **settings)


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ranks_equal_dense_adamw(tmp_path):
    classes, dim, steps = 11, 8, 3
    settings = ",".join(str(v) for v in (LR, *BETAS, EPS, WEIGHT_DECAY))
    argv = command_line(tmp_path, "adamw", classes, dim, steps, MARGIN, "--adamw", settings)
    job = launch("mpirun", 2, argv, timeout=400.0)
    assert job.returncode == 0, job.stdout + job.stderr
    problem = make_problem(2, classes, dim, steps=steps, seed=3)
    expected = reference_run(problem, *MARGIN, optimizer=adamw(**SETTINGS))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world_size"] == 2 and len(result["runs"]) == 3
        rows = problem.rank_rows(rank)
        check_runs(result["runs"], expected, rows, TOLERANCE, 2)
