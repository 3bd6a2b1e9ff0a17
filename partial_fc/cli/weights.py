"""Loading a trained backbone for `partial-fc eval`, `export` and `embed`: the network by name, its weights
strictly, and the device to run it on."""

from __future__ import annotations

import torch
from torch import nn

from partial_fc.backbones import get_model
from partial_fc.backbones.weights import load_backbone_state, load_weights
from partial_fc.engine.checkpoint import backbone_weights_file
from partial_fc.errors import InputError


def pick_device(name: str | None) -> torch.device:
    """The torch device ``name`` (``--device``), or cuda when available and cpu otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available here")
    return device


def load_backbone(weights: str, network: str, embedding_size: int) -> nn.Module:
    """Build ``network`` (float32, no dropout) and load ``weights`` into it strictly; returned in eval mode.

    ``weights`` is a checkpoint directory, a checkpoint root or a plain ``.pth`` state dict (arcface_torch's
    ``backbone.pth``). A missing or unreadable file, an unknown network or weights of another shape are
    :class:`InputError` naming the file, the network or the keys.
    """
    model = get_model(network, num_features=embedding_size, dropout=0.0, fp16=False)
    return load_weights(model, load_backbone_state(backbone_weights_file(weights)), weights, network).eval()
