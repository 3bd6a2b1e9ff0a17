"""Benchmark conditions and memory: load and floor warnings, the conditions in `bench head`'s JSON, the head's
memory estimate against a measured peak, the "does not fit" answer, and the head table."""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import re
import subprocess
import sys
import time

import pytest

from partial_fc.cli import bench
from partial_fc.heads.partial_fc import CPU_CHUNK_ROWS
from partial_fc.perf import conditions as conditions_module
from partial_fc.perf.conditions import BenchConditions, print_warnings
from partial_fc.perf.memory import GIB, estimate_head_memory
from partial_fc.perf.tables import head_table, read_lines
from tests.cli_helpers import call
from tests.launchers import REPO

CONDITION_KEYS = (
    "load_average_start",
    "load_average_end",
    "load_average_max",
    "cores",
    "threads_per_rank",
    "ranks",
    "steal_share",
    "warnings",
)


@pytest.fixture
def load(monkeypatch):
    """Set the 1-min load average the benchmarks read, on a 2-core machine that cannot tell a thread's wait."""
    monkeypatch.setattr(conditions_module, "core_count", lambda: 2)
    monkeypatch.setattr(conditions_module, "runqueue_wait_s", lambda: math.nan)
    monkeypatch.setattr(conditions_module, "cpu_ticks", lambda: (0, 0))  # no steal readings

    def set_load(value: float) -> None:
        monkeypatch.setattr(conditions_module.os, "getloadavg", lambda: (value, value, value))

    return set_load


def test_a_loaded_machine_warns_and_a_quiet_one_does_not(load):
    load(0.4)
    quiet = BenchConditions(ranks=2).finish(threads_per_rank=1)
    assert quiet["warnings"] == [] and quiet["cores"] == 2 and quiet["ranks"] == 2
    assert quiet["load_average_start"] == quiet["load_average_end"] == 0.4
    conditions = BenchConditions()
    load(3.5)  # other work arrives during the run
    conditions.sample()
    load(1.0)
    loaded = conditions.finish()
    assert loaded["load_average_max"] == 3.5 and loaded["load_average_end"] == 1.0
    assert len(loaded["warnings"]) == 1 and "load average reached 3.50 on 2 cores" in loaded["warnings"][0]
    stream = io.StringIO()
    print_warnings("bench x", loaded, stream)
    assert stream.getvalue().startswith("bench x: warning: machine loaded:")


def test_a_high_load_average_warns_only_when_the_compute_thread_waited_for_a_core(load, monkeypatch):
    load(2.8)  # what a benchmark's own 2 ranks and their background threads read on 2 cores
    for waited_s, warned in ((0.02, False), (0.2, True)):
        clock = iter([100.0, 101.0])  # one second from start to finish
        waits = iter([5.0, 5.0 + waited_s])
        monkeypatch.setattr(conditions_module, "runqueue_wait_s", lambda: next(waits))
        monkeypatch.setattr(conditions_module.time, "perf_counter", lambda: next(clock))
        fields = BenchConditions(ranks=2).finish(threads_per_rank=1)
        assert fields["compute_thread_wait_share"] == pytest.approx(waited_s)
        assert bool(fields["warnings"]) == warned
    assert "compute thread waited for a core 20% of the run" in fields["warnings"][0]
    assert "load average reached 2.80 on 2 cores" in fields["warnings"][0]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(math.isnan(conditions_module.runqueue_wait_s()), reason="no Linux schedstat here")
def test_a_thread_that_shares_its_core_is_measured_waiting():
    """Real contention: more spinning processes than cores make this thread wait a third of the time or more."""
    spinners = [multiprocessing.Process(target=_spin, args=(3.0,)) for _ in range(2 * conditions_module.core_count())]
    for spinner in spinners:
        spinner.start()
    try:
        conditions = BenchConditions()
        _spin(1.0)
        fields = conditions.finish()
    finally:
        for spinner in spinners:
            spinner.join()
    assert fields["compute_thread_wait_share"] > 0.25
    assert any("compute thread waited for a core" in warning for warning in fields["warnings"])


