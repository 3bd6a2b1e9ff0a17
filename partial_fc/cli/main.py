"""The `partial-fc` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partial_fc import __version__
from partial_fc.cli import align, bench, check_data, demo, eval_ijb, im2rec, make_synthetic, rebuild_idx, train, unpack
from partial_fc.cli import embed as embed_cli
from partial_fc.cli import eval as eval_cli
from partial_fc.cli import export as export_cli
from partial_fc.cli.common import fail
from partial_fc.comm import close_communicator, exit_process
from partial_fc.engine.preemption import TrainingPreempted
from partial_fc.errors import PartialFCError

SUBCOMMANDS = {
    "train": (train, "train a face-recognition backbone and its Partial FC head from a config"),
    "demo": (demo, "train a small network and the Partial FC head on generated identities"),
    "bench": (bench, "benchmarks (bench head ...)"),
    "rebuild-idx": (rebuild_idx, "rebuild a lost .idx from its .rec"),
    "check-data": (
        check_data,
        "check every record of a face set (framing, headers, labels, images); list the bad ones",
    ),
    "make-synthetic": (make_synthetic, "write a generated face set (RecordIO + .bin) with learnable identities"),
    "im2rec": (
        im2rec,
        "image folder -> .lst -> RecordIO face set (MXNet's im2rec, insightface's layout)",
    ),
    "align": (align, "images + 5-point landmarks (insightface's IJB _5pts list) -> aligned ArcFace crops"),
    "unpack": (
        unpack,
        "RecordIO face sets -> id_<label>/<label>_<n>.jpg folders (unpack_glint360k.py)",
    ),
    "eval": (eval_cli, "verification accuracy, TAR@FAR and ROC of a trained backbone on .bin sets and pair lists"),
    "eval-ijb": (
        eval_ijb,
        "IJB-B / IJB-C 1:1 TAR@FAR and 1:N identification of a backbone, as insightface publishes them",
    ),
    "export": (export_cli, "a trained backbone as ONNX (dynamic batch), checked against torch with onnxruntime"),
    "embed": (embed_cli, "embeddings of image files, through the torch backbone or an exported ONNX model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partial-fc", description="Partial FC face-recognition training")
    parser.add_argument("--version", action="version", version=f"partial-fc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _ = SUBCOMMANDS[args.command]
    try:
        status = module.run(args)
    except TrainingPreempted as stop:  # rank 0 has said how to resume
        status = stop.exit_status
    except PartialFCError as error:
        status = fail(str(error))
    # Reached by every rank alike (input errors are raised collectively); other failures skip it.
    close_communicator()
    return status


def run() -> None:
    """The `partial-fc` console command: `main()`, then a clean exit that skips interpreter finalisation."""
    exit_process(main())


if __name__ == "__main__":
    run()
