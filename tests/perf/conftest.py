"""What the benchmark tests share: the condition keys every benchmark's JSON states, and a settable load."""

from __future__ import annotations

import math

import pytest

from partial_fc.perf import conditions as conditions_module

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