def test_time_stolen_by_the_hypervisor_warns(load, monkeypatch):
    load(0.3)
    for stolen, warned in ((30, False), (80, True)):  # ticks stolen of 1000 over the run
        ticks = iter([(500, 10_000), (500 + stolen, 11_000)])
        monkeypatch.setattr(conditions_module, "cpu_ticks", lambda: next(ticks))
        fields = BenchConditions(ranks=2).finish(threads_per_rank=1)
        assert fields["steal_share"] == pytest.approx(stolen / 1000)
        assert bool(fields["warnings"]) == warned
    assert "the hypervisor stole 8% of this machine's CPU time" in fields["warnings"][0]


def test_the_steal_reading_comes_from_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 10 1 2 30 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k)
    )
    assert conditions_module.cpu_ticks() == (30, 998)  # guest time is already inside user time
    assert conditions_module.steal_share((30, 998), (45, 1098)) == pytest.approx(0.15)
    assert math.isnan(conditions_module.steal_share((30, 998), (30, 998)))  # no time passed: no reading


def test_a_floor_much_slower_than_its_reference_warns(load):
    load(0.1)
    for median, warned in ((1.2, False), (1.3, True)):
        conditions = BenchConditions()
        conditions.record_floor(reference_s=1.0, median_s=median)
        fields = conditions.finish()
        assert fields["floor_over_reference"] == pytest.approx(median) and fields["matmul_floor_reference_s"] == 1.0
        assert bool(fields["warnings"]) == warned
    assert "1.30x slower" in fields["warnings"][0]
    conditions = BenchConditions()
    conditions.record_floor(reference_s=1e-5, median_s=1e-4)  # toy sizes: cache effects, not load
    assert conditions.finish()["warnings"] == []


def _bench_head(capsys, *extra: str) -> tuple[dict, str]:
    status, out, err = call(
        capsys,
        "bench",
        "head",
        "--classes",
        "3000",
        "--dim",
        "16",
        "--batch",
        "8",
        "--sample-rate",
        "0.5",
        "--steps",
        "2",
        *extra,
    )
    assert status == 0, err
    (result,) = read_lines(out, "head")
    return result, err


@pytest.mark.parametrize("case", ["quiet", "loaded", "slow_floor"])
def test_bench_head_states_its_conditions_and_warns_when_loaded(capsys, monkeypatch, load, case):
    load(5.0 if case == "loaded" else 0.2)
    # The floor's timings: 3 alone at start (the reference), then one after each step.
    timings = iter([0.01] * 3 + [0.02 if case == "slow_floor" else 0.01] * 10)
    monkeypatch.setattr(bench.MatmulFloor, "seconds", lambda self: next(timings))
    result, err = _bench_head(capsys)
    for key in CONDITION_KEYS:
        assert key in result, key
    assert result["ranks"] == 1 and result["cores"] == 2 and result["threads_per_rank"] >= 1
    assert result["matmul_floor_reference_s"] == 0.01 and result["fits"] is True
    if case == "quiet":
        assert result["warnings"] == [] and "warning" not in err
    else:
        expected = "load average reached 5.00" if case == "loaded" else "matmul floor ran 2.00x slower"
        assert len(result["warnings"]) == 1 and expected in result["warnings"][0]
        assert f"partial-fc bench head: warning: {result['warnings'][0]}" in err


def test_a_head_that_does_not_fit_is_reported_not_run(capsys, monkeypatch, load):
    load(0.2)
    monkeypatch.setenv("PARTIAL_FC_AVAILABLE_GIB", "0.01")
    monkeypatch.setattr(bench, "_reference_floor", None)  # going on past the check would fail the test
    status, out, err = call(capsys, "bench", "head", "--classes", "3000", "--dim", "16", "--batch", "8")
    assert status == 0, err
    (result,) = read_lines(out, "head")
    assert result["fits"] is False and result["available_memory_gib"] == 0.01
    needs = float(re.fullmatch(r"does not fit: needs ~([\d.]+) GiB per rank, 0\.0 GiB available", result["message"])[1])
    assert needs == pytest.approx(result["estimated_memory_gib"], abs=0.05)  # the process as it is, plus the head
    assert "step_s" not in result and "not run: does not fit" in err
    for key in CONDITION_KEYS:
        assert key in result, key


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


