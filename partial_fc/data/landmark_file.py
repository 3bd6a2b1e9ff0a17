"""insightface's 5-point landmark lists (IJB's ``meta/ijbc_name_5pts_score.txt``): one image per line,
``relative/path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [faceness]``, separated by spaces."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from partial_fc.errors import InputError, MissingInputError


@dataclass(frozen=True)
class LandmarkEntry:
    """One line: the image's path relative to the image root, its 5 points, its faceness score (1.0 when absent)."""

    path: str
    landmarks: np.ndarray
    faceness: float
    line: int


def format_landmark_line(path: str, landmarks: np.ndarray, faceness: float) -> str:
    """One line of the list (no newline), points and score printed to 1e-6."""
    points = " ".join(f"{value:.6f}" for value in np.asarray(landmarks, dtype=np.float64).reshape(-1))
    return f"{path} {points} {faceness:.6f}"


def parse_landmark_line(text: str, where: str, line: int) -> LandmarkEntry:
    """The entry on one line; `where` names the file in the InputError a malformed line raises."""
    fields = text.split()
    if len(fields) not in (11, 12):
        raise InputError(
            f"{where}, line {line}: expected 'path x1 y1 ... x5 y5 [faceness]' (11 or 12 fields), got {len(fields)}"
        )
    path = fields[0]
    if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
        raise InputError(f"{where}, line {line}: {path}: the image path must be relative and stay inside the root")
    try:
        values = [float(value) for value in fields[1:]]
    except ValueError as error:
        raise InputError(f"{where}, line {line}: {path}: not a number ({error})") from None
    if not all(math.isfinite(value) for value in values):
        raise InputError(f"{where}, line {line}: {path}: landmarks and score must be finite numbers")
    faceness = values[10] if len(values) == 11 else 1.0
    return LandmarkEntry(path, np.array(values[:10]).reshape(5, 2), faceness, line)


def read_landmark_file(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[LandmarkEntry], list[str]]:
    """The entries of a landmark list and, with `skip_bad`, the messages of the malformed lines left out
    (without it the first one raises). Blank lines are ignored; a path listed twice is malformed."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise MissingInputError(f"{where}: no such landmark file")
    entries: list[LandmarkEntry] = []
    bad: list[str] = []
    first_line: dict[str, int] = {}
    with open(where, encoding="utf-8", errors="surrogateescape") as file:
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                entry = parse_landmark_line(text, where, number)
                if entry.path in first_line:
                    raise InputError(
                        f"{where}, line {number}: {entry.path} is already listed on line {first_line[entry.path]}"
                    )
            except InputError as error:
                if not skip_bad:
                    raise
                bad.append(str(error))
                continue
            first_line[entry.path] = number
            entries.append(entry)
    return entries, bad
