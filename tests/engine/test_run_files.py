"""Rank 0's running records on a full or read-only disk: one warning each, no traceback, training goes on."""

import contextlib
import subprocess
import sys

from partial_fc.engine.monitor import TrainMonitor
from tests import mounts
from tests.launchers import REPO

RECORDS = """
import os, sys
from pathlib import Path
from partial_fc.engine.run_files import MetricsFile, TensorBoardFile
root = Path(sys.argv[1])
if sys.argv[2] == "full":
    board, metrics = TensorBoardFile(root / "tensorboard"), MetricsFile(root / "metrics.jsonl", append=False)
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    (root / "ballast").write_bytes(bytes(free))
else:
    os.system(f"mount -o remount,ro {root}")
    board, metrics = TensorBoardFile(root / "tensorboard"), MetricsFile(root / "metrics.jsonl", append=True)
for step in range(3000):
    board.scalars(step, {"loss": 1.0, "learning_rate": 0.1})
    metrics.write({"step": step, "loss": 1.0})
board.close()
metrics.close()
print("trained on")
"""


def test_metrics_and_tensorboard_on_a_full_or_read_only_disk_warn_once_each(tmp_path):
    for case, cause in (("full", "No space left on device (ENOSPC)"), ("read_only", "Read-only file system (EROFS)")):
        disk = tmp_path / case
        done = subprocess.run(
            [*mounts.full_disk(disk, 256, tmp_path / f"{case}_kept"), sys.executable, "-c", RECORDS, str(disk), case],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0 and done.stdout == "trained on\n" and "Traceback" not in done.stderr, done.stderr
        assert sorted(done.stderr.splitlines()) == [
            f"partial-fc: warning: cannot write {disk / 'metrics.jsonl'}: {cause}; no more metrics are written in "
            "this run (training goes on)",
            f"partial-fc: warning: cannot write {disk / 'tensorboard'}: {cause}; no more TensorBoard events are "
            "written in this run (training goes on)",
        ], done.stderr


def test_a_log_on_a_full_disk_warns_once(monkeypatch, capfd):
    monitor = TrainMonitor(rank=0, world_size=1, total_steps=10, frequent=1, output=None)
    full = open("/dev/full", "w")
    monkeypatch.setattr(sys, "stdout", full)
    monitor.print("step 1")
    monitor.print("step 2")
    monkeypatch.undo()
    with contextlib.suppress(OSError):  # what is still buffered cannot be written either
        full.close()
    err = capfd.readouterr().err
    assert err.count("partial-fc: warning: cannot write the log (standard output): No space left on device") == 1, err
