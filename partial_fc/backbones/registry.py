"""Backbone registry in the style of timm: factories register under a name, get_model builds one by name."""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from partial_fc.errors import InputError

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Factory | None = None, *, name: str | None = None) -> Factory | Callable[[Factory], Factory]:
    """Register a backbone factory under `name` (default: the function's name); usable as @register_model.

    A factory takes keyword-only num_features, dropout and fp16, plus any options of its own.
    """

    def decorate(factory: Factory) -> Factory:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is registered twice")
        _REGISTRY[key] = factory
        return factory

    return decorate(fn) if fn is not None else decorate


def list_models() -> list[str]:
    """Names get_model accepts, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in _REGISTRY:
        nearest = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise InputError(f"unknown network {name!r}{hint} (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def _embedding_size(num_features: int | None, embedding_size: int | None) -> int:
    if num_features is not None and embedding_size is not None and num_features != embedding_size:
        raise InputError(f"num_features={num_features} and embedding_size={embedding_size} disagree; give one")
    size = num_features if num_features is not None else embedding_size
    size = 512 if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InputError(f"embedding size must be a positive integer, got {size!r}")
    return size


def get_model(
    name: str,
    *,
    num_features: int | None = None,
    embedding_size: int | None = None,
    dropout: float = 0.0,
    fp16: bool = False,
    **options,
) -> nn.Module:
    """Build the backbone registered as `name`, mapping 112x112 RGB in [-1, 1] to [N, embedding_size] float32.

    num_features and embedding_size are synonyms (default 512); fp16 runs the body under autocast
    (float16 on CUDA, bfloat16 on CPU) with the embedding head in float32; options go to the factory.
    """
    factory = _factory(name)
    size = _embedding_size(num_features, embedding_size)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be a number in [0, 1), got {dropout!r}")
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = sorted(set(accepted) - {"num_features", "dropout", "fp16"})
        raise InputError(f"network {name!r} takes no option(s) {', '.join(unknown)} (its options: {known or 'none'})")
    model = factory(num_features=size, dropout=float(dropout), fp16=bool(fp16), **options)
    model.embedding_size = size
    return model


def body_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast context for a backbone body: float16 on CUDA, bfloat16 on CPU, nothing elsewhere or when off."""
    if not enabled or x.device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=x.device.type, dtype=dtype)
