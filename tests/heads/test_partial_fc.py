"""The head in one process: margins against the reference, accumulation, reduced precision, misuse."""

import pytest
import torch

from partial_fc.errors import InputError
from partial_fc.heads import ArcFace, CombinedMargin, CosFace, PartialFC, SparseSGD
from tests.numerics import relative_error
from tests.reference import make_problem, reference_loss, reference_run


@pytest.mark.parametrize(
    "margin", [CosFace(s=16.0, margin=0.35), CombinedMargin(s=16.0, m1=0.9, m2=0.4, m3=0.15), ArcFace(s=16.0)], ids=str
)
@pytest.mark.parametrize("update_in_backward", [True, False])
def test_single_process_matches_reference(single, margin, update_in_backward):
    problem = make_problem(1, classes=13, dim=8, steps=3, seed=5)
    expected = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3)
    head = PartialFC(margin, 8, 13, comm=single, storage_dtype=torch.float64, chunk_rows=5)
    head.weight.copy_(problem.centers)
    optimizer = problem.sparse_sgd(head, update_in_backward=update_in_backward)
    for embeddings, labels, want in zip(problem.embeddings, problem.labels, expected):
        embeddings = embeddings.clone().requires_grad_(True)
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()
        assert abs(loss.item() - want["loss"]) <= 1e-12 * want["loss"]
        assert relative_error(embeddings.grad, want["grad"]) < 1e-10
        assert relative_error(head.weight, want["centers"]) < 1e-10


def test_gradient_accumulation_sums_micro_batch_gradients(single):
    problem = make_problem(1, classes=9, dim=6, steps=2, seed=8)
    centers = problem.centers.clone().requires_grad_(True)
    reference = torch.optim.SGD([centers], lr=0.3, momentum=0.9, weight_decay=0.01)
    for embeddings, labels in zip(problem.embeddings, problem.labels):
        reference_loss(embeddings, centers, labels, 16.0, 1.0, 0.5, 0.0).backward()
    reference.step()
    head = PartialFC(ArcFace(s=16.0), 6, 9, comm=single, storage_dtype=torch.float64)
    head.weight.copy_(problem.centers)
    optimizer = SparseSGD(head, lr=0.3, momentum=0.9, weight_decay=0.01, update_in_backward=False)
    for embeddings, labels in zip(problem.embeddings, problem.labels):
        head(embeddings, labels).backward()
    optimizer.step()
    assert relative_error(head.weight, centers.detach()) < 1e-12


def test_frozen_embeddings_still_train_the_centers(single):
    head = PartialFC(CosFace(), 8, 20, comm=single)
    optimizer = SparseSGD(head, lr=1.0)
    before = head.weight.clone()
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).backward()
    optimizer.step()
    assert not torch.equal(before, head.weight)


@pytest.mark.parametrize(
    "storage_dtype, fp16", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)]
)
def test_reduced_precision_stays_close_to_float32(single, storage_dtype, fp16):
    embeddings, labels = torch.randn(32, 64), torch.randint(0, 500, (32,))
    exact = PartialFC(ArcFace(), 64, 500, comm=single)
    reduced = PartialFC(ArcFace(), 64, 500, fp16=fp16, comm=single, storage_dtype=storage_dtype)
    reduced.weight.copy_(exact.weight)
    x_exact, x_reduced = embeddings.clone().requires_grad_(True), embeddings.clone().requires_grad_(True)
    loss_exact, loss_reduced = exact(x_exact, labels), reduced(x_reduced, labels)
    loss_exact.backward()
    loss_reduced.backward()
    assert loss_reduced.dtype == torch.float32
    assert abs(loss_reduced.item() - loss_exact.item()) < 2e-2 * loss_exact.item()
    assert relative_error(x_reduced.grad, x_exact.grad) < 5e-2


def test_evaluation_forward_records_nothing(single):
    head = PartialFC(ArcFace(), 8, 20, comm=single)
    with torch.no_grad():
        head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    assert head.take_sampled() == []


@pytest.mark.parametrize("update_in_backward", [True, False])
def test_forgetting_to_step_the_optimizer_is_reported(single, update_in_backward):
    head = PartialFC(ArcFace(), 8, 20, comm=single)
    SparseSGD(head, lr=0.1, update_in_backward=update_in_backward)
    with pytest.raises(RuntimeError, match="SparseSGD"):
        for _ in range(100):
            head(torch.randn(2, 8, requires_grad=True), torch.tensor([0, 1])).backward()


def test_centers_changed_before_backward_are_reported(single):
    head = PartialFC(ArcFace(), 8, 20, comm=single)
    loss = head(torch.randn(2, 8, requires_grad=True), torch.tensor([0, 1]))
    head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="between forward and backward"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_rate": 0.0}, "sample_rate=0.0"),
        ({"sample_rate": 1.5}, "sample_rate=1.5"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"embedding_size": -3}, "embedding_size=-3"),
        ({"embedding_size": 8.5}, "embedding_size=8.5"),
        ({"storage_dtype": torch.int8}, "storage_dtype"),
    ],
)
def test_bad_arguments_name_the_value(single, kwargs, message):
    arguments = {"margin_loss": ArcFace(), "embedding_size": 8, "num_classes": 10, **kwargs}
    with pytest.raises(InputError, match=message):
        PartialFC(comm=single, **arguments)


@pytest.mark.parametrize(
    "embeddings, labels, message",
    [
        (torch.randn(4, 8), torch.tensor([0, 1, 2, 10]), "label 10 is outside"),
        (torch.randn(4, 8), torch.tensor([0, -1, 2, 3]), "label -1 is outside"),
        (torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), "width 7"),
        (torch.full((4, 8), float("nan")), torch.tensor([0, 1, 2, 3]), "NaN"),
        (torch.randn(4, 8), torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer"),
        (torch.randn(4, 8), torch.tensor([0, 1, 2]), "3 labels for 4 embeddings"),
    ],
)
def test_bad_batches_name_the_value(single, embeddings, labels, message):
    head = PartialFC(ArcFace(), 8, 10, comm=single)
    with pytest.raises(InputError, match=message):
        head(embeddings, labels)
