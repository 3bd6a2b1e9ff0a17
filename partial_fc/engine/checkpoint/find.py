"""Finding the checkpoints in a root: the complete ones, newest (saved last) first."""

from __future__ import annotations

import json
import math
from pathlib import Path

from partial_fc.engine.checkpoint.layout import MANIFEST, STEP_DIR
from partial_fc.errors import MissingInputError
from partial_fc.fileio import PathLike


def _sequence(directory: Path) -> int | None:
    """The save sequence in `directory`'s manifest (0 for manifests from before it existed); None if unreadable."""
    try:
        sequence = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("sequence", 0)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None


def checkpoints_newest_first(root: Path) -> list[tuple[Path, int | None]]:
    """Complete checkpoints (`step_*` folders holding a manifest: only a finished save renames one into place) with
    their save sequence, the last saved first (then the higher step); unreadable manifests come first, to be
    reported and passed over rather than hidden."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((child, _sequence(child), int(match.group(1))))
    found.sort(key=lambda item: (math.inf if item[1] is None else item[1], item[2]), reverse=True)
    return [(path, sequence) for path, sequence, _ in found]


def next_sequence(root: Path) -> int:
    """The save sequence of the next checkpoint in `root`: one above every readable one there."""
    return 1 + max((sequence for _, sequence in checkpoints_newest_first(root) if sequence is not None), default=0)


def find_latest(root: PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (saved last, whatever its step; `latest` is only a hint for
    people), `root` itself if it is one, or None."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    complete = checkpoints_newest_first(root)
    return complete[0][0] if complete else None


def resolve(path: PathLike) -> Path:
    """The checkpoint `path` names (itself, or a root's newest); MissingInputError when there is none."""
    path = Path(path)
    found = find_latest(path)
    if found is not None:
        return found
    if STEP_DIR.match(path.name) and path.is_dir():
        raise MissingInputError(f"checkpoint manifest {path / MANIFEST} is missing (the save did not finish)")
    raise MissingInputError(f"no complete checkpoint in {path}")


def candidates(path: PathLike) -> tuple[bool, list[str]]:
    """(named explicitly, checkpoints to try in order): `path` itself when it is a checkpoint folder, else the
    complete checkpoints under it, newest first."""
    path = Path(path)
    if (path / MANIFEST).is_file() or STEP_DIR.match(path.name):
        return True, [str(path)]
    found = [str(directory) for directory, _ in checkpoints_newest_first(path)]
    if not found:
        raise MissingInputError(f"no complete checkpoint in {path}")
    return False, found
