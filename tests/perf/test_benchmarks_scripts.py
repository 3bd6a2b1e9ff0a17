"""The benchmark scripts run end to end at tiny sizes: `benchmarks/gpu.sh --dry-run` (on the CPU) and
`benchmarks/head.sh`'s table, with a configuration that does not fit the (pretended) memory."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from partial_fc.perf.tables import read_lines
from tests.launchers import REPO

# The 1M-class stand-in; the 10M-class stand-in's full softmax needs ~0.55 GiB for the head, its Partial FC ~0.12.
SMALL, BIG, DIM, BATCH = 2000, 2_000_000, 8, 64


def _run(script: str, *arguments: str, timeout: int, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    return subprocess.run(
        ["bash", f"benchmarks/{script}", *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_gpu_sh_dry_run_runs_every_step_and_writes_its_summary(tmp_path):
    job = _run("gpu.sh", "--dry-run", timeout=300, OUT=str(tmp_path), TIME_BUDGET="200")
    assert job.returncode == 0, job.stdout + job.stderr
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [step["step"] for step in steps] == [
        "tests",
        "head 2000 r=1.0",
        "head 2000 r=0.1",
        "head 20000 r=1.0",
        "head 20000 r=0.1",
        "matmul",
        "train r10_nano bfloat16",
    ]
    assert all(step["status"] == 0 for step in steps), steps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests"]["passed"] >= 1 and summary["tests"]["failures"] == summary["tests"]["errors"] == 0
    assert [(row["classes"], row["sample_rate"]) for row in summary["head"]] == [
        (2000, 1.0),
        (2000, 0.1),
        (20000, 1.0),
        (20000, 0.1),
    ]
    assert all(row["peak_memory_gib"] > 0 and "warnings" in row for row in summary["head"])
    assert summary["head"][-1]["storage_dtype"] == "bfloat16"  # BIG_OPTS on the big rows
    assert set(summary["matmul"]["tflops"]) == {"float32", "bfloat16"}
    (train,) = summary["train"]
    assert train["network"] == "r10_nano" and train["channels_last"] and train["images_per_s"] > 0
    assert train["percent_of_matmul"] > 0 and train["train_gflops_per_image"] == pytest.approx(0.173, abs=0.01)
    text = (tmp_path / "summary.md").read_text()
    for part in (
        "## Tests (CUDA paths)",
        "passed, 0 failed",
        "## Matmul rate",
        "bfloat16",
        "| classes | r |",
        "model parallel (full softmax)",
        "Partial FC",
        "img/s",
        "% of the bfloat16 matmul rate",
    ):
        assert part in text, part
    assert text in job.stdout


def test_gpu_sh_without_a_gpu_says_to_use_the_dry_run(tmp_path):
    job = _run("gpu.sh", timeout=60, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert job.returncode == 2 and "no CUDA device" in job.stderr and "--dry-run" in job.stderr


def test_head_sh_prints_the_table_with_a_row_that_does_not_fit(tmp_path):
    from partial_fc.perf.memory import GIB, estimate_head_memory

    full, partial = (estimate_head_memory(BIG, DIM, BATCH, rate, 1, "bfloat16").total / GIB for rate in (1.0, 0.1))
    available = 0.35 + (full + partial) / 2  # a process (~0.35 GiB) and the Partial FC head fit, the full softmax not
    job = _run(
        "head.sh",
        timeout=400,
        CLASSES=str(SMALL),
        BIG_CLASSES=str(BIG),
        DIM=str(DIM),
        BATCH=str(BATCH),
        STEPS="1",
        NP="1",
        PARTIAL_FC_AVAILABLE_GIB=f"{available:.3f}",
        JSON_OUT=str(tmp_path / "head.jsonl"),
    )
    assert job.returncode == 0, job.stdout + job.stderr
    rows = read_lines((tmp_path / "head.jsonl").read_text(), "head")
    assert [(row["classes"], row["sample_rate"], row["fits"]) for row in rows] == [
        (SMALL, 1.0, True),
        (SMALL, 0.1, True),
        (BIG, 1.0, False),
        (BIG, 0.1, True),
    ]
    table = job.stdout[job.stdout.index("| classes | r |") :].splitlines()
    body = [line for line in table if line.startswith("| ")][2:]
    assert len(body) == 4
    assert body[0].startswith(f"| {SMALL:,} | 1 | model parallel (full softmax) |")
    assert body[1].startswith(f"| {SMALL:,} | 0.1 | Partial FC |")
    assert body[2].startswith(f"| {BIG:,} | 1 | model parallel (full softmax) |") and "| bfloat16 |" in body[2]
    assert "does not fit: needs ~" in body[2] and f"GiB per rank, {available:.1f} GiB available |" in body[2]
    assert body[3].startswith(f"| {BIG:,} | 0.1 | Partial FC |") and "| bfloat16 |" in body[3]
    assert "does not fit" not in body[3] and "| - |" not in body[3]
    assert "not run: does not fit" in job.stderr


def test_head_sh_names_its_modes():
    job = _run("head.sh", "nonsense", timeout=30)
    assert job.returncode == 2 and "usage: bash benchmarks/head.sh [table|backends|all]" in job.stderr
