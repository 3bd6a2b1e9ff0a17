"""Dataset input: formats (RecordIO, ``.bin``), generated identities, datasets and loading. No collectives here."""

from partial_fc.data import recordio
from partial_fc.data.recordio import *  # noqa: F401,F403  (the names listed in recordio.__all__)

__all__ = list(recordio.__all__)
