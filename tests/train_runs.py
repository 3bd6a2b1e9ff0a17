"""Tiny `partial-fc train` runs on a generated face set: the set, their arguments, and what a run wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

IDENTITIES, PER_ID = 40, 8  # 320 images: 10 steps per epoch at 2 ranks x batch 16


def call_quiet(*arguments: str) -> int:
    from partial_fc.cli.main import main

    return main(list(arguments))


def make_faceset(out: Path) -> Path:
    """IDENTITIES x PER_ID generated faces and 200 verification pairs in `out` (the `faceset` fixture's set)."""
    status = call_quiet(
        "make-synthetic",
        "--identities",
        str(IDENTITIES),
        "--images-per-id",
        str(PER_ID),
        "--out",
        str(out),
        "--pairs",
        "200",
        "--workers",
        "1",
    )
    assert status == 0
    return out


def tiny_run(data: Path, output: Path, **extra) -> dict:
    """The config values of a tiny, fast run on `data`, writing to `output`; `extra` adds or replaces values."""
    values = dict(
        rec=data,
        output=output,
        num_classes=IDENTITIES,
        num_image=IDENTITIES * PER_ID,
        batch_size=16,
        embedding_size=32,
        num_workers=0,
        frequent=1,
        verbose=1000,
        num_epoch=1,
        warmup_epoch=0,
        sample_rate=0.5,
    )
    values.update(extra)
    return values


def settings(data: Path, output: Path, **extra) -> list[str]:
    """`partial-fc train synthetic` arguments for a tiny, fast run on `data`, writing to `output`."""
    return [part for key, value in tiny_run(data, output, **extra).items() for part in ("--set", f"{key}={value}")]


def train_argv(data: Path, output: Path, *more: str, **extra) -> list[str]:
    return ["-m", "partial_fc", "train", "synthetic", *settings(data, output, **extra), *more]


def summary(stdout: str) -> dict:
    lines = [re.sub(r"\[[\d,]+\]<std(out|err)>:", "", line).strip() for line in stdout.splitlines()]  # launcher tags
    found = [json.loads(line) for line in lines if line.startswith('{"job": "train"')]
    assert len(found) == 1, stdout
    return found[0]


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(output: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(output)}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by name, the center shards and their optimizer rows joined by class range."""
    tensors = {f"backbone.{key}": value for key, value in torch.load(path / "backbone.pt").items()}
    for index, state in torch.load(path / "backbone_optimizer.pt")["state"].items():
        tensors.update({f"backbone_optimizer.{index}.{key}": value for key, value in state.items()})
    shards = sorted((torch.load(file) for file in path.glob("centers_*.pt")), key=lambda shard: shard["start"])
    assert [shard["start"] for shard in shards[1:]] == [shard["end"] for shard in shards[:-1]]
    tensors["centers"] = torch.cat([shard["weight"] for shard in shards])
    for key in shards[0]["row_state"]:
        tensors[f"centers.{key}"] = torch.cat([shard["row_state"][key] for shard in shards])
    return tensors
