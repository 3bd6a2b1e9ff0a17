"""Verification during training: every rank embeds its share of each `.bin` set, every rank scores the whole.

The sets are loaded (and checked) when the run starts, so a missing or corrupt `.bin` fails before the
first step. Each rank embeds a contiguous slice of the images and their flips; the slices are all-gathered
and the 10-fold protocol runs identically on every rank, so all ranks agree on the best accuracy so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from partial_fc.comm import Communicator
from partial_fc.data.binfile import load_bin
from partial_fc.errors import MissingInputError
from partial_fc.eval.verification import VerificationResult, compute_embeddings, evaluate
from partial_fc.heads.sharding import shard_range


@dataclass
class VerificationSet:
    """One loaded pair set: images [2N, 3, H, W] (normalised) and issame [N]."""

    name: str
    path: Path
    images: torch.Tensor
    issame: list[bool]


def load_verification_sets(names: list[str], folder: str | Path, image_size: int = 112) -> list[VerificationSet]:
    """Load ``folder/<name>.bin`` for every name; a missing file is one error naming it."""
    sets = []
    for name in names:
        path = Path(folder) / f"{name}.bin"
        if not path.is_file():
            raise MissingInputError(
                f"{path}: no such verification set (val_targets names {name!r}; set val_dir or val_targets)"
            )
        images, issame = load_bin(path, (image_size, image_size))
        sets.append(VerificationSet(name, path, images, issame))
    return sets


class Verifier:
    """Scores a backbone on the verification sets across ranks and remembers each set's best accuracy."""

    def __init__(self, sets: list[VerificationSet], comm: Communicator, embedding_size: int, batch_size: int = 128):
        self.sets, self.comm, self.batch_size = sets, comm, batch_size
        self.embedding_size = embedding_size
        self.best: dict[str, float] = {}

    def _embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice embedded (and flipped), gathered from every rank into the whole set's embeddings."""
        world = self.comm.world_size
        start, count = shard_range(images.shape[0], world, self.comm.rank)
        sizes = [shard_range(images.shape[0], world, rank)[1] for rank in range(world)]
        if count:
            emb, flipped = compute_embeddings(model, images[start : start + count], batch_size=self.batch_size)
        else:  # more ranks than images
            emb = flipped = torch.empty((0, self.embedding_size))
        both = torch.cat([emb, flipped], dim=1).to(self.comm.device)
        gathered = self.comm.all_gather(both, sizes=sizes).cpu()
        half = gathered.shape[1] // 2
        return gathered[:, :half], gathered[:, half:]

    def __call__(self, model: nn.Module) -> dict[str, VerificationResult]:
        """Every set's result; ``self.best`` keeps the highest accuracy seen per set."""
        results = {}
        for entry in self.sets:
            emb, flipped = self._embed(model, entry.images)
            result = evaluate(emb, entry.issame, flipped)
            self.best[entry.name] = max(self.best.get(entry.name, 0.0), result.accuracy)
            results[entry.name] = result
        return results
