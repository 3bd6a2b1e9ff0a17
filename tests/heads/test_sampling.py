"""Sampling: positives kept, exact counts, uniform negatives, correct remapping, untouched unsampled rows."""

import pytest
import torch

from partial_fc.heads import ArcFace, PartialFC, SparseSGD
from partial_fc.heads.partial_fc import _rank_seed
from partial_fc.heads.sampling import rows_of_largest, sample_centers
from tests.numerics import relative_error
from tests.reference import reference_loss

# chi-square 0.999 quantile for 44 degrees of freedom
CHI2_44_P999 = 78.75


def test_positives_kept_and_labels_remapped():
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([105, 3, 150, 120, 105, 199, 100, 7])
    sampled = sample_centers(labels, class_start=100, num_local=100, num_sample=10, generator=generator)
    assert sampled.index.numel() == 10
    assert torch.equal(sampled.index, sampled.index.unique())  # sorted, no repeats
    assert sampled.rows.tolist() == [0, 2, 3, 4, 5, 6]
    assert torch.equal(sampled.index[sampled.cols] + 100, labels[sampled.rows])


def test_all_positives_kept_when_they_exceed_the_budget():
    labels = torch.arange(0, 40)
    sampled = sample_centers(labels, 0, num_local=50, num_sample=5, generator=torch.Generator().manual_seed(0))
    assert sampled.index.tolist() == list(range(40))
    assert torch.equal(sampled.index[sampled.cols], labels)


def test_full_rate_uses_every_center_in_order():
    labels = torch.tensor([4, 0, 4])
    sampled = sample_centers(labels, 0, num_local=6, num_sample=6, generator=None)
    assert sampled.index.tolist() == list(range(6)) and sampled.cols.tolist() == [4, 0, 4]


def test_negatives_are_uniform():
    generator = torch.Generator().manual_seed(1234)
    labels = torch.arange(5)
    draws, counts = 4000, torch.zeros(50)
    for _ in range(draws):
        sampled = sample_centers(labels, 0, num_local=50, num_sample=10, generator=generator)
        assert sampled.index.numel() == 10 and set(range(5)) <= set(sampled.index.tolist())
        counts[sampled.index] += 1
    assert torch.all(counts[:5] == draws)
    negatives = counts[5:]
    expected = draws * 5 / 45
    chi2 = ((negatives - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_44_P999, chi2


def rows_of_largest_by_full_topk(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.topk(count, sorted=False).indices.sort().values


@pytest.mark.parametrize(
    ("total", "count", "spread"),
    [
        (500_000, 50_000, 1.0),  # the 1M-class benchmark's shard at r = 0.1
        (1000, 7, 1.0),
        (1000, 990, 1.0),  # the cutoff falls below 0: every row is a candidate
        (100_000, 10_000, 0.5),  # too few scores pass the cutoff: the top-k over all rows
    ],
)
def test_the_rows_of_the_largest_scores_are_those_of_a_full_topk(total, count, spread):
    generator = torch.Generator().manual_seed(total + count)
    scores = torch.rand(total, generator=generator) * spread
    scores[torch.randperm(total, generator=generator)[: count // 3]] = 2.0  # forced rows, as the positives
    rows = rows_of_largest(scores, count)
    assert rows.numel() == count and bool((rows[1:] > rows[:-1]).all())  # ascending, no repeats
    # the same scores as a full top-k's rows (at a tie on the smallest kept score either row may be taken)
    expected = rows_of_largest_by_full_topk(scores, count)
    assert torch.equal(scores[rows].sort().values, scores[expected].sort().values)


def test_ranks_draw_from_different_streams():
    assert len({_rank_seed(0, rank) for rank in range(64)}) == 64


@pytest.mark.parametrize("update_in_backward", [True, False])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unsampled_rows_and_momentum_are_bit_identical_after_a_step(single, storage_dtype, update_in_backward):
    head = PartialFC(ArcFace(), 16, 200, 0.1, comm=single, storage_dtype=storage_dtype, chunk_rows=7)
    optimizer = SparseSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=update_in_backward)
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    momentum.normal_()  # as if earlier steps had moved every row
    for _ in range(2):
        weight_before, momentum_before = head.weight.clone(), momentum.clone()
        loss = head(torch.randn(12, 16), torch.randint(0, 200, (12,)))
        index = head._sampled[0].index
        loss.backward()
        optimizer.step()
        untouched = torch.ones(200, dtype=torch.bool)
        untouched[index] = False
        assert index.numel() == 20
        assert torch.equal(head.weight[untouched], weight_before[untouched])
        assert torch.equal(momentum[untouched], momentum_before[untouched])
        assert not torch.equal(head.weight[index], weight_before[index])
        assert head.weight.dtype == storage_dtype and momentum.dtype == storage_dtype


def test_sampled_loss_is_the_softmax_over_the_sampled_centers(single):
    head = PartialFC(ArcFace(s=16.0), 8, 60, 0.25, comm=single, storage_dtype=torch.float64)
    embeddings = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.randint(0, 60, (10,))
    loss = head(embeddings, labels)
    index = head.take_sampled()[0].index
    remapped = torch.searchsorted(index, labels)
    assert torch.equal(index[remapped], labels)
    expected = reference_loss(embeddings, head.weight[index], remapped, 16.0, 1.0, 0.5, 0.0)
    assert relative_error(loss.detach(), expected) < 1e-12


def test_initial_centers_do_not_depend_on_the_number_of_ranks():
    from partial_fc.heads.partial_fc import INIT_BLOCK_ROWS, initialise_centers

    classes = 2 * INIT_BLOCK_ROWS + 100
    whole = torch.empty(classes, 4)
    initialise_centers(whole, 0, seed=3, std=0.01)
    assert 0.009 < whole.std().item() < 0.011
    for start, end in [(0, 5000), (5000, INIT_BLOCK_ROWS + 7), (INIT_BLOCK_ROWS + 7, classes)]:
        shard = torch.empty(end - start, 4)
        initialise_centers(shard, start, seed=3, std=0.01)
        assert torch.equal(shard, whole[start:end])
