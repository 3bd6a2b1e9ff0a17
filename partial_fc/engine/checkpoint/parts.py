"""What a checkpoint saves of a training run and restores into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partial_fc.errors import InputError


@dataclass
class TrainingParts:
    """The trained modules, their optimizers and what moves with the steps; the random generators saved are the
    process's and the head's own (`head.generator`)."""

    backbone: nn.Module  # may be wrapped in DistributedDataParallel / DataParallel
    backbone_optimizer: torch.optim.Optimizer
    head: nn.Module  # a center shard: weight, class_start, num_local, num_classes, embedding_size, generator
    head_optimizer: torch.optim.Optimizer
    scheduler: Any = None
    sampler: Any = None
    scaler: Any = None

    @property
    def plain_backbone(self) -> nn.Module:
        """The backbone inside DistributedDataParallel / DataParallel wrappers."""
        model = self.backbone
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        return model

    def center_state(self) -> dict[str, Any]:
        """The head optimizer's state of the center shard; an InputError unless it optimizes exactly head.weight."""
        params = [param for group in self.head_optimizer.param_groups for param in group["params"]]
        if len(params) != 1 or params[0] is not self.head.weight:
            raise InputError("the head optimizer must optimize exactly the head's center shard (head.weight)")
        return self.head_optimizer.state[self.head.weight]

    def is_row_state(self, value: Any) -> bool:
        """Optimizer state with one entry per center row (momentum, exp_avg, ...): resharded with the centers."""
        return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.head.num_local

    def row_state(self) -> dict[str, torch.Tensor]:
        """The center state's per-row tensors, by name."""
        return {key: value for key, value in self.center_state().items() if self.is_row_state(value)}
