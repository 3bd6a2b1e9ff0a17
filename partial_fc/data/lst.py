"""MXNet's image list (`.lst`) files, as `tools/im2rec.py` writes them: `index<TAB>label(s)<TAB>path` per line."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from partial_fc.errors import InputError
from partial_fc.fileio import atomic_path


class LstError(InputError):
    """A `.lst` file or line is malformed; the message names the file and line."""


class LstEntry(NamedTuple):
    """One line: the record index, its class label, and the image path relative to the image root."""

    index: int
    label: int
    path: str


def format_entry(entry: LstEntry) -> str:
    """The line MXNet's im2rec writes for one entry (labels printed with '%f')."""
    return f"{entry.index}\t{float(entry.label):f}\t{entry.path}\n"


def write_lst(path: str | os.PathLike, entries: Iterable[LstEntry]) -> int:
    """Write `entries` to `path` (through a temporary file, then renamed); returns the number of lines."""
    count = 0
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as out:
        for entry in entries:
            out.write(format_entry(entry))
            count += 1
    return count


def read_lst(path: str | os.PathLike) -> Iterator[LstEntry]:
    """Entries of a `.lst` file; a line without exactly 3 fields or a label that is not a class id is an error."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise LstError(
                    f"{path}, line {number}: expected 3 tab-separated fields (index, label, path), got {len(fields)}"
                )
            try:
                index, label = int(fields[0]), float(fields[1])
            except ValueError:
                raise LstError(
                    f"{path}, line {number}: index {fields[0]!r} or label {fields[1]!r} is not a number"
                ) from None
            if not label.is_integer() or label < 0:
                raise LstError(f"{path}, line {number}: label {fields[1]} is not a class id (a non-negative integer)")
            yield LstEntry(index, int(label), fields[2])
