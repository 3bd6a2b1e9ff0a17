"""`partial-fc eval-ijb`: IJB-B / IJB-C 1:1 verification and 1:N identification, as insightface publishes them.

Every rank embeds its share of the images (any launcher); rank 0 pools, scores, prints the tables and writes
``results.json``, ``roc.png`` and the image features (``features.npy`` + ``features_images.txt``) to ``--output``.
``--features`` re-scores saved features without a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from partial_fc.cli.weights import load_backbone, pick_device
from partial_fc.comm import Communicator, get_communicator
from partial_fc.comm.launch import BACKENDS
from partial_fc.errors import InputError, MissingInputError
from partial_fc.eval.ijb import FARS, FPIRS, RANKS, evaluate_protocol
from partial_fc.eval.ijb_embed import Embedder, image_features, load_features, save_features
from partial_fc.eval.ijb_meta import TARGETS, load_protocol
from partial_fc.eval.roc import plot_roc
from partial_fc.export import onnx_session, run_onnx
from partial_fc.fileio import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="the release folder (meta/ and loose_crop/, insightface's layout)")
    parser.add_argument("--target", choices=sorted(TARGETS), default="IJBC")
    parser.add_argument("--output", required=True, help="folder for results.json, roc.png and the features")
    parser.add_argument("--weights", help="backbone.pth, a checkpoint folder or a checkpoint root")
    parser.add_argument("--network", help="backbone name (r50, mbf, vit_t, ...)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--onnx", metavar="MODEL", help="embed with this exported .onnx model in onnxruntime")
    parser.add_argument("--features", metavar="FILE", help="re-score these saved features (.npy) instead of embedding")
    parser.add_argument("--no-faceness", action="store_true", help="do not weight images by their faceness score")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: the rank's GPU when present, else cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="communication backend")


def _embedder(args: argparse.Namespace, device: torch.device) -> Embedder:
    if args.onnx:
        session = onnx_session(args.onnx)
        return lambda images: run_onnx(session, images)
    model = load_backbone(args.weights, args.network, args.embedding_size).to(device)

    def embed(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(images).float().cpu().numpy()

    return embed


def _check_sources(args: argparse.Namespace) -> None:
    given = [bool(args.features), bool(args.onnx), bool(args.weights or args.network)]
    if sum(given) != 1:
        raise InputError("give exactly one of --features FILE, --onnx MODEL, or --weights and --network")
    if given[2] and not (args.weights and args.network):
        raise InputError("give --weights and --network together")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}"


def tables(result: dict) -> str:
    """The published-style tables of one result, in percent."""
    v = result["verification"]
    head = "".join(f"{far:>9}" for far in v["tar_at_far"])
    lines = [
        f"{result['target']} 1:1 verification: {v['pairs']} pairs ({v['positive_pairs']} same, "
        f"{v['negative_pairs']} different), {result['templates']} templates, {result['images']} images, "
        f"faceness {'on' if result['faceness'] else 'off'}",
        f"{'TAR (%) @ FAR':<44}{head}",
        f"{'  ROC point nearest the FAR (eval_ijbc.py)':<44}"
        + "".join(f"{_percent(p['published']):>9}" for p in v["tar_at_far"].values()),
        f"{'  best at FAR <= target (-: below 1 pair)':<44}"
        + "".join(f"{_percent(p['strict']):>9}" for p in v["tar_at_far"].values()),
    ]
    ident = result.get("identification")
    if ident:
        fpirs = "".join(f"{'TPIR@' + format(f, 'g'):>12}" for f in FPIRS)
        lines += [
            "",
            f"{result['target']} 1:N identification: {ident['probes']} probe templates (%)",
            f"{'gallery':<10}{'mated':>8}" + "".join(f"{'rank-' + str(k):>9}" for k in RANKS) + fpirs,
        ]
        for name, g in ident["galleries"].items():
            lines.append(
                f"{name:<10}{g['mated_probes']:>8}"
                + "".join(f"{_percent(g['rank'][str(k)]):>9}" for k in RANKS)
                + "".join(f"{_percent(g['tpir_at_fpir'][format(f, 'g')]['tpir']):>12}" for f in FPIRS)
            )
        mean = ident["mean"]
        lines.append(
            f"{'mean':<10}{'':>8}"
            + "".join(f"{_percent(mean['rank'][str(k)]):>9}" for k in RANKS)
            + "".join(f"{_percent(mean['tpir_at_fpir'][format(f, 'g')]):>12}" for f in FPIRS)
        )
    return "\n".join(lines)


def _features(args: argparse.Namespace, protocol, comm: Communicator, output: Path) -> np.ndarray | None:
    """Saved or freshly embedded features on rank 0 (saved to ``output``), None on the other ranks."""
    if args.features:
        return load_features(Path(args.features), protocol.images) if comm.rank == 0 else None
    device = pick_device(args.device) if args.device else comm.device
    features = image_features(
        _embedder(args, device), protocol.image_folder, protocol.images, comm, args.batch_size, device
    )
    if comm.rank != 0:
        return None
    save_features(output / "features.npy", features, protocol.images)
    return features


def run(args: argparse.Namespace) -> int:
    _check_sources(args)
    comm = get_communicator(args.backend)
    protocol = load_protocol(args.root, args.target)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise MissingInputError(f"{output.parent}: no such folder for --output")
    output.mkdir(exist_ok=True)
    features = _features(args, protocol, comm, output)
    if features is None:
        return 0
    result, curve = evaluate_protocol(protocol, features, use_faceness=not args.no_faceness)
    plot_roc(
        {f"{args.target} ({Path(args.features or args.onnx or args.weights).name})": curve},
        output / "roc.png",
        title=f"ROC on {args.target} 1:1",
        mark_fars=FARS,
    )
    result["roc"] = str(output / "roc.png")
    result["features"] = str(Path(args.features) if args.features else output / "features.npy")
    with atomic_path(output / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    print(tables(result), flush=True)
    return 0
