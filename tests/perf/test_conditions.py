"""Benchmark conditions: load, core-wait, steal and floor warnings (`perf/conditions.py`)."""

from __future__ import annotations

import io
import math
import multiprocessing
import time

import pytest

from partial_fc.perf import conditions as conditions_module
from partial_fc.perf.conditions import BenchConditions, print_warnings


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
