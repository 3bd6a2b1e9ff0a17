"""`partial-fc export`: a trained backbone as ONNX (dynamic batch axis), checked with onnxruntime against torch."""

from __future__ import annotations

import argparse
import json
import os

from partial_fc.cli.weights import load_backbone
from partial_fc.errors import InputError, MissingInputError
from partial_fc.export import DEFAULT_OPSET, EXPORTERS, INPUT_NAME, OUTPUT_NAME, check_onnx, export_onnx

CHECK_BATCH_SIZES = (1, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="backbone.pth, a checkpoint folder or a checkpoint root")
    parser.add_argument("--network", required=True, help="backbone name (r50, mbf, vit_t, ...)")
    parser.add_argument("--output", required=True, help="the .onnx file to write (replaced atomically)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="dynamo",
        help="torch.export-based (torch's default) or the legacy TorchScript tracer",
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="onnxruntime-vs-torch difference accepted ...")
    parser.add_argument("--rtol", type=float, default=1e-5, help="... plus this fraction of the largest output")
    parser.add_argument("--no-check", action="store_true", help="skip running the export through onnxruntime")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")


def run(args: argparse.Namespace) -> int:
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise MissingInputError(f"{directory}: no such folder for --output {args.output}")
    if args.opset < 7:
        raise InputError(f"--opset {args.opset} is too old (onnxruntime runs opset 7 and later)")
    model = load_backbone(args.weights, args.network, args.embedding_size)
    export_onnx(model, args.output, opset=args.opset, exporter=args.exporter)
    summary = {
        "job": "export",
        "output": args.output,
        "network": args.network,
        "embedding_size": args.embedding_size,
        "opset": args.opset,
        "exporter": args.exporter,
        "bytes": os.path.getsize(args.output),
        "max_abs_diff": None,
    }
    if not args.no_check:
        summary["max_abs_diff"] = check_onnx(model, args.output, CHECK_BATCH_SIZES, atol=args.atol, rtol=args.rtol)
    if args.json:
        print(json.dumps(summary), flush=True)
        return 0
    print(
        f"wrote {args.output} ({summary['bytes'] / 2**20:.1f} MiB, opset {args.opset}, {args.exporter} exporter): "
        f"{INPUT_NAME} [batch, 3, 112, 112] -> {OUTPUT_NAME} [batch, {args.embedding_size}]",
        flush=True,
    )
    if summary["max_abs_diff"] is not None:
        sizes = ", ".join(map(str, CHECK_BATCH_SIZES))
        print(
            f"onnxruntime vs torch: max abs difference {summary['max_abs_diff']:.3g} "
            f"(batch {sizes}; tolerance {args.atol:g} + {args.rtol:g} x largest output)",
            flush=True,
        )
    return 0
