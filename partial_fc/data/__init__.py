"""Dataset input: formats (RecordIO, ``.bin``), generated identities, datasets and loading. No collectives here."""

from partial_fc.data import datasets, recordio
from partial_fc.data.datasets import *  # noqa: F401,F403  (the names listed in datasets.__all__)
from partial_fc.data.loader import build_loader
from partial_fc.data.recordio import *  # noqa: F401,F403  (the names listed in recordio.__all__)
from partial_fc.data.sampler import DistributedEpochSampler

__all__ = [*recordio.__all__, *datasets.__all__, "DistributedEpochSampler", "build_loader"]
