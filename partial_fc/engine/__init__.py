"""Training engine: what couples a backbone and its optimizer to the ranks."""

from partial_fc.engine.distributed import distribute_backbone

__all__ = ["distribute_backbone"]
