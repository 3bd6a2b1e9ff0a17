"""Bad input on one rank: one clear error naming the value on every rank, every rank exits non-zero, no hang."""

import pytest

from tests.launchers import launch, worker

CASES = {
    "label_too_large": "input on rank 1: label 10 is outside [0, 10)",
    "label_negative": "input on rank 1: label -7 is outside [0, 10)",
    "wrong_width": "input on rank 1: embeddings must be [batch, 8], got width 9",
    "nan_embeddings": "input on rank 1: embeddings contain NaN",
    "sample_rate_mismatch": "sample_rate differs between ranks (rank 0: 0.5, rank 1: 1.5)",
    "sample_rate_zero": "sample_rate=0.0 must lie in (0, 1]",
    "few_classes": "num_classes=1 is fewer than the 2 ranks",
}


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_fails_with_the_same_clear_error(tmp_path, launcher, case):
    job = launch(launcher, 2, [worker("bad_input.py"), "--case", case, "--out", str(tmp_path)], timeout=120)
    output = job.stdout + job.stderr
    assert job.returncode != 0, output
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.exit").read_text() == "2", output
    # one error per rank (launchers may interleave the ranks' lines, so count occurrences)
    assert output.count("partial-fc: error:") == 2, output
    assert output.count(CASES[case]) == 2, output
