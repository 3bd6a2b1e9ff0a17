"""`partial-fc eval`: verification accuracy of a trained backbone on `.bin` sets and pair lists (LFW protocol).

For each set: accuracy mean and std over 10 folds (each image's embedding added to its flip's, as
insightface), the best threshold, TAR at FAR 1e-4 and 1e-3, the mean embedding norm, and optionally the
ROC curve as a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import torch

from partial_fc.cli.weights import load_backbone, pick_device
from partial_fc.data.binfile import load_bin
from partial_fc.data.datasets import PairListDataset
from partial_fc.errors import InputError, MissingInputError
from partial_fc.eval.roc import plot_roc, roc_curve
from partial_fc.eval.verification import VerificationResult, compute_embeddings, evaluate, pair_distances

FARS = (1e-4, 1e-3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="backbone.pth, a checkpoint folder or a checkpoint root")
    parser.add_argument("--network", required=True, help="backbone name (r50, mbf, vit_t, ...)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument(
        "--bin",
        action="append",
        default=[],
        metavar="FILE",
        help="an insightface .bin verification set (lfw.bin, ...); repeatable",
    )
    parser.add_argument(
        "--pairs",
        action="append",
        default=[],
        metavar="LIST:ROOT",
        help="a pair list of 'path1 path2 issame' lines and the folder its paths are under; repeatable",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--roc-dir", default=None, help="write <set>_roc.png here for each set")
    parser.add_argument("--json", action="store_true", help="one JSON line per set instead of text")


@dataclass(frozen=True)
class PairSet:
    """One set named on the command line: a display name, its file and, for a pair list, the image folder."""

    name: str
    source: str
    root: str | None

    def load(self) -> tuple[torch.Tensor, list[bool]]:
        """Images [2N, 3, 112, 112] normalised as in training, and the N same-identity flags."""
        if self.root is None:
            return load_bin(self.source)
        return PairListDataset(self.source, self.root).load()


def _pair_list(spec: str) -> tuple[str, str]:
    pair_list, sep, root = spec.rpartition(":")
    if not sep or not pair_list or not root:
        raise InputError(f"--pairs {spec!r}: expected LIST:ROOT (a pair list file and its image folder)")
    if not os.path.isfile(pair_list):
        raise MissingInputError(f"{pair_list}: no such pair list")
    if not os.path.isdir(root):
        raise MissingInputError(f"{root}: no such image folder (for {pair_list})")
    return pair_list, root


def find_sets(bins: list[str], pair_specs: list[str]) -> list[PairSet]:
    """The sets named on the command line, each file checked to exist; names are file stems made unique."""
    sources: list[tuple[str, str | None]] = []
    for path in bins:
        if not os.path.isfile(path):
            raise MissingInputError(f"{path}: no such .bin file")
        sources.append((path, None))
    sources.extend(_pair_list(spec) for spec in pair_specs)
    sets, seen = [], {}
    for source, root in sources:
        stem = os.path.splitext(os.path.basename(source))[0]
        seen[stem] = seen.get(stem, 0) + 1
        sets.append(PairSet(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}", source, root))
    return sets


def _finite(value: float) -> float | None:
    """JSON has no inf or nan: those become null."""
    return value if math.isfinite(value) else None


def _far_note(far: float, negatives: int) -> str:
    """Why a FAR cannot be met exactly with this many negative pairs, or ''."""
    if far * negatives >= 1:
        return ""
    return f"below 1/{negatives} negative pairs: no false accept allowed"


def report(name: str, source: str, result: VerificationResult, negatives: int, roc_path: str | None) -> dict:
    """The numbers of one set as a JSON-ready dict."""
    return {
        "set": name,
        "source": source,
        "pairs": result.num_pairs,
        "positive_pairs": result.num_pairs - negatives,
        "negative_pairs": negatives,
        "accuracy": result.accuracy,
        "accuracy_std": result.accuracy_std,
        "fold_accuracies": result.fold_accuracies.tolist(),
        "threshold": result.threshold,
        "tar_at_far": {
            f"{far:.0e}": {
                "tar": _finite(point.tar),
                "threshold": _finite(point.threshold),
                "achieved_far": _finite(point.achieved_far),
                "resolvable": not _far_note(far, negatives),
            }
            for far, point in result.tar_at_far.items()
        },
        "xnorm": result.xnorm,
        "roc": roc_path,
    }


def _text(entry: dict) -> str:
    lines = [
        f"{entry['set']} ({entry['source']}): {entry['pairs']} pairs, {entry['positive_pairs']} same, "
        f"{entry['negative_pairs']} different",
        f"  accuracy      {entry['accuracy']:.5f} ± {entry['accuracy_std']:.5f}  (10 folds, with flip)",
        f"  threshold     {entry['threshold']:.2f}",
    ]
    for far, point in entry["tar_at_far"].items():
        note = (
            ""
            if point["resolvable"]
            else f"  ({_far_note(float(far), entry['negative_pairs'])}; achieved FAR {point['achieved_far']:.3g})"
        )
        tar = "n/a" if point["tar"] is None else f"{point['tar']:.5f}"
        lines.append(f"  TAR@FAR={far} {tar}{note}")
    lines.append(f"  xnorm         {entry['xnorm']:.5g}")
    if entry["roc"]:
        lines.append(f"  ROC           {entry['roc']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.bin and not args.pairs:
        raise InputError("nothing to evaluate: give --bin FILE and/or --pairs LIST:ROOT")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    sets = find_sets(args.bin, args.pairs)
    device = pick_device(args.device)
    model = load_backbone(args.weights, args.network, args.embedding_size).to(device)
    if args.roc_dir:
        os.makedirs(args.roc_dir, exist_ok=True)
    for pair_set in sets:
        images, issame = pair_set.load()
        embeddings, flips = compute_embeddings(model, images, batch_size=args.batch_size, flip=True, device=device)
        del images
        result = evaluate(embeddings, issame, flips, fars=FARS)
        negatives = issame.count(False)
        roc_path = None
        if args.roc_dir:
            dist, _ = pair_distances(embeddings, flips)
            roc_path = os.path.join(args.roc_dir, f"{pair_set.name}_roc.png")
            plot_roc(
                {f"{args.network} on {pair_set.name}": roc_curve(dist, issame)},
                roc_path,
                title=f"ROC: {pair_set.name} ({result.num_pairs} pairs)",
                mark_fars=FARS,
            )
        entry = report(pair_set.name, pair_set.source, result, negatives, roc_path)
        print(json.dumps(entry) if args.json else _text(entry), flush=True)
    return 0
