"""`bench eval-ijb` (`perf/ijb_bench.py`): the conditions in both of its JSON lines."""

from __future__ import annotations

from partial_fc.perf.tables import read_lines
from tests.cli_helpers import call
from tests.perf.conftest import CONDITION_KEYS


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
