"""A small IJB-C-format set of generated identities, in insightface's layout, for testing IJB evaluation end to end.

Subjects are generated identities numbered from `first_identity` (default 1,000,000): the attributes of an identity
are a pure function of (seed, identity) drawn from the same distribution as the training identities
0..identities-1 of `make-synthetic` and its held-out verification identities just above them, so a backbone
trained on `make-synthetic` data embeds these subjects as it embeds the held-out ones, without having seen them
(any training set below a million identities). Each image is the 112 x 112 rendering (`render_identity_image`,
already in the ArcFace frame, as training images are) placed by a random similarity (rotation, scale, shift) on a
larger canvas: an unaligned loose crop. Its landmarks are the ArcFace template points under that similarity plus
a little jitter, so aligning by them recovers the rendering, and not aligning does not.

Under OUT: ``loose_crop/N.jpg``; in ``meta/`` (where insightface's ijb scripts read all of them)
``ijbc_face_tid_mid.txt`` (``image template media``), ``ijbc_template_pair_label.txt`` (``t1 t2 label``),
``ijbc_name_5pts_score.txt`` (``image x1 y1 ... x5 y5 faceness``) and the 1:N protocol's
``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``, ``ijbc_1N_probe_mixed.csv``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from partial_fc.data.align import ARCFACE_DST
from partial_fc.data.landmark_file import format_landmark_line
from partial_fc.data.synthetic import IMAGE_SIZE, encode_jpeg, render_identity_image
from partial_fc.errors import InputError
from partial_fc.fileio import atomic_path

IJB_FIRST_IDENTITY = 1_000_000
PROTOCOL_COLUMNS = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
LANDMARK_JITTER = 1.0  # pixels of the 112 x 112 frame (standard deviation per coordinate)


@dataclass(frozen=True)
class IjbImage:
    """One image of the set: file name under loose_crop/, template, media, subject (= generated identity) and
    the identity's rendering index."""

    name: str
    template: int
    media: int
    subject: int
    index: int


def ijb_plan(
    identities: int,
    templates_per_identity: int = 4,
    medias_per_template: int = 2,
    images_per_media: int = 3,
    first_identity: int = IJB_FIRST_IDENTITY,
) -> list[IjbImage]:
    """Every image of the set, subject by subject; templates, medias and images are numbered from 1."""
    counter = itertools.count(1)
    plan = []
    for subject in range(first_identity, first_identity + identities):
        for template in range(templates_per_identity):
            template_id = (subject - first_identity) * templates_per_identity + template + 1
            for media in range(medias_per_template):
                media_id = (template_id - 1) * medias_per_template + media + 1
                for image in range(images_per_media):
                    index = (template * medias_per_template + media) * images_per_media + image
                    plan.append(IjbImage(f"{next(counter)}.jpg", template_id, media_id, subject, index))
    return plan


