"""Export: a trained backbone as an ONNX graph, checked against torch with onnxruntime."""

from partial_fc.export.onnx import (
    DEFAULT_OPSET,
    EXPORTERS,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxMismatchError,
    check_onnx,
    export_onnx,
    onnx_session,
    run_onnx,
)

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