def test_the_head_table_has_a_row_per_run_including_those_not_run():
    ran = {
        "bench": "head",
        "backend": "horovod",
        "device": "cpu",
        "ranks": 2,
        "classes": 1_000_000,
        "batch_per_rank": 128,
        "sample_rate": 0.1,
        "storage_dtype": "float32",
        "update": "backward",
        "step_s": 1.5,
        "matmul_floor_s": 1.25,
        "step_over_floor": 1.2,
        "peak_memory_gib": 2.37,
        "estimated_memory_gib": 2.35,
        "fits": True,
        "load_average_start": 0.8,
        "load_average_end": 2.9,
        "load_average_max": 2.9,
        "cores": 2,
        "threads_per_rank": 1,
        "floor_over_reference": 1.3,
        "matmul_floor_reference_s": 0.96,
        "warnings": ["machine loaded: ..."],
    }
    too_big = {
        "bench": "head",
        "classes": 10_000_000,
        "sample_rate": 1.0,
        "storage_dtype": "bfloat16",
        "fits": False,
        "estimated_memory_gib": 14.8,
        "message": "does not fit: needs ~14.8 GiB per rank, 10.2 GiB available",
    }
    failed = {
        "bench": "head",
        "failed": "exit status 137",
        "command": ["--classes", "10000000", "--sample-rate", "0.1", "--storage-dtype", "bfloat16"],
    }
    lines = "\n".join(["noise", f"[1,0]<stdout>:{json.dumps(ran)}", json.dumps(too_big), json.dumps(failed)])
    table = head_table(read_lines(lines, "head")).splitlines()
    assert table[0].startswith("| classes | r | method |") and len([row for row in table if row.startswith("| ")]) == 5
    assert (
        "| 1,000,000 | 0.1 | Partial FC | horovod | float32 | in backward | 1.5 | 1.25 | 1.20 | 170.7 | 2.370 |"
        in table[2]
    )
    assert "warning: loaded, load average 2.9 on 2 cores; warning: loaded, floor 1.3x its reference" in table[2]
    assert "| 10,000,000 | 1 | model parallel (full softmax) |" in table[3]
    assert table[3].endswith("| does not fit: needs ~14.8 GiB per rank, 10.2 GiB available |")
    assert "| 10,000,000 | 0.1 | Partial FC | - | bfloat16 |" in table[4] and "failed: exit status 137" in table[4]
    own_ranks = {**ran, "compute_thread_wait_share": 0.02, "floor_over_reference": 1.0}  # load 2.9 from its own ranks
    waited = {**own_ranks, "compute_thread_wait_share": 0.12}
    stolen = {**own_ranks, "steal_share": 0.09}
    quiet_row, loaded_row, stolen_row = head_table([own_ranks, waited, stolen]).splitlines()[2:5]
    assert (
        quiet_row.endswith("| 2.350 |  |") and "warning: loaded, the compute thread waited 12% for a core" in loaded_row
    )
    assert stolen_row.endswith("| warning: loaded, the hypervisor stole 9% of the CPU time |")
    assert "2 rank(s) x 1 thread(s) on cpu, 2 cores" in table[-1] and "1 of 1 runs warned" in table[-1]


def test_bench_eval_ijb_states_its_conditions(capsys, load):
    load(9.0)
    status, out, err = call(
        capsys,
        "bench",
        "eval-ijb",
        "--identities",
        "3",
        "--pairs",
        "2000",
        "--network",
        "r10_nano",
        "--embedding-size",
        "32",
        "--batch-size",
        "8",
    )
    assert status == 0, err
    lines = read_lines(out, "eval-ijb embed") + read_lines(out, "eval-ijb scoring")
    assert len(lines) == 2
    for result in lines:
        assert all(key in result for key in CONDITION_KEYS) and "load average reached 9.00" in result["warnings"][0]
    assert err.count("partial-fc bench eval-ijb: warning: machine loaded") == 2
