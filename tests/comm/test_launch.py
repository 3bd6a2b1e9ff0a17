"""Which backend a launch gets, read from the environment each launcher sets."""

import pytest

from partial_fc.comm import choose_backend, detect_launch
from partial_fc.comm import launch as launch_module
from partial_fc.heads import shard_range

HOROVODRUN = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_each_launcher_is_recognised():
    assert detect_launch(HOROVODRUN) == launch_module.LaunchInfo("horovodrun", 1, 4, 1)
    assert detect_launch(MPIRUN) == launch_module.LaunchInfo("mpirun", 2, 3, 0)
    assert detect_launch(TORCHRUN) == launch_module.LaunchInfo("torchrun", 3, 8, 3)
    assert detect_launch({}) == launch_module.LaunchInfo("none", 0, 1, 0)


def test_backend_follows_the_launcher(monkeypatch):
    assert choose_backend("auto", HOROVODRUN) == "horovod"
    assert choose_backend("auto", TORCHRUN) == "torch"
    assert choose_backend("auto", {}) == "single"
    monkeypatch.setattr(launch_module, "horovod_available", lambda: False)
    assert choose_backend("auto", MPIRUN) == "torch"
    monkeypatch.setattr(launch_module, "horovod_available", lambda: True)
    assert choose_backend("auto", MPIRUN) == "horovod"


def test_backend_can_be_named():
    assert choose_backend("auto", {**MPIRUN, "PARTIAL_FC_COMM": "torch"}) == "torch"
    assert choose_backend("single", HOROVODRUN) == "single"
    with pytest.raises(ValueError, match="nccl"):
        choose_backend("nccl", {})


@pytest.mark.parametrize("classes, world", [(10, 3), (7, 7), (1_000_003, 16), (5, 1)])
def test_shards_are_contiguous_and_cover_every_class(classes, world):
    shards = [shard_range(classes, world, rank) for rank in range(world)]
    assert shards[0][0] == 0
    for (start, count), (next_start, _) in zip(shards, shards[1:]):
        assert next_start == start + count
    assert sum(count for _, count in shards) == classes
    assert max(c for _, c in shards) - min(c for _, c in shards) <= 1
    assert [c for _, c in shards] == sorted((c for _, c in shards), reverse=True)
