"""A small convolutional network without BatchNorm: per-sample arithmetic only, so a training step on W ranks
equals one process on the concatenated batch exactly (the exactness tests train it through `partial-fc train`)."""

from __future__ import annotations

import torch
from torch import nn

from partial_fc.backbones.registry import body_autocast, register_model


class PlainNet(nn.Module):
    """Stride-2 3x3 convolutions with PReLU, then a linear embedding; no batch statistics anywhere."""

    def __init__(self, num_features: int, widths: tuple[int, ...], dropout: float = 0.0, fp16: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.PReLU(width)]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * 16, num_features)
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            x = self.body(x)
        return self.fc(self.dropout(x.float()))


@register_model
def plain_nano(*, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> PlainNet:
    """Four convolutions of 8 to 32 channels: a BatchNorm-free network for CPU runs and exactness tests."""
    return PlainNet(num_features, (8, 16, 32, 32), dropout, fp16)
