"""The distributed epoch sampler: partition, determinism, mid-epoch restore, batches; the data layer's imports."""

import ast
import itertools
import pickle

import numpy as np
import pytest

from partial_fc.data.sampler import DistributedEpochSampler, EpochBatchSampler, SeededBatch, position_uniforms
from partial_fc.errors import InputError
from tests.launchers import REPO

DATA = REPO / "partial_fc" / "data"


def _epoch(n, world, epoch=0, **kwargs):
    ranks = []
    for rank in range(world):
        sampler = DistributedEpochSampler(n, rank, world, **kwargs)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


@pytest.mark.parametrize("n,world", [(12, 3), (13, 4), (10, 1), (3, 5), (101, 8)])
def test_ranks_cover_the_epoch_with_equal_counts(n, world):
    ranks = _epoch(n, world, seed=7)
    per_rank = -(-n // world)
    assert all(len(r) == per_rank for r in ranks)
    flat = list(itertools.chain(*ranks))
    assert set(flat) == set(range(n))
    assert len(flat) - n == per_rank * world - n  # only the wrap-around padding repeats
    if n % world == 0:
        assert len(set(flat)) == len(flat)  # disjoint


@pytest.mark.parametrize("n,world", [(13, 4), (12, 3), (3, 5)])
def test_drop_last_ranks_are_disjoint(n, world):
    ranks = _epoch(n, world, seed=1, drop_last=True)
    assert all(len(r) == n // world for r in ranks)
    flat = list(itertools.chain(*ranks))
    assert len(set(flat)) == len(flat) == (n // world) * world


def test_deterministic_per_seed_and_epoch():
    assert _epoch(50, 2, epoch=3, seed=9) == _epoch(50, 2, epoch=3, seed=9)
    assert _epoch(50, 2, epoch=3, seed=9) != _epoch(50, 2, epoch=4, seed=9)
    assert _epoch(50, 2, epoch=3, seed=9) != _epoch(50, 2, epoch=3, seed=10)


def test_no_shuffle_is_strided_order():
    assert _epoch(7, 2, shuffle=False) == [[0, 2, 4, 6], [1, 3, 5, 0]]


@pytest.mark.parametrize("consumed", [0, 1, 6, 13, 14])
def test_restore_continues_exactly(consumed):
    full = DistributedEpochSampler(55, 1, 4, seed=3)
    full.set_epoch(2)
    uninterrupted = list(full)

    before = DistributedEpochSampler(55, 1, 4, seed=3)
    before.set_epoch(2)
    head = list(itertools.islice(iter(before), consumed))
    before.advance(consumed)
    state = pickle.loads(pickle.dumps(before.state_dict()))
    assert state["epoch"] == 2 and state["position"] == consumed

    after = DistributedEpochSampler(55, 1, 4, seed=3)
    after.load_state_dict(state)
    after.set_epoch(2)  # a training loop sets the epoch again after restoring: the position stays
    assert after.remaining == 14 - consumed
    assert head + list(after) == uninterrupted


def test_epoch_change_resets_position_and_iteration_does_not_consume():
    sampler = DistributedEpochSampler(10, 0, 2)
    assert list(sampler) == list(sampler)  # iterating is pure: only advance() consumes
    sampler.advance(3)
    assert sampler.position == 3 and len(list(sampler)) == 2
    sampler.set_epoch(1)
    assert sampler.position == 0 and len(sampler) == 5
    with pytest.raises(InputError, match="only 5 remain"):
        sampler.advance(6)


def test_bad_arguments_and_states_are_refused():
    with pytest.raises(InputError, match="rank 2"):
        DistributedEpochSampler(10, 2, 2)
    with pytest.raises(InputError, match="dataset_len"):
        DistributedEpochSampler(0, 0, 1)
    sampler = DistributedEpochSampler(10, 0, 2)
    with pytest.raises(InputError, match="world_size=4"):
        sampler.load_state_dict({"epoch": 0, "position": 1, "world_size": 4})
    with pytest.raises(InputError, match="past the epoch"):
        sampler.load_state_dict({"epoch": 0, "position": 6})
    sampler.load_state_dict({"epoch": 5, "position": 2})  # the two keys alone are enough
    assert (sampler.epoch, sampler.position) == (5, 2)


def test_batches_carry_global_positions_and_resume_aligned():
    sampler = DistributedEpochSampler(23, 1, 2, seed=4)
    batches = EpochBatchSampler(sampler, 5, drop_last=False, seed=8)
    all_batches = list(batches)
    assert len(batches) == len(all_batches) == 3 and [len(b) for b in all_batches] == [5, 5, 2]
    assert list(itertools.chain(*all_batches)) == list(sampler)
    assert all(b.seed == (8, 0) for b in all_batches)
    assert list(itertools.chain(*(b.positions for b in all_batches))) == list(range(1, 24, 2))  # rank 1 of 2
    assert len(EpochBatchSampler(sampler, 5, drop_last=True)) == 2
    sampler.advance(5)
    rest = list(batches)
    assert [b.positions for b in rest] == [b.positions for b in all_batches[1:]] and rest == all_batches[1:]
    copy = pickle.loads(pickle.dumps(rest[0]))  # crosses to DataLoader workers intact
    assert isinstance(copy, SeededBatch) and copy == rest[0] and np.array_equal(copy.uniforms(), rest[0].uniforms())


def test_augmentation_draws_are_the_same_for_any_number_of_ranks():
    """A sample's draw follows its global position: one rank with batch 2B sees what two ranks with B see."""

    def draws(world_size: int, batch: int) -> dict[int, float]:
        found = {}
        for rank in range(world_size):
            sampler = DistributedEpochSampler(48, rank, world_size, seed=3)
            sampler.set_epoch(2)
            for seeded in EpochBatchSampler(sampler, batch, drop_last=True, seed=6):
                found.update(zip(seeded.positions, seeded.uniforms()))
        return found

    one, two, three = draws(1, 8), draws(2, 4), draws(3, 2)
    assert one == two == three and sorted(one) == list(range(48))
    values = np.array(list(one.values()))
    assert 0.0 <= values.min() and values.max() < 1.0 and 0.3 < values.mean() < 0.7
    assert len(set(values.tolist())) == len(values)
    assert not np.array_equal(position_uniforms(6, 3, np.arange(48)), position_uniforms(6, 2, np.arange(48)))
    assert not np.array_equal(position_uniforms(7, 2, np.arange(48)), position_uniforms(6, 2, np.arange(48)))


FORBIDDEN = ("partial_fc.comm", "partial_fc.heads", "partial_fc.engine", "partial_fc.cli", "torch.distributed")


@pytest.mark.parametrize("module", ["decode", "datasets", "sampler", "loader"])
def test_data_layer_imports_no_higher_layer(module):
    tree = ast.parse((DATA / f"{module}.py").read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [n for n in names if n.startswith(FORBIDDEN)]


def test_indices_are_int64_and_read_only():
    indices = DistributedEpochSampler(9, 0, 1).indices()
    assert indices.dtype == np.int64 and not indices.flags.writeable
