"""The `partial-fc` command: benchmark output, the demo in one process, bad options."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launchers import REPO, launch


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "partial_fc", *arguments], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_bench_head_prints_one_json_line_with_every_figure():
    job = launch(
        "mpirun",
        2,
        [
            "-m",
            "partial_fc",
            "bench",
            "head",
            "--classes",
            "20000",
            "--dim",
            "64",
            "--batch",
            "32",
            "--sample-rate",
            "0.1",
            "--steps",
            "3",
        ],
    )
    assert job.returncode == 0, job.stdout + job.stderr
    line = next(line for line in job.stdout.splitlines() if '"bench": "head"' in line)
    result = json.JSONDecoder().raw_decode(line[line.index("{") :])[0]
    assert result["ranks"] == 2 and result["sampled_per_rank"] == 1000
    for key in ("forward_s", "backward_s", "update_s", "step_s", "matmul_floor_s", "peak_memory_gib"):
        assert result[key] > 0, key
    assert result["step_s"] >= result["forward_s"] + result["backward_s"] + result["update_s"] - 1e-4
    rounding = 5e-6 / result["matmul_floor_s"] + 5e-6 / result["step_s"]  # both printed to 5 decimals
    assert result["step_over_floor"] == pytest.approx(result["step_s"] / result["matmul_floor_s"], rel=1e-2 + rounding)


def test_demo_in_one_process_learns():
    job = run_cli("demo", "--steps", "40", "--classes", "200", "--batch", "64", "--log-every", "10")
    assert job.returncode == 0, job.stderr
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["backend"] == "single" and result["last_loss"] < 0.6 * result["first_loss"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["demo", "--sample-rate", "2"], "sample_rate=2.0 must lie in (0, 1]"),
        (["demo", "--classes", "0"], "num_classes=0"),
        (["demo", "--margin", "1,0.5"], "--margin '1,0.5'"),
        (["demo", "--scale", "-1"], "scale s=-1.0"),
    ],
)
def test_bad_options_fail_with_one_clear_message(arguments, message):
    job = run_cli(*arguments)
    assert job.returncode == 2
    assert message in job.stderr and "Traceback" not in job.stderr


def make_set(out: Path, identities: int, per_id: int) -> None:
    """A generated face set of `identities` x `per_id` images in `out`, without verification pairs."""
    job = run_cli(
        "make-synthetic",
        "--identities",
        str(identities),
        "--images-per-id",
        str(per_id),
        "--out",
        str(out),
        "--pairs",
        "0",
        "--workers",
        "1",
    )
    assert job.returncode == 0


def test_bench_data_prints_every_stage(tmp_path):
    make_set(tmp_path, 6, 5)
    job = run_cli(
        "bench", "data", "--rec", str(tmp_path), "--images", "30", "--batch", "8", "--workers", "1", "--repeats", "1"
    )
    assert job.returncode == 0, job.stderr
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["images"] == 30 and result["decoder"] in ("simplejpeg", "turbojpeg", "cv2")
    for stage in ("plain_read_imdecode", "read", "decode", "flip", "pipeline", "normalize_cpu", "loader_per_worker"):
        assert result[f"{stage}_img_s"] > 0, stage
    assert result["pipeline_over_plain"] == pytest.approx(
        result["pipeline_img_s"] / result["plain_read_imdecode_img_s"], rel=1e-2
    )


def test_bench_data_names_a_missing_set(tmp_path):
    job = run_cli("bench", "data", "--rec", str(tmp_path / "nowhere"))
    assert job.returncode == 2 and "nowhere" in job.stderr and "Traceback" not in job.stderr


def test_rebuild_idx_restores_a_lost_index(tmp_path):
    make_set(tmp_path, 3, 2)
    original = (tmp_path / "train.idx").read_bytes()
    (tmp_path / "train.idx").unlink()
    job = run_cli("rebuild-idx", str(tmp_path / "train.rec"))
    assert job.returncode == 0 and (tmp_path / "train.idx").read_bytes() == original
    missing = run_cli("rebuild-idx", str(tmp_path / "gone.rec"))
    assert missing.returncode == 2 and "gone.rec: no such RecordIO file" in missing.stderr
