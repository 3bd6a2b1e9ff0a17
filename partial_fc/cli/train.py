"""`partial-fc train CONFIG`: the training application (arcface_torch-style config, any launcher).

The config is loaded and validated on every rank before any collective starts, so a typo, a bad value or
a missing data set fails every rank alike with one message. `--set key=value` and `PFC_<KEY>` variables
override the file; `--resume`, `--perf-steps` and `--profile` are shorthands for their config keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from partial_fc.cli.common import print_rank0
from partial_fc.comm import get_communicator
from partial_fc.engine.config import format_config, load_config
from partial_fc.engine.trainer import Trainer
from partial_fc.engine.watchdog import collective_timeout
from partial_fc.perf.conditions import BenchConditions, print_warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default="synthetic",
        help="a config file, or the name of one in partial_fc/configs/ (default: synthetic)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output")
    parser.add_argument("--perf-steps", type=int, metavar="N", help="time N steps (after 2 warm-up steps), then stop")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler trace to output/profile")
    parser.add_argument("--summary", metavar="FILE", help="also write the final summary (JSON) to FILE")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.resume:
        extra.append("resume=true")
    if args.perf_steps is not None:
        extra.append(f"perf_steps={args.perf_steps}")
    if args.profile:
        extra.append("profile=true")
    return list(args.overrides) + extra


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args), os.environ)
    comm = get_communicator(cfg.backend, timeout_s=collective_timeout(cfg.stall_timeout))
    if comm.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, _local_ranks())))
    print_rank0(comm, format_config(cfg))
    conditions = BenchConditions(comm.world_size) if cfg.perf_steps else None  # perf mode states its conditions
    trainer = Trainer(cfg, comm)  # locks the output folder and writes config.json there
    try:
        if cfg.resume:
            trainer.resume()
        result = trainer.fit()
    finally:
        trainer.close()
    summary = {
        "job": "train",
        "network": cfg.network,
        "embedding_size": cfg.embedding_size,
        "output": cfg.output,
        "ranks": comm.world_size,
        "perf_steps": cfg.perf_steps,
        "val_sets": [str(entry.path) for entry in trainer.verifier.sets],
        **dataclasses.asdict(result),
    }
    if conditions is not None:
        summary.update(conditions.finish())
    print_rank0(comm, summary)
    if comm.rank == 0:
        print_warnings("partial-fc train", summary)
    if args.summary and comm.rank == 0:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _local_ranks() -> int:
    """Processes of this job on this host, from the launcher's environment."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1
