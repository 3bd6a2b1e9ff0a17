"""The random generators a checkpoint keeps per rank: torch's (CPU and this rank's GPU), numpy's, Python's and the
head's sampling generator; restored exactly on the same world size, re-seeded from (seed, step, rank) on another."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from partial_fc.comm import Communicator


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def rng_state(comm: Communicator, head: nn.Module) -> dict[str, Any]:
    """Every generator's state on this rank, loadable with weights_only=True."""
    cuda = torch.cuda.get_rng_state(comm.device) if comm.device.type == "cuda" else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": _numpy_rng_state(),
        "python": random.getstate(),
        "head": head.generator.get_state(),
    }


def restore_rng(rng: dict[str, Any], comm: Communicator, head: nn.Module) -> None:
    """Put back the generator states `rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and comm.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], comm.device)
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    head.generator.set_state(rng["head"])


def _derived_seed(seed: int, step: int, rank: int, stream: str) -> int:
    text = f"{seed}/{step}/{rank}/{stream}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def reseed(seed: int, step: int, comm: Communicator, head: nn.Module) -> None:
    """Seed every generator from (seed, step, rank): reproducible, and distinct per rank."""
    torch.manual_seed(_derived_seed(seed, step, comm.rank, "torch"))
    np.random.seed(_derived_seed(seed, step, comm.rank, "numpy") % 2**32)
    random.seed(_derived_seed(seed, step, comm.rank, "python"))
    head.generator.manual_seed(_derived_seed(seed, step, comm.rank, "head"))
