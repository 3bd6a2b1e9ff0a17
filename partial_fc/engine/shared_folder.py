"""The output folder must be one filesystem shared by every rank: checkpoints gather every rank's shard there,
and heartbeats and the run lock are read across hosts. Checked once at start, so host-local folders fail in
seconds with one message instead of a checkpoint that is missing shards an hour later."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import torch

from partial_fc.comm import Communicator
from partial_fc.errors import InputError


class UnsharedFolderError(InputError):
    """Some ranks do not see what rank 0 writes in the output folder; the message names them."""


def _write_probe(probe: Path, token: str) -> str | None:
    """Rank 0: write the probe file; the reason it could not, or None."""
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token, encoding="utf-8")
    except OSError as error:
        return f"rank 0 cannot write {probe}: {error.strerror or error}"
    return None


def _sees(probe: Path, token: str) -> bool:
    try:
        return probe.read_text(encoding="utf-8") == token
    except OSError:
        return False


def check_shared_folder(folder: Path, comm: Communicator) -> None:
    """Raise `UnsharedFolderError` on every rank (a collective) unless each sees the file rank 0 writes in `folder`."""
    if comm.world_size == 1:
        return
    token = secrets.token_hex(8)
    probe = Path(folder) / f".shared_probe_{os.getpid()}_{token}"
    failure = _write_probe(probe, token) if comm.rank == 0 else None
    probe, token, failure = comm.broadcast_object((probe, token, failure), root=0)
    if failure:
        raise UnsharedFolderError(failure)
    seen = torch.tensor([1 if _sees(probe, token) else 0], device=comm.device)
    missing = [
        rank for rank, flag in enumerate(comm.all_gather(seen, sizes=[1] * comm.world_size).tolist()) if not flag
    ]
    if comm.rank == 0:
        probe.unlink(missing_ok=True)
    if missing:
        here = "" if comm.rank not in missing else f" (this is rank {comm.rank}, on host {socket.gethostname()})"
        raise UnsharedFolderError(
            f"the output folder {folder} is not shared by every rank: rank(s) {', '.join(map(str, missing))} do not "
            f"see the file rank 0 wrote there{here}; put output on a filesystem every host mounts (NFS, Lustre, GPFS)"
        )