def loose_crop(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`face` (112 x 112 RGB) placed on a larger cluttered canvas by a random similarity; (canvas, its 2x3 matrix)."""
    scale = rng.uniform(0.8, 1.6)
    angle = math.radians(rng.uniform(-30.0, 30.0))
    side = int(round(IMAGE_SIZE * scale * rng.uniform(1.5, 1.9)))
    centre = side / 2 + rng.uniform(-0.05, 0.05, size=2) * side
    linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = np.hstack([linear, (centre - linear @ np.full(2, IMAGE_SIZE / 2))[:, None]])
    blotches = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    canvas = cv2.resize(blotches, (side, side), interpolation=cv2.INTER_LINEAR)  # smooth clutter around the face
    cv2.warpAffine(face, matrix, (side, side), dst=canvas, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
    return canvas, matrix


def placed_landmarks(matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ArcFace template points under `matrix`, jittered by LANDMARK_JITTER pixels of the 112 frame."""
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    return ARCFACE_DST @ matrix[:, :2].T + matrix[:, 2] + rng.normal(0.0, LANDMARK_JITTER * scale, size=(5, 2))


def _face_box(matrix: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """The bounding box (x, y, width, height) of the placed 112 x 112 face, inside the canvas."""
    corners = np.array([[0, 0], [IMAGE_SIZE, 0], [0, IMAGE_SIZE], [IMAGE_SIZE, IMAGE_SIZE]], np.float64)
    placed = corners @ matrix[:, :2].T + matrix[:, 2]
    low = np.clip(np.floor(placed.min(axis=0)), 0, side).astype(int)
    high = np.clip(np.ceil(placed.max(axis=0)), 0, side).astype(int)
    return int(low[0]), int(low[1]), int(high[0] - low[0]), int(high[1] - low[1])


def _write_text(path: Path, lines: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.write("".join(f"{line}\n" for line in lines))


def _template_pairs(plan: list[IjbImage], impostor_ratio: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Every pair of one subject's templates (label 1), and `impostor_ratio` times as many distinct pairs of
    different subjects' templates (label 0)."""
    by_subject: dict[int, list[int]] = {}
    for image in plan:
        templates = by_subject.setdefault(image.subject, [])
        if image.template not in templates:
            templates.append(image.template)
    genuine = [(a, b, 1) for templates in by_subject.values() for a, b in itertools.combinations(templates, 2)]
    subjects = list(by_subject)
    possible = sum(len(by_subject[a]) * len(by_subject[b]) for a, b in itertools.combinations(subjects, 2))
    wanted = min(possible, impostor_ratio * len(genuine))
    impostors: dict[tuple[int, int], None] = {}
    while len(impostors) < wanted:
        one, other = rng.choice(len(subjects), size=2, replace=False)
        pair = tuple(sorted((int(rng.choice(by_subject[subjects[one]])), int(rng.choice(by_subject[subjects[other]])))))
        impostors.setdefault(pair, None)
    return genuine + [(a, b, 0) for a, b in impostors]


def write_synthetic_ijb(
    out: Path,
    identities: int = 20,
    templates_per_identity: int = 4,
    medias_per_template: int = 2,
    images_per_media: int = 3,
    impostor_ratio: int = 4,
    first_identity: int = IJB_FIRST_IDENTITY,
    quality: int = 95,
    seed: int = 0,
) -> dict:
    """Write the set under `out` (see the module docstring); returns the paths written and the counts.

    1:N: the subjects are split (seeded) into thirds, G1, G2 and neither; a gallery subject's first template is
    its gallery template and every other template of every subject is a probe, so some probes have no mate.
    """
    started = time.monotonic()
    if identities < 3 or templates_per_identity < 2 or medias_per_template < 1 or images_per_media < 1:
        raise InputError(
            f"a synthetic IJB set needs at least 3 identities with 2 templates each and 1 media of 1 "
            f"image per template, got {identities}, {templates_per_identity}, {medias_per_template}, "
            f"{images_per_media}"
        )
    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality {quality} is outside 1-100")
    if first_identity < 0 or impostor_ratio < 0:
        raise InputError(f"first identity {first_identity} and impostor ratio {impostor_ratio} must be non-negative")
    out = Path(out)
    crops, meta = out / "loose_crop", out / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    plan = ijb_plan(identities, templates_per_identity, medias_per_template, images_per_media, first_identity)
    landmark_lines, boxes = [], {}
    for image in plan:
        rng = np.random.default_rng([seed, image.subject, image.index, 0x13B])
        canvas, matrix = loose_crop(render_identity_image(seed, image.subject, image.index), rng)
        points = placed_landmarks(matrix, rng)
        landmark_lines.append(format_landmark_line(image.name, points, rng.uniform(0.3, 1.0)))
        boxes[image.name] = _face_box(matrix, canvas.shape[0])
        with atomic_path(crops / image.name) as tmp, open(tmp, "wb") as file:
            file.write(encode_jpeg(canvas, quality))

    pairs = _template_pairs(plan, impostor_ratio, np.random.default_rng([seed, 0x1A1B]))
    subjects = np.random.default_rng([seed, 0x1B1B]).permutation(np.arange(first_identity, first_identity + identities))
    third = identities // 3
    galleries = {"G1": set(subjects[:third].tolist()), "G2": set(subjects[third : 2 * third].tolist())}
    first_template = {}
    for image in plan:
        first_template.setdefault(image.subject, image.template)

    def protocol_rows(keep) -> list[str]:
        return [PROTOCOL_COLUMNS] + [
            f"{image.template},{image.subject},{image.name},{image.media},{','.join(map(str, boxes[image.name]))}"
            for image in plan
            if keep(image)
        ]

    files = {
        "loose_crop": crops,
        "face_tid_mid": meta / "ijbc_face_tid_mid.txt",
        "template_pair_label": meta / "ijbc_template_pair_label.txt",
        "name_5pts_score": meta / "ijbc_name_5pts_score.txt",
        "gallery_G1": meta / "ijbc_1N_gallery_G1.csv",
        "gallery_G2": meta / "ijbc_1N_gallery_G2.csv",
        "probe_mixed": meta / "ijbc_1N_probe_mixed.csv",
    }
    _write_text(files["name_5pts_score"], landmark_lines)
    _write_text(files["template_pair_label"], [f"{a} {b} {label}" for a, b, label in pairs])
    for name in ("G1", "G2"):
        _write_text(
            files[f"gallery_{name}"],
            protocol_rows(
                lambda image, name=name: (
                    image.subject in galleries[name] and image.template == first_template[image.subject]
                )
            ),
        )
    _write_text(files["probe_mixed"], protocol_rows(lambda image: image.template != first_template[image.subject]))
    _write_text(files["face_tid_mid"], [f"{image.name} {image.template} {image.media}" for image in plan])

    enrolled = galleries["G1"] | galleries["G2"]
    probe_templates = {image.template for image in plan if image.template != first_template[image.subject]}
    unmated = {image.template for image in plan if image.template in probe_templates and image.subject not in enrolled}
    genuine = sum(label for _, _, label in pairs)
    return {
        "out": str(out),
        "files": {key: str(path) for key, path in files.items()},
        "images": len(plan),
        "subjects": identities,
        "first_identity": first_identity,
        "templates": identities * templates_per_identity,
        "medias": len({image.media for image in plan}),
        "genuine_pairs": genuine,
        "impostor_pairs": len(pairs) - genuine,
        "gallery_G1": len(galleries["G1"]),
        "gallery_G2": len(galleries["G2"]),
        "probe_templates": len(probe_templates),
        "unmated_probe_templates": len(unmated),
        "seconds": round(time.monotonic() - started, 3),
    }
