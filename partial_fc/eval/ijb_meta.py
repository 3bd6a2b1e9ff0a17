"""The IJB-B / IJB-C protocol files of insightface's release layout, parsed and checked line by line.

A release folder holds ``loose_crop/*.jpg`` and ``meta/`` with (``<p>`` is ``ijbc`` or ``ijbb``):
``<p>_name_5pts_score.txt`` (image, 5 landmarks x y, faceness score), ``<p>_face_tid_mid.txt`` (image, template,
media; the same images in the same order), ``<p>_template_pair_label.txt`` (template, template, 0/1) and the 1:N
lists ``<p>_1N_gallery_G1.csv``/``_G2.csv`` (IJB-B: ``_S1``/``_S2``) and ``<p>_1N_probe_mixed.csv`` with columns
``TEMPLATE_ID`` and ``SUBJECT_ID``. A bad line is one :class:`InputError` naming the file and the line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partial_fc.errors import InputError, MissingInputError

TARGETS = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
"""Each target's two 1:N galleries, as their CSV files name them."""


@dataclass(frozen=True)
class ImageList:
    """Every image of the release, in the order of the meta files."""

    names: list[str]
    landmarks: np.ndarray
    """[N, 5, 2] float32, in the loose crop's pixels."""
    faceness: np.ndarray
    """[N] float32 detector scores."""
    templates: np.ndarray
    """[N] int64 template id of each image."""
    medias: np.ndarray
    """[N] int64 media (photo or video) id of each image."""
    source: Path
    """The landmark file, for messages about a line of it."""


@dataclass(frozen=True)
class TemplatePairs:
    """The 1:1 pair list: template ids and same-subject labels."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray
    """[P] bool."""
    source: Path


@dataclass(frozen=True)
class TemplateSubjects:
    """A 1:N list (a gallery or the probes): its templates, ascending, and each one's subject."""

    name: str
    templates: np.ndarray
    subjects: np.ndarray
    source: Path


@dataclass(frozen=True)
class Protocol:
    """One target's parsed release; ``galleries`` and ``probes`` are empty/None without the 1:N CSVs."""

    target: str
    root: Path
    images: ImageList
    pairs: TemplatePairs
    galleries: tuple[TemplateSubjects, ...]
    probes: TemplateSubjects | None

    @property
    def image_folder(self) -> Path:
        return self.root / "loose_crop"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _number(text: str, kind: type, path: Path, line: int, what: str):
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{path}:{line}: {what} {text!r} is not a number") from None


def read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<p>_name_5pts_score.txt``: image names, landmarks [N, 5, 2] and faceness scores [N]."""
    names, values = [], []
    for line, text in enumerate(_lines(path), 1):
        parts = text.split()
        if len(parts) != 12:
            raise InputError(f"{path}:{line}: expected 12 columns (image, 5 landmarks x y, score), got {len(parts)}")
        names.append(parts[0])
        values.append([_number(p, float, path, line, "landmark or score") for p in parts[1:]])
    if not names:
        raise InputError(f"{path}: no images listed")
    table = np.asarray(values, dtype=np.float32)
    return names, table[:, :10].reshape(-1, 5, 2), table[:, 10].copy()


def read_templates_medias(path: Path, names: list[str], names_source: Path) -> tuple[np.ndarray, np.ndarray]:
    """``<p>_face_tid_mid.txt``: template and media id of each image, checked to list ``names`` in order."""
    rows = _lines(path)
    if len(rows) != len(names):
        raise InputError(f"{path}: {len(rows)} lines but {names_source} lists {len(names)} images")
    ids = np.empty((len(rows), 2), dtype=np.int64)
    for line, (text, name) in enumerate(zip(rows, names), 1):
        parts = text.split()
        if len(parts) != 3:
            raise InputError(f"{path}:{line}: expected 3 columns (image, template id, media id), got {len(parts)}")
        if parts[0] != name:
            raise InputError(f"{path}:{line}: image {parts[0]!r}, but line {line} of {names_source} is {name!r}")
        ids[line - 1] = [_number(p, int, path, line, "id") for p in parts[1:]]
    return ids[:, 0].copy(), ids[:, 1].copy()


def _first_bad_pair_line(path: Path) -> InputError:
    for line, text in enumerate(_lines(path), 1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 3:
            return InputError(f"{path}:{line}: expected 3 columns (template, template, label), got {len(parts)}")
        for part in parts:
            _number(part, int, path, line, "value")
    return InputError(f"{path}: not a list of 'template template label' lines")


def read_pairs(path: Path) -> TemplatePairs:
    """``<p>_template_pair_label.txt`` through numpy's C parser (15.7M lines in seconds); a bad line is found
    by a line-by-line scan only when that parse fails."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        raise _first_bad_pair_line(path) from None
    if table.shape[0] == 0:
        raise InputError(f"{path}: no pairs listed")
    if table.shape[1] != 3:
        raise _first_bad_pair_line(path)
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise InputError(f"{path}: pair {bad[0] + 1} has label {table[bad[0], 2]}, expected 0 or 1")
    return TemplatePairs(table[:, 0].copy(), table[:, 1].copy(), table[:, 2] == 1, path)


