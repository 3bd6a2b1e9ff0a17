"""Backbone weights: read from a torch file, and put into a backbone strictly, with an error that says which keys or
shapes differ."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from partial_fc.errors import InputError
from partial_fc.fileio import PathLike, load_torch_file

_SHOWN = 5
# Keys under which arcface_torch and common trainers nest a backbone's state dict inside a checkpoint file.
_NESTED_STATE_KEYS = ("state_dict_backbone", "state_dict")


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the `module.` prefix DataParallel / DistributedDataParallel put on every key."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def load_backbone_state(path: PathLike) -> dict[str, torch.Tensor]:
    """The backbone state dict in the torch file `path`: a plain one (arcface_torch's `backbone.pth`, a checkpoint's
    `backbone.pt`) or one a trainer nested under its key, without a `module.` prefix; anything else is an InputError."""
    path = Path(path)
    state = load_torch_file(path, "backbone weights file")
    if isinstance(state, dict):
        for key in _NESTED_STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())
    ):
        raise InputError(f"{path} is not a backbone state dict (a mapping of parameter names to tensors)")
    return strip_module_prefix(state)


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
        parts = [
            f"{label} {len(keys)} key(s): {_first(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise InputError(f"{weights}: weights do not match network {network!r} ({'; '.join(parts)})")
    misshaped = [name for name, value in state.items() if tuple(value.shape) != tuple(expected[name].shape)]
    if misshaped:
        details = [
            f"{name} {list(state[name].shape)} in the file, {list(expected[name].shape)} in the network"
            for name in misshaped[:_SHOWN]
        ]
        size = getattr(model, "embedding_size", None)
        sizes = {
            int(state[name].shape[0])
            for name in misshaped
            if expected[name].dim() >= 1 and state[name].dim() >= 1 and expected[name].shape[0] == size
        }
        hint = (
            f"; the file's embedding size looks like {sizes.pop()}, not {size} (--embedding-size)"
            if len(sizes) == 1
            else ""
        )
        raise InputError(
            f"{weights}: weights do not match network {network!r} "
            f"({len(misshaped)} tensor(s) of another shape: {'; '.join(details)}){hint}"
        )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], weights: str, network: str) -> nn.Module:
    """``model`` with ``state`` loaded strictly, after ``check_state_matches`` named any mismatch."""
    check_state_matches(state, model, weights, network)
    model.load_state_dict(state, strict=True)
    return model
