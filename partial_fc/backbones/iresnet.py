"""Improved ResNet (IResNet) face backbones, with parameter names and shapes of insightface arcface_torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from partial_fc.backbones.registry import body_autocast, register_model

_BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=_BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 faces: a 3x3 stem, four stages of stride 2 to 7x7x512, then BN, dropout, FC and BN.

    ``widths`` (the four stages' channels; the stem has the first) are arcface_torch's unless a small variant
    for CPU runs asks for fewer."""

    spatial = 7 * 7

    def __init__(
        self,
        layers: Sequence[int],
        num_features: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        using_checkpoint: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.fp16 = fp16
        self.using_checkpoint = using_checkpoint
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        for index, (width, depth) in enumerate(zip(widths, layers), start=1):
            setattr(self, f"layer{index}", self._stage(in_channels, width, depth))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[-1] * self.spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        self._reset_parameters()

    @staticmethod
    def _stage(in_channels: int, channels: int, depth: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(channels, eps=_BN_EPS),
        )
        blocks = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(channels, channels) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.using_checkpoint and self.training):
            return stage(x)
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = self._run_stage(stage, x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float()))


def _iresnet(layers: Sequence[int], num_features: int, dropout: float, fp16: bool, using_checkpoint: bool) -> IResNet:
    return IResNet(layers, num_features=num_features, dropout=dropout, fp16=fp16, using_checkpoint=using_checkpoint)


@register_model
def r18(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """IResNet-18: stages of 2, 2, 2, 2 blocks."""
    return _iresnet((2, 2, 2, 2), num_features, dropout, fp16, using_checkpoint)


@register_model
def r34(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """IResNet-34: stages of 3, 4, 6, 3 blocks."""
    return _iresnet((3, 4, 6, 3), num_features, dropout, fp16, using_checkpoint)


@register_model
def r50(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """IResNet-50: stages of 3, 4, 14, 3 blocks."""
    return _iresnet((3, 4, 14, 3), num_features, dropout, fp16, using_checkpoint)


@register_model
def r100(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """IResNet-100: stages of 3, 13, 30, 3 blocks."""
    return _iresnet((3, 13, 30, 3), num_features, dropout, fp16, using_checkpoint)


@register_model
def r200(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """IResNet-200: stages of 6, 26, 60, 6 blocks."""
    return _iresnet((6, 26, 60, 6), num_features, dropout, fp16, using_checkpoint)


@register_model
def r2060(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = True
) -> IResNet:
    """IResNet-2060: stages of 3, 128, 896, 3 blocks; checkpointed in training by default, as arcface_torch does."""
    return _iresnet((3, 128, 896, 3), num_features, dropout, fp16, using_checkpoint)


@register_model
def r10_nano(
    *, num_features: int = 512, dropout: float = 0.0, fp16: bool = False, using_checkpoint: bool = False
) -> IResNet:
    """A narrow IResNet (one block per stage, 8 to 64 channels, ~1/150 of r18's multiply-adds) for CPU smoke
    runs and the synthetic main job: not an arcface_torch network, so no published weights exist for it."""
    return IResNet(
        (1, 1, 1, 1),
        num_features=num_features,
        dropout=dropout,
        fp16=fp16,
        using_checkpoint=using_checkpoint,
        widths=(8, 16, 32, 64),
    )
