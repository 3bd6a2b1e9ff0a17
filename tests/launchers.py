"""Start real multi-process jobs (mpirun, horovodrun, torchrun) from tests, with a hard time limit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
LAUNCHERS = ("mpirun", "horovodrun-gloo", "horovodrun-mpi", "torchrun")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "RANK")  # how each launcher tells a process its rank


def horovod_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True)
    return probe.returncode == 0


def require(launcher: str) -> None:
    """Skip when the launcher is missing here, unless PARTIAL_FC_REQUIRE_ALL says CI must have it."""
    missing = None
    if launcher.startswith("horovodrun") and (shutil.which("horovodrun") is None or not horovod_importable()):
        missing = "horovod (setup-utils/install-horovod.sh)"
    elif launcher in ("mpirun", "horovodrun-mpi") and shutil.which("mpirun") is None:
        missing = "mpirun (setup-utils/install-mpi.sh)"
    if missing is None:
        return
    if os.environ.get("PARTIAL_FC_REQUIRE_ALL") == "1":
        pytest.fail(f"{missing} is required in this run but missing")
    pytest.skip(f"{missing} is not installed")


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        PYTHONUNBUFFERED="1",
    )
    for name in ("PARTIAL_FC_COMM", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(launcher: str, ranks: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line that starts `argv` (a python program and its arguments) on `ranks` processes."""
    python = [sys.executable, *argv]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(ranks), "--oversubscribe", "--tag-output", *python], {"PARTIAL_FC_COMM": "torch"}
    if launcher == "horovodrun-gloo":
        return ["horovodrun", "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}", *python], {}
    if launcher == "horovodrun-mpi":
        return ["horovodrun", "--mpi", "-np", str(ranks), "-H", f"localhost:{ranks}", *python], {
            "PARTIAL_FC_COMM": "horovod"
        }
    if launcher == "torchrun":
        port = str(_free_port())
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            port,
            *argv,
        ], {}
    raise ValueError(launcher)


def start(
    launcher: str, ranks: int, argv: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.Popen:
    """Start `argv` under `launcher` on `ranks` processes, in a session of its own, with its output piped; `prefix`
    (e.g. a mount namespace's set-up) runs the launcher."""
    require(launcher)
    cmd, launcher_env = command(launcher, ranks, argv)
    return subprocess.Popen(
        [*(prefix or []), *cmd],
        cwd=REPO,
        env=_environment({**launcher_env, **(env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def launch(
    launcher: str,
    ranks: int,
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `argv` under `launcher` on `ranks` processes; a job that outlives `timeout` is killed and fails the test."""
    process = start(launcher, ranks, argv, env, prefix)
    cmd = process.args
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{launcher} job hung for {timeout}s: {' '.join(cmd)}\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def worker(name: str) -> str:
    return str(WORKERS / name)


def training_process_of(candidates: list[psutil.Process], rank: int) -> psutil.Process | None:
    """The training process of `rank` among `candidates`, found by its launcher's variables."""
    for process in candidates:
        try:
            environ, cmdline = process.environ(), " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "partial_fc" in cmdline and any(environ.get(name) == str(rank) for name in RANK_VARIABLES):
            return process
    return None


def rank_process(launcher_pid: int, rank: int) -> psutil.Process | None:
    """The training process of `rank` among the launcher's descendants."""
    return training_process_of(psutil.Process(launcher_pid).children(recursive=True), rank)


def wait_for_step(output: Path, step: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = output / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach step {step} (exit status {process.poll()})")
