"""The one-GPU checks of `benchmarks/gpu.sh`: the matmul rate, a backbone's FLOPs, training throughput, the summary.

    python -m partial_fc.perf.gpu matmul --size 8192 --json matmul.json
    python -m partial_fc.perf.gpu train --network r50 --batch 512 --steps 30 --amp float16 --channels-last \
        --matmul matmul.json --json train.json
    python -m partial_fc.perf.gpu summary OUT_DIR          # writes OUT_DIR/summary.json and summary.md

`matmul`: TFLOPS of one large square GEMM per dtype (median of timed repeats after warm-up). `train`: the
backbone's forward FLOPs per image (counted with torch's FlopCounterMode on the meta device, 2 FLOPs per
multiply-add) and `partial-fc train` in perf mode on in-memory synthetic batches (`rec=synthetic`), its
images per second, the training FLOP rate (3x forward per image, the usual convention; the counted
forward + backward is stated beside it) and that rate as a percentage of the matmul rate in the autocast
dtype. `summary`: every JSON the script left in the folder, as one summary.json and a short summary.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from partial_fc.perf.conditions import BenchConditions, print_warnings
from partial_fc.perf.tables import head_table, read_lines

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TARGET_PERCENT = 30.0  # the training FLOP rate's target, as a share of the matmul rate


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_tflops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """TFLOPS (2 size^3 per product) of a [size, size] @ [size, size] GEMM: the median of `repeats` timings of a
    few back-to-back products, after warm-up."""
    a = torch.randn(size, size, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(size, size, device=device, dtype=torch.float32).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    batch = 10 if device.type == "cuda" else 1
    for _ in range(3):
        torch.mm(a, b, out=out)
    _synchronize(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batch):
            torch.mm(a, b, out=out)
        _synchronize(device)
        timings.append((time.perf_counter() - start) / batch)
    return 2.0 * size**3 / statistics.median(timings) / 1e12


def run_matmul(args: argparse.Namespace) -> dict:
    device = _device(args.device)
    conditions = BenchConditions()
    rates = {}
    for name in args.dtypes:
        rates[name] = float(f"{matmul_tflops(args.size, DTYPES[name], device, args.repeats):.4g}")
        conditions.sample()
    return {
        "bench": "matmul",
        "device": device.type,
        "device_name": device_name(device),
        "size": args.size,
        "tflops": rates,
        **conditions.finish(),
    }


def forward_flops(network: str, embedding_size: int, image_size: int = 112, backward: bool = False) -> float:
    """FLOPs per image of the network's forward (and backward) pass in training mode, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from partial_fc.backbones import get_model

    with torch.device("meta"):
        model = get_model(network, num_features=embedding_size)
    model.train()
    images = torch.randn(2, 3, image_size, image_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 2


def _train_argv(args: argparse.Namespace, output: Path, summary: Path) -> list[str]:
    settings = {
        "rec": "synthetic",
        "network": args.network,
        "embedding_size": args.embedding_size,
        "batch_size": args.batch,
        "num_classes": args.classes,
        "num_image": args.batch * (args.steps + 4),
        "num_epoch": 1,
        "warmup_epoch": 0,
        "fp16": "true",
        "amp_dtype": args.amp,
        "channels_last": "true" if args.channels_last else "false",
        "num_workers": args.workers,
        "val_targets": "[]",
        "output": str(output),
        "frequent": max(1, args.steps),
        "sample_rate": args.sample_rate,
    }
    overrides = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    return ["train", "synthetic", *overrides, "--perf-steps", str(args.steps), "--summary", str(summary)]


def _read_matmul(path: str | None) -> dict[str, float]:
    """The rates of a `matmul` JSON file; empty when there is none (the caller measures its own)."""
    try:
        return dict(json.loads(Path(path).read_text())["tflops"]) if path else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_train(args: argparse.Namespace) -> dict:
    """`partial-fc train` in perf mode, its images/s and its FLOP rate against the matmul rate."""
    from partial_fc.cli.main import main as cli_main

    device = _device("auto")
    if device.type == "cuda" and args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    forward = forward_flops(args.network, args.embedding_size)
    counted = forward_flops(args.network, args.embedding_size, backward=True)
    matmul = _read_matmul(args.matmul)
    if args.amp not in matmul:
        matmul[args.amp] = float(f"{matmul_tflops(args.matmul_size, DTYPES[args.amp], device):.4g}")
    conditions = BenchConditions()
    with tempfile.TemporaryDirectory(prefix="partial_fc_train_") as folder:
        summary_file = Path(folder) / "summary.json"
        status = cli_main(_train_argv(args, Path(folder) / "run", summary_file))
        summary = json.loads(summary_file.read_text()) if status == 0 and summary_file.exists() else {}
    images_per_s = float(summary.get("samples_per_second", 0.0))
    achieved = images_per_s * 3 * forward / 1e12
    reference = matmul.get(args.amp)
    result = {
        "bench": "train",
        "device": device.type,
        "device_name": device_name(device),
        "status": status,
        "network": args.network,
        "embedding_size": args.embedding_size,
        "batch": args.batch,
        "steps": args.steps,
        "amp_dtype": args.amp,
        "channels_last": args.channels_last,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "images_per_s": round(images_per_s, 1),
        "forward_gflops_per_image": round(forward / 1e9, 3),
        "train_gflops_per_image": round(3 * forward / 1e9, 3),
        "counted_forward_backward_gflops_per_image": round(counted / 1e9, 3),
        "train_tflops": float(f"{achieved:.4g}"),
        "matmul_tflops": reference,
        "percent_of_matmul": round(100.0 * achieved / reference, 1) if reference else None,
        "target_percent": TARGET_PERCENT,
        "phases": {name: round(share, 3) for name, share in summary.get("phases", {}).items()},
        **conditions.finish(),
    }
    result["meets_target"] = bool(
        result["percent_of_matmul"] is not None and result["percent_of_matmul"] >= TARGET_PERCENT
    )
    return result


def _tests(folder: Path) -> dict | None:
    report = folder / "tests.xml"
    if not report.exists():
        return None
    root = ElementTree.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def _json_lines(path: Path) -> list[dict]:
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def collect(folder: Path) -> dict:
    """Everything `gpu.sh` left in `folder`: its steps, the tests' counts, head, matmul and training results."""
    steps = _json_lines(folder / "steps.jsonl") if (folder / "steps.jsonl").exists() else []
    head = [row for path in folder.glob("head_*.json") for row in read_lines(path.read_text(), "head")]
    head.sort(key=lambda row: (row.get("classes", 0), -row.get("sample_rate", 0)))
    matmul = [row for path in sorted(folder.glob("matmul*.json")) for row in _json_lines(path)]
    train = [row for path in sorted(folder.glob("train_*.json")) for row in _json_lines(path)]
    return {
        "steps": steps,
        "tests": _tests(folder),
        "head": head,
        "matmul": matmul[-1] if matmul else None,
        "train": train,
    }


def summary_markdown(results: dict) -> str:
    lines = ["# benchmarks/gpu.sh summary", ""]
    matmul, tests = results["matmul"], results["tests"]
    device = (matmul or {}).get("device_name") or next((row.get("device_name") for row in results["train"]), "?")
    lines.append(f"Device: {device}.")
    failed_steps = [step for step in results["steps"] if step.get("status") not in (0, None)]
    lines.append(
        f"Steps: {len(results['steps'])} run, {len(failed_steps)} failed"
        + (
            ": " + ", ".join(f"{s['step']} ({s.get('note') or 'exit ' + str(s['status'])})" for s in failed_steps)
            if failed_steps
            else ""
        )
        + "."
    )
    lines += ["", "## Tests (CUDA paths)", ""]
    if tests is None:
        lines.append("no test report")
    else:
        lines.append(
            f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped of {tests['tests']}"
            + (": " + ", ".join(tests["failed"]) if tests["failed"] else "")
        )
    lines += ["", "## Matmul rate", ""]
    if matmul:
        lines.append(
            ", ".join(f"{name} {rate:g} TFLOPS" for name, rate in matmul["tflops"].items())
            + f" ({matmul['size']}^3 GEMM)"
        )
    else:
        lines.append("not measured")
    lines += [
        "",
        "## Head (`partial-fc bench head`)",
        "",
        head_table(results["head"]) if results["head"] else "no runs",
    ]
    lines += ["", "## Training (perf mode, synthetic in-memory batches)", ""]
    for row in results["train"]:
        verdict = "meets" if row.get("meets_target") else "below"
        lines.append(
            f"- {row['network']}, batch {row['batch']}, {row['amp_dtype']} autocast, "
            f"{'channels-last' if row['channels_last'] else 'contiguous'}: {row['images_per_s']:g} img/s = "
            f"{row['train_tflops']:g} TFLOPS ({row['train_gflops_per_image']:g} GFLOP per image, 3x forward) = "
            f"{row['percent_of_matmul']}% of the {row['amp_dtype']} matmul rate ({row['matmul_tflops']} TFLOPS); "
            f"{verdict} the {row['target_percent']:g}% target"
        )
    if not results["train"]:
        lines.append("no runs")
    warnings = [
        w
        for group in (results["head"], results["train"], [matmul] if matmul else [])
        for row in group
        for w in row.get("warnings", ())
    ]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in dict.fromkeys(warnings)]
    return "\n".join(lines) + "\n"


