"""The image-folder layout, `root/<identity>/<image>`: the one scanner that `im2rec --list` and `ImageFolderDataset`
share, so a folder lists the same images with the same labels whether it is packed or trained on directly.

Identity folders sorted by name are classes 0, 1, ...; folders whose names start with "." are skipped. Within an
identity folder, files with one of the extensions (any case) are taken, sorted by name; `recursive` also takes
images from folders nested inside it (same identity, depth-first, sorted). Images lying directly in the root, an
identity folder without images, or a root without identity folders are errors naming the folder.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from partial_fc.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
"""What `decode.decode_rgb` decodes (BMP and PNG through OpenCV) and the folder scan takes by default."""


class ImageTable:
    """Image paths with a label and a `.lst` line each, held in flat buffers (no Python object per image)."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")
        self.labels = array("q")
        self.lines = array("q")

    def append(self, path: str, label: int, line: int = 0) -> None:
        """Add one image."""
        self._blob += path.encode("utf-8", "surrogateescape")
        self._ends.append(len(self._blob))
        self.labels.append(label)
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, i: int) -> str:
        """The path of image `i`."""
        start = self._ends[i - 1] if i else 0
        return self._blob[start : self._ends[i]].decode("utf-8", "surrogateescape")


class ImageFolderListing(NamedTuple):
    """A scanned image folder: its identity folder names (class `i` is `classes[i]`) and its images."""

    classes: list[str]
    images: ImageTable  # paths relative to the root, in class order


def _images_in(folder: str, exts: set[str], recursive: bool) -> Iterator[str]:
    """Image files of one identity folder, sorted (nested folders depth-first, sorted, when `recursive`)."""
    for path, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            full = os.path.join(path, name)
            if os.path.splitext(name)[1].lower() in exts and os.path.isfile(full):
                yield full
        if not recursive:
            return


def list_images(
    root: str | os.PathLike, exts: Iterable[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> ImageFolderListing:
    """Every image under `root` with its class (see the module docstring)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such image folder")
    wanted = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in exts}
    classes, loose = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            if not entry.name.startswith("."):
                classes.append(entry.name)
        elif os.path.splitext(entry.name)[1].lower() in wanted:
            loose.append(entry.name)
    if loose:
        raise DatasetError(f"{root}: holds images directly ({loose[0]}, ...); expected one sub-folder per identity")
    if not classes:
        raise DatasetError(f"{root}: no identity folders (expected one sub-folder of images per identity)")
    table = ImageTable()
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        before = len(table)
        for full in _images_in(folder, wanted, recursive):
            table.append(os.path.relpath(full, root), label)
        if len(table) == before:
            raise DatasetError(f"{folder}: identity folder holds no images ({', '.join(sorted(wanted))})")
    return ImageFolderListing(classes, table)
