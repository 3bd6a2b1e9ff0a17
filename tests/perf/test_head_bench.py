"""`bench head` (`perf/head_bench.py`): its conditions and warnings in the JSON, and a head that does not fit
reported instead of run."""

from __future__ import annotations

import re

import pytest

from partial_fc.perf import head_bench
from partial_fc.perf.tables import read_lines
from tests.cli_helpers import call
from tests.perf.conftest import CONDITION_KEYS


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
    monkeypatch.setattr(head_bench.MatmulFloor, "seconds", lambda self: next(timings))
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
    monkeypatch.setattr(head_bench, "reference_floor", None)  # going on past the check would fail the test
    status, out, err = call(capsys, "bench", "head", "--classes", "3000", "--dim", "16", "--batch", "8")
    assert status == 0, err
    (result,) = read_lines(out, "head")
    assert result["fits"] is False and result["available_memory_gib"] == 0.01
    needs = float(re.fullmatch(r"does not fit: needs ~([\d.]+) GiB per rank, 0\.0 GiB available", result["message"])[1])
    assert needs == pytest.approx(result["estimated_memory_gib"], abs=0.05)  # the process as it is, plus the head
    assert "step_s" not in result and "not run: does not fit" in err
    for key in CONDITION_KEYS:
        assert key in result, key
