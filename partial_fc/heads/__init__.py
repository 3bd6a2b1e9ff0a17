"""Margins and the Partial FC head (sharded centers, sampling, sharded softmax, sparse center updates)."""

from partial_fc.heads.margins import ArcFace, CombinedMargin, CosFace, as_margin
from partial_fc.heads.partial_fc import NonFiniteEmbeddings, PartialFC
from partial_fc.heads.sharding import shard_range
from partial_fc.heads.sparse_adamw import SparseAdamW
from partial_fc.heads.sparse_sgd import SparseSGD

__all__ = [
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "NonFiniteEmbeddings",
    "PartialFC",
    "SparseAdamW",
    "SparseSGD",
    "as_margin",
    "shard_range",
]