def read_template_subjects(path: Path, name: str) -> TemplateSubjects:
    """A 1:N CSV: its templates (ascending) and the subject of each, from the first row naming the template."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = [column.strip() for column in next(rows, [])]
        missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in header]
        if missing:
            raise InputError(f"{path}:1: missing column {', '.join(missing)} (header: {','.join(header)})")
        t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        subject_of: dict[int, int] = {}
        for line, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
            template = _number(row[t_col].strip(), int, path, line, "TEMPLATE_ID")
            subject_of.setdefault(template, _number(row[s_col].strip(), int, path, line, "SUBJECT_ID"))
    if not subject_of:
        raise InputError(f"{path}: no templates listed")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return TemplateSubjects(name, templates, np.array([subject_of[t] for t in templates], dtype=np.int64), path)


def _check_known(templates: np.ndarray, known: np.ndarray, path: Path, by_line: bool) -> None:
    """Every id of ``templates`` must be a template with images; ``by_line``: entry i is line i + 1 of ``path``."""
    unknown = np.flatnonzero(~np.isin(templates, known))
    if unknown.size:
        where = f"{path}:{unknown[0] + 1}" if by_line else str(path)
        raise InputError(f"{where}: template {templates[unknown[0]]} has no images in the face_tid_mid list")


def _csv_path(root: Path, file_name: str) -> Path:
    """insightface keeps the 1:N CSVs in ``meta/``; a release with them beside ``meta/`` works too."""
    in_meta = root / "meta" / file_name
    return in_meta if in_meta.is_file() or not (root / file_name).is_file() else root / file_name


def load_protocol(root: str | Path, target: str = "IJBC") -> Protocol:
    """Parse and cross-check ``target``'s files under ``root``; 1:N is left out when none of its CSVs exist."""
    root = Path(root)
    if target not in TARGETS:
        raise InputError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such IJB release folder")
    prefix = target.lower()
    landmark_file = root / "meta" / f"{prefix}_name_5pts_score.txt"
    names, landmarks, faceness = read_landmarks(landmark_file)
    templates, medias = read_templates_medias(root / "meta" / f"{prefix}_face_tid_mid.txt", names, landmark_file)
    images = ImageList(names, landmarks, faceness, templates, medias, landmark_file)
    known = np.unique(templates)
    pairs = read_pairs(root / "meta" / f"{prefix}_template_pair_label.txt")
    _check_known(pairs.first, known, pairs.source, True)
    _check_known(pairs.second, known, pairs.source, True)
    csv_files = [_csv_path(root, f"{prefix}_1N_gallery_{g}.csv") for g in TARGETS[target]]
    csv_files.append(_csv_path(root, f"{prefix}_1N_probe_mixed.csv"))
    if not any(path.is_file() for path in csv_files):
        return Protocol(target, root, images, pairs, (), None)
    lists = [read_template_subjects(path, name) for path, name in zip(csv_files, (*TARGETS[target], "probes"))]
    for entry in lists:
        _check_known(entry.templates, known, entry.source, False)
    for gallery in lists[:2]:
        subjects, counts = np.unique(gallery.subjects, return_counts=True)
        if (counts > 1).any():
            raise InputError(
                f"{gallery.source}: subject {subjects[counts > 1][0]} has "
                f"{counts[counts > 1][0]} templates; a gallery holds one per subject"
            )
    return Protocol(target, root, images, pairs, tuple(lists[:2]), lists[2])
