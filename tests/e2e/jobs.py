"""Whole jobs as a user starts them (run.sh, config.sh under a launcher), on a tiny generated face set."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

from tests.launchers import REPO, _environment
from tests.train_runs import tiny_run


def run_settings(data: Path, output: Path, **extra) -> dict[str, str]:
    """A tiny run as PFC_ variables (config.sh and run.sh pass these to every rank on every host)."""
    values = tiny_run(data, output, **{"network": "r10_nano", "val_targets": "[]", **extra})
    return {f"PFC_{key.upper()}": str(value) for key, value in values.items()}


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repository with the test environment; a hang fails the test."""
    try:
        return subprocess.run(argv, cwd=REPO, env=_environment(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"hung for {timeout} s: {' '.join(argv)}\n{error.stdout}\n{error.stderr}")


def start_job(argv: list[str], env: dict[str, str], new_session: bool = True) -> subprocess.Popen:
    """Start a command from the repository with the test environment, its output piped, by default in a session
    of its own."""
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def _processes_under(job: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]
    return []


def _describe(processes: list[psutil.Process]) -> str:
    """Each process's pid, state and command line, then the other processes that used the most CPU: where a job
    stood when it was killed (its own output is often empty until then), and whether something else held the cores."""
    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  {process.pid} {process.status()} {' '.join(process.cmdline())[:200]}")
    mine = {process.pid for process in processes}
    others = []
    for process in psutil.process_iter(["pid", "cpu_times", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if process.pid not in mine and process.info["cmdline"]:
                others.append((sum(process.info["cpu_times"][:2]), process.pid, " ".join(process.info["cmdline"])))
    lines.append("the other processes that used the most CPU time:")
    lines += [f"  {pid} {seconds:.0f} s {line[:160]}" for seconds, pid, line in sorted(others, reverse=True)[:5]]
    return "\n".join(lines)


def fail_job(job: subprocess.Popen, what: str) -> NoReturn:
    """Fail the test with the job's processes and output, after killing it and every process under it (a
    launcher's ranks keep its pipes open: killing the job alone would leave the output never ending)."""
    processes = _processes_under(job)
    standing = _describe(processes)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    try:
        output = job.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        output = ("(no output: the pipes stayed open after the kill)", "")
    pytest.fail(f"{what}: exit status {job.poll()}, processes when killed:\n{standing}\noutput {output}")


def finish(job: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """The started job's (stdout, stderr) once it ends; one that outlives `timeout` is killed and fails the test."""
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        fail_job(job, f"{what} for {timeout} s")


def wait_for_folder(job: subprocess.Popen, folder: Path, timeout: float) -> None:
    """Wait until the running job has written `folder`; a job that ends first or takes longer fails the test."""
    deadline = time.monotonic() + timeout
    while not folder.is_dir():
        if job.poll() is not None or time.monotonic() > deadline:
            fail_job(job, f"{folder.name} not written within {timeout} s")
        time.sleep(0.1)
