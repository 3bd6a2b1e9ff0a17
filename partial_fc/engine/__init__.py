"""Training engine: what couples a backbone and its optimizer to the ranks."""

from partial_fc.engine.config import DEFAULTS, config_from_dict, config_to_dict, format_config, load_config, validate
from partial_fc.engine.distributed import distribute_backbone

__all__ = [
    "DEFAULTS",
    "config_from_dict",
    "config_to_dict",
    "distribute_backbone",
    "format_config",
    "load_config",
    "validate",
]
