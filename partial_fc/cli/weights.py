"""Loading a trained backbone for `partial-fc eval`, `export` and `embed`: the network by name, its weights
strictly, and the device to run it on."""

from __future__ import annotations

import torch
from torch import nn

from partial_fc.backbones import get_model
from partial_fc.engine.checkpoint import load_backbone_state
from partial_fc.errors import InputError

_SHOWN = 5


def _first(names: list[str]) -> str:
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_state_matches(state: dict[str, torch.Tensor], model: nn.Module, weights: str, network: str) -> None:
    """Refuse ``state`` unless its keys and shapes are exactly ``model``'s; the message lists the first few
    missing, unexpected and mis-shaped keys and, when the embedding layer differs, the size the file has."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{label} {len(keys)} key(s): {_first(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputError(f"{weights}: weights do not match network {network!r} ({'; '.join(parts)})")
    misshaped = [name for name, value in state.items() if tuple(value.shape) != tuple(expected[name].shape)]
    if misshaped:
        details = [f"{name} {list(state[name].shape)} in the file, {list(expected[name].shape)} in the network"
                   for name in misshaped[:_SHOWN]]
        size = getattr(model, "embedding_size", None)
        sizes = {int(state[name].shape[0]) for name in misshaped
                 if expected[name].dim() >= 1 and state[name].dim() >= 1 and expected[name].shape[0] == size}
        hint = f"; the file's embedding size looks like {sizes.pop()}, not {size} (--embedding-size)" \
            if len(sizes) == 1 else ""
        raise InputError(f"{weights}: weights do not match network {network!r} "
                         f"({len(misshaped)} tensor(s) of another shape: {'; '.join(details)}){hint}")


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
    state = load_backbone_state(weights)
    check_state_matches(state, model, weights, network)
    model.load_state_dict(state, strict=True)
    return model.eval()
