"""The head's memory estimate (`perf/memory.py`): its terms at 10M classes, and against the peak measured in a
fresh `bench head` process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partial_fc.heads.partial_fc import CPU_CHUNK_ROWS
from partial_fc.perf.memory import GIB, estimate_head_memory
from partial_fc.perf.tables import read_lines
from tests.launchers import REPO


def test_the_estimate_of_the_ten_million_class_head():
    """2 ranks, D=512, 128 per rank: the shard and momentum, the [5M, 256] logits at r = 1.0, in bfloat16."""
    full = estimate_head_memory(10_000_000, 512, 256, 1.0, 2, "bfloat16")
    partial = estimate_head_memory(10_000_000, 512, 256, 0.1, 2, "bfloat16")
    compact = estimate_head_memory(10_000_000, 512, 256, 0.1, 2, "bfloat16", momentum_dtype="int8")
    shard = 5_000_000 * 512 * 2
    assert full.shard == partial.shard == full.optimizer_state == shard
    assert full.softmax > 5_000_000 * 256 * 4 and full.total / GIB == pytest.approx(14.4, abs=0.1)
    assert partial.total / GIB == pytest.approx(10.1, abs=0.1)
    assert compact.optimizer_state == 5_000_000 * (512 + 4) and compact.total < partial.total - 2 * GIB
    step = estimate_head_memory(10_000_000, 512, 256, 0.1, 2, "bfloat16", update_in_step=True)
    assert step.softmax - partial.softmax == 500_000 * 512 * 4  # the kept gradient (one fewer workspace)
    assert step.workspaces == partial.workspaces - CPU_CHUNK_ROWS * 512 * 4


def _bench_head_takes(*options: str) -> bool:
    from partial_fc.cli.main import build_parser

    try:
        build_parser().parse_args(["bench", "head", *options])
    except SystemExit:
        return False
    return True


# A head small enough for the tests, big enough for its memory to stand out of the process's.
SMALL_HEAD = "--classes 300000 --dim 128 --batch 64 --steps 1 --warmup 2 --reference-repeats 1"


@pytest.mark.parametrize(
    "options",
    [
        ["--sample-rate", "1.0"],
        ["--sample-rate", "0.1"],
        ["--sample-rate", "0.1", "--storage-dtype", "bfloat16", "--update-in-step"],
        ["--sample-rate", "0.1", "--momentum-dtype", "int8"],
    ],
    ids=["full", "partial", "bf16_step", "int8_momentum"],
)
def test_the_memory_estimate_matches_the_measured_peak(options):
    """A fresh process's peak RSS over the head's steps against the estimate made before the head existed."""
    if not _bench_head_takes(*options):
        pytest.skip(f"bench head has no {' '.join(options)}")
    job = subprocess.run(
        [sys.executable, "-m", "partial_fc", "bench", "head", *SMALL_HEAD.split(), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr
    (result,) = read_lines(job.stdout, "head")
    head_measured = result["peak_memory_gib"] - result["baseline_memory_gib"]
    assert result["head_estimate_gib"] > 0.15
    assert abs(result["head_estimate_gib"] - head_measured) <= 0.1 * head_measured + 0.03, result
    assert abs(result["estimated_memory_gib"] - result["peak_memory_gib"]) <= 0.1 * head_measured + 0.05, result
