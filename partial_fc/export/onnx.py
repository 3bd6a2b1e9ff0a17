"""ONNX export of a backbone with a dynamic batch axis, and the check that onnxruntime gives torch's numbers.

The graph takes ``input`` float32 [batch, 3, H, W] (RGB normalised to [-1, 1], as training feeds it) and
returns ``embedding`` float32 [batch, D]. Two exporters are offered: ``"dynamo"`` (``torch.export``, torch's
default, needs ``onnxscript``) and ``"torchscript"`` (the legacy tracer insightface's ``torch2onnx.py`` uses,
deprecated by torch). Either way the weights are stored inside the one ``.onnx`` file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from partial_fc.errors import InputError, MissingInputError, PartialFCError
from partial_fc.fileio import atomic_path

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxMismatchError",
    "check_onnx",
    "export_onnx",
    "onnx_session",
    "run_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
"""The lowest opset the dynamo exporter writes natively; onnxruntime has run it since 1.14."""


class OnnxMismatchError(PartialFCError):
    """onnxruntime's output of an exported model differs from torch's by more than the tolerance."""

    def __init__(self, message: str, max_error: float):
        super().__init__(message)
        self.max_error = max_error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation warnings and log lines (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (112, 112),
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    example_batch: int = 2,
) -> None:
    """Write ``model`` (put in eval mode, on CPU in float32) to ``path`` as ONNX with a dynamic batch axis.

    ``example_batch`` is the batch traced with (2, so the batch size is not specialised to 1). The file is
    written to a temporary path beside ``path``, checked with ``onnx.checker`` and then renamed over it.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    model = model.to("cpu", torch.float32).eval()
    example = torch.zeros(example_batch, 3, *image_size)
    with atomic_path(path) as tmp, _quiet_exporter(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
            program.save(tmp, external_data=False)
        else:
            torch.onnx.export(
                model,
                (example,),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        onnx.checker.check_model(tmp)


def onnx_session(path: str | os.PathLike) -> InferenceSession:
    """An onnxruntime CPU session of the model at ``path``; a missing or unreadable file names ``path``."""
    import onnxruntime

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such ONNX model file")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types, not a common base
        raise InputError(f"{path}: not a loadable ONNX model ({str(error).strip().splitlines()[0][:200]})") from None


def run_onnx(session: InferenceSession, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The model's output for ``images`` [N, 3, H, W] (float32) through an onnxruntime session."""
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(images, dtype=np.float32)}
    return session.run(None, feed)[0]


def check_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-5,
    image_size: tuple[int, int] = (112, 112),
    seed: int = 0,
    session: InferenceSession | None = None,
) -> float:
    """Run the ONNX model at ``path`` and ``model`` on the same random inputs of each batch size.

    Returns the largest absolute difference; raises :class:`OnnxMismatchError` naming it (and the batch
    size) when it exceeds ``atol + rtol * max|torch output|`` (float32 rounding grows with the outputs' scale,
    which is large in untrained networks) or when the output shapes differ.
    """
    session = session or onnx_session(path)
    model = model.to("cpu", torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.rand(batch, 3, *image_size, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(images).numpy().astype(np.float64)
        got = run_onnx(session, images)
        if got.shape != expected.shape:
            raise OnnxMismatchError(
                f"{os.fspath(path)}: onnxruntime returns shape {got.shape} for batch {batch}, torch {expected.shape}",
                float("inf"),
            )
        error = float(np.max(np.abs(got - expected)))
        limit = atol + rtol * float(np.max(np.abs(expected)))
        if not error <= limit:
            raise OnnxMismatchError(
                f"{os.fspath(path)}: onnxruntime differs from torch by {error:.3g} at batch "
                f"{batch} (tolerance {limit:.3g})",
                error,
            )
        worst = max(worst, error)
    return worst