def run_summary(args: argparse.Namespace) -> dict:
    folder = Path(args.folder)
    results = collect(folder)
    (folder / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    text = summary_markdown(results)
    (folder / "summary.md").write_text(text)
    print(text, end="")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m partial_fc.perf.gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    matmul = sub.add_parser("matmul", help="TFLOPS of a large GEMM per dtype")
    matmul.add_argument("--size", type=int, default=8192)
    matmul.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float16", "bfloat16"])
    matmul.add_argument("--repeats", type=int, default=10)
    matmul.add_argument("--device", default="auto")
    train = sub.add_parser("train", help="training throughput (perf mode) against the matmul rate")
    train.add_argument("--network", default="r50")
    train.add_argument("--embedding-size", type=int, default=512)
    train.add_argument("--batch", type=int, default=512)
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--classes", type=int, default=10000)
    train.add_argument("--sample-rate", type=float, default=1.0)
    train.add_argument("--workers", type=int, default=4)
    train.add_argument("--amp", choices=["float16", "bfloat16"], default="float16")
    train.add_argument("--channels-last", action="store_true")
    train.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    train.add_argument("--matmul", help="a `matmul` JSON to compare with (else measured here)")
    train.add_argument("--matmul-size", type=int, default=8192)
    for command in (matmul, train):
        command.add_argument("--json", help="also write the result to this file")
    summary = sub.add_parser("summary", help="summary.json and summary.md of a gpu.sh output folder")
    summary.add_argument("folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "summary":
        run_summary(args)
        return 0
    result = run_matmul(args) if args.command == "matmul" else run_train(args)
    line = json.dumps(result)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    print_warnings(f"partial_fc.perf.gpu {args.command}", result)
    return 0 if result.get("status", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
