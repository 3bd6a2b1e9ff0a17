"""Reads how the job was launched (horovodrun, mpirun, torchrun or plain python) from the environment."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

BACKEND_ENV = "PARTIAL_FC_COMM"
BACKENDS = ("auto", "horovod", "torch", "single")


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout as the launcher published it; `launcher` is 'horovodrun', 'mpirun', 'torchrun' or 'none'."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if name in env:
            return int(env[name])
    return default


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Identify the launcher and this process's place in the job from its environment variables."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env:
        return LaunchInfo(
            "horovodrun",
            _int(env, "HOROVOD_RANK", default=0),
            _int(env, "HOROVOD_SIZE", default=1),
            _int(env, "HOROVOD_LOCAL_RANK", default=0),
        )
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return LaunchInfo(
            "mpirun",
            _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0),
            _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
        )
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return LaunchInfo(
            "torchrun",
            _int(env, "RANK", default=0),
            _int(env, "WORLD_SIZE", default=1),
            _int(env, "LOCAL_RANK", default=0),
        )
    return LaunchInfo("none", 0, 1, 0)


def horovod_available() -> bool:
    """True when horovod.torch can be imported (without importing it)."""
    return importlib.util.find_spec("horovod") is not None and importlib.util.find_spec("horovod.torch") is not None


def choose_backend(requested: str = "auto", env: Mapping[str, str] | None = None) -> str:
    """Resolve 'auto' (or the PARTIAL_FC_COMM variable) to a concrete backend for this launch."""
    env = os.environ if env is None else env
    if requested == "auto":
        requested = env.get(BACKEND_ENV, "auto") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"communication backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    launch = detect_launch(env)
    if launch.launcher == "horovodrun":
        return "horovod"
    if launch.launcher == "torchrun":
        return "torch"
    if launch.launcher == "mpirun" and launch.world_size > 1:
        return "horovod" if horovod_available() else "torch"
    return "single"
