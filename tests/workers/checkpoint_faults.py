"""Worker: checkpoint saves that real faults interrupt, in one process (run by tests/engine/test_checkpoint.py).

`kill ROOT POINT...`: for each point, a forked child saves step 1 and step 2 into ROOT/POINT and SIGKILLs itself
at that moment of the step-2 save (for "replacing": of a second save of step 2). The parent only forks (no torch
work before the children, so forking is safe) and writes the children's exit signals to ROOT/killed.json.

`disk ROOT`: ROOT is a small tmpfs in this process's own mount namespace: step 1 fits, step 2 does not (ENOSPC);
then ROOT is remounted read-only and step 3 is tried (EROFS). Writes what each save raised to --report.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import SingleProcessCommunicator  # noqa: E402
from partial_fc.engine.checkpoint import CheckpointSaveError, save_checkpoint  # noqa: E402
from partial_fc.engine.checkpoint import save as saving  # noqa: E402
from tests.workers.checkpoint_job import build, train_step  # noqa: E402

COMM = SingleProcessCommunicator()


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(name: str, call: int) -> None:
    """Make the `call`-th call of `name` in the checkpoint's save module (1-based) kill this process."""
    original, calls = getattr(saving, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            die()
        return original(*args, **kwargs)

    setattr(saving, name, wrapped)


KILL_POINTS = {
    "writing": lambda: kill_on_call("save_durably", 2),  # some files written, no manifest
    "manifest_written": lambda: kill_on_call("fsync_path", 1),  # complete .partial with its manifest, not renamed
    "renamed": lambda: kill_on_call("atomic_path", 1),  # step_2 in place, `latest` still names step_1
    "latest_written": lambda: kill_on_call("_prune", 1),  # everything but pruning done
}


def save(root: Path, setup, step: int):
    return save_checkpoint(root, setup.parts(), comm=COMM, step=step, epoch=0)


def saves_then_dies(root: Path, point: str) -> None:
    setup = build(COMM)
    train_step(setup)
    save(root, setup, 1)
    train_step(setup)
    if point == "replacing":
        save(root, setup, 2)
        saving.os.rename = lambda *args: die() if (root / ".step_00000002.old").exists() else os.replace(*args)
    else:
        KILL_POINTS[point]()
    save(root, setup, 2)
    os._exit(0)  # not reached when the kill works


def kill(root: Path, points: list[str]) -> None:
    signals = {}
    for point in points:
        (root / point).mkdir(parents=True)
        child = os.fork()
        if child == 0:
            saves_then_dies(root / point, point)
        _, status = os.waitpid(child, 0)
        signals[point] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    (root / "killed.json").write_text(json.dumps(signals))


def attempt(root: Path, setup, step: int) -> str:
    try:
        save(root, setup, step)
        return "saved"
    except CheckpointSaveError as error:
        return str(error)


def disk(root: Path, report: Path) -> None:
    setup = build(COMM)
    outcome = {"step_1": attempt(root, setup, 1)}
    ballast = root / "ballast"
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    ballast.write_bytes(b"\0" * max(0, free - 8192))  # leave less than one more checkpoint needs
    outcome["step_2"] = attempt(root, setup, 2)
    outcome["after_step_2"] = sorted(path.name for path in root.iterdir())
    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    outcome["step_3"] = attempt(root, setup, 3)
    outcome["after_step_3"] = sorted(path.name for path in root.iterdir())
    outcome["latest"] = (root / "latest").read_text().strip()
    report.write_text(json.dumps(outcome))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["kill", "disk"])
    parser.add_argument("root")
    parser.add_argument("points", nargs="*")
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.mode == "kill":
        kill(Path(args.root), args.points)
    else:
        disk(Path(args.root), Path(args.report))


if __name__ == "__main__":
    main()
