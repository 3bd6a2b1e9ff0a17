"""The names of a checkpoint's folders and files, and the version of the format they hold."""

from __future__ import annotations

import re

FORMAT = "partial_fc.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
BACKBONE = "backbone.pt"
BACKBONE_OPTIMIZER = "backbone_optimizer.pt"
TRAINING = "training.pt"
OWNER = ".owner"  # in a `.partial` folder: the process writing it (removed before the rename)
STEP_DIR = re.compile(r"^step_(\d{8,})$")
LEFTOVER = re.compile(r"^\.(step_\d{8,}\.(partial|old)|latest\..*\.tmp)$")


def step_dir_name(step: int) -> str:
    """`step_00001234`: the directory name of the checkpoint taken after `step` steps."""
    return f"step_{step:08d}"


def centers_name(start: int, end: int) -> str:
    """`centers_<start>-<end>.pt`: the file of the center rows [start, end) and their optimizer state."""
    return f"centers_{start}-{end}.pt"


def rank_name(rank: int) -> str:
    """`rank_<k>.pt`: the file of rank k's sampler position and random generator states."""
    return f"rank_{rank}.pt"
