"""MobileFaceNet backbones (mbf, mbf_large) with the parameter names and shapes of insightface arcface_torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from partial_fc.backbones.registry import body_autocast, register_model


class ConvUnit(nn.Module):
    """Conv, BN and (unless linear) a per-channel PReLU, held in `.layers` as arcface_torch names them."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        linear: bool = False,
    ):
        super().__init__()
        parts: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel,
                stride=stride,
                padding=1 if kernel == 3 else 0,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if not linear:
            parts.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class InvertedBottleneck(nn.Module):
    """1x1 expansion to `hidden`, 3x3 depthwise (maybe strided), 1x1 linear projection; residual when asked."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(in_channels, hidden),
            ConvUnit(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            ConvUnit(hidden, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """`depth` stride-1 residual bottlenecks of constant width."""

    def __init__(self, channels: int, depth: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            *(InvertedBottleneck(channels, channels, hidden, residual=True) for _ in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GlobalDepthwiseHead(nn.Module):
    """GDC head: 7x7 depthwise linear conv over 7x7x512, flatten, dropout, bias-free FC, BN to the embedding."""

    def __init__(self, num_features: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(512, 512, kernel=7, groups=512, linear=True),
            nn.Flatten(),
            nn.Linear(512, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, flatten, fc, bn = self.layers
        return bn(fc(self.dropout(flatten(pooled(x)))))


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 faces; `blocks` are the residual depths of the four stages, `scale` widens it."""

    def __init__(
        self,
        num_features: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        dropout: float = 0.0,
        fp16: bool = False,
    ):
        super().__init__()
        self.fp16 = fp16
        wide, wider = 64 * scale, 128 * scale
        if blocks[0] == 1:
            second: nn.Module = ConvUnit(wide, wide, kernel=3, groups=64)
        else:
            second = ResidualStack(wide, blocks[0], hidden=128)
        self.layers = nn.ModuleList(
            [
                ConvUnit(3, wide, kernel=3, stride=2),
                second,
                InvertedBottleneck(wide, wide, hidden=128, stride=2),
                ResidualStack(wide, blocks[1], hidden=128),
                InvertedBottleneck(wide, wider, hidden=256, stride=2),
                ResidualStack(wider, blocks[2], hidden=256),
                InvertedBottleneck(wider, wider, hidden=512, stride=2),
                ResidualStack(wider, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvUnit(wider, 512)
        self.features = GlobalDepthwiseHead(num_features, dropout)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            for stage in self.layers:
                x = stage(x)
        return self.features(self.conv_sep(x.float()))


@register_model
def mbf(*, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> MobileFaceNet:
    """MobileFaceNet: residual depths 1, 4, 6, 2 at width scale 2."""
    return MobileFaceNet(num_features, blocks=(1, 4, 6, 2), scale=2, dropout=dropout, fp16=fp16)


@register_model
def mbf_large(*, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> MobileFaceNet:
    """Large MobileFaceNet: residual depths 2, 8, 12, 4 at width scale 4."""
    return MobileFaceNet(num_features, blocks=(2, 8, 12, 4), scale=4, dropout=dropout, fp16=fp16)
