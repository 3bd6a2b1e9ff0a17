"""The head table (`perf/tables.py`): a row per run, those not run or failed included, and its warnings."""

from __future__ import annotations

import json

from partial_fc.perf.tables import head_table, read_lines


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
