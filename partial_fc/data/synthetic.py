"""Generated face-like identities that a network can actually learn, for the default run and the tests.

An identity is a vector of facial attributes (face shape, skin and hair colour, eye spacing and size,
brows, nose, mouth, glasses, beard); an image of it is that face drawn under nuisance that changes from
image to image (pose, scale, shift, expression, lighting, background, blur, noise). Recognising an
identity means reading its attributes through the nuisance, so what a network learns carries over to
identities it never saw: held-out identities make a meaningful verification set.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IMAGE_SIZE = 112
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class FaceAttributes:
    """One identity's appearance, in fractions of the image size and RGB colours."""

    face_width: float
    face_height: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_depth: float
    eye_spacing: float
    eye_height: float
    eye_size: float
    iris: tuple[float, float, float]
    brow_tilt: float
    brow_weight: float
    nose_length: float
    nose_width: float
    mouth_width: float
    mouth_height: float
    smile: float
    lips: tuple[float, float, float]
    glasses: bool
    beard: bool


def _colour(rng: np.random.Generator, low: float, high: float) -> tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(low, high, size=3))


def identity_attributes(seed: int, identity: int) -> FaceAttributes:
    """The attributes of `identity`, a pure function of (seed, identity)."""
    rng = np.random.default_rng([seed, identity, 0x5EED])
    tone = rng.uniform(0.25, 1.0)
    return FaceAttributes(
        face_width=rng.uniform(0.27, 0.40),
        face_height=rng.uniform(0.36, 0.47),
        skin=(min(1.0, tone * 0.95 + 0.05), tone * rng.uniform(0.62, 0.82), tone * rng.uniform(0.45, 0.7)),
        hair=_colour(rng, 0.0, 0.9),
        hair_depth=rng.uniform(0.05, 0.2),
        eye_spacing=rng.uniform(0.12, 0.24),
        eye_height=rng.uniform(0.38, 0.48),
        eye_size=rng.uniform(0.025, 0.06),
        iris=_colour(rng, 0.0, 0.8),
        brow_tilt=rng.uniform(-0.25, 0.25),
        brow_weight=rng.uniform(0.5, 2.0),
        nose_length=rng.uniform(0.07, 0.17),
        nose_width=rng.uniform(0.03, 0.08),
        mouth_width=rng.uniform(0.10, 0.26),
        mouth_height=rng.uniform(0.64, 0.76),
        smile=rng.uniform(-0.6, 1.0),
        lips=_colour(rng, 0.2, 0.9),
        glasses=bool(rng.random() < 0.3),
        beard=bool(rng.random() < 0.3),
    )


def _pixel(value: float, scale: int) -> int:
    return int(round(value * scale))


def _bgr(rgb: tuple[float, float, float], light: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, c * light * 255.0))) for c in reversed(rgb))


def render_face(attributes: FaceAttributes, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One RGB uint8 image [size, size, 3] of the face under freshly drawn nuisance from `rng`."""
    a = attributes
    big = size * _SUPERSAMPLE
    light = rng.uniform(0.75, 1.2)
    background = rng.uniform(0, 255, size=3).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, big, dtype=np.float32)[:, None] * rng.uniform(-40, 40, size=3).astype(np.float32)
    canvas = np.ascontiguousarray(np.broadcast_to((background + ramp).clip(0, 255).astype(np.uint8), (big, big, 3)))

    def at(x: float, y: float) -> tuple[int, int]:
        return _pixel(x, big), _pixel(y, big)

    cx, cy = 0.5, 0.53
    face_axes = (_pixel(a.face_width, big), _pixel(a.face_height, big))
    cv2.ellipse(
        canvas,
        at(cx, cy - a.face_height * 0.35),
        (face_axes[0] + 4, _pixel(a.face_height * 0.75 + a.hair_depth, big)),
        0,
        180,
        360,
        _bgr(a.hair, light),
        -1,
    )
    cv2.ellipse(canvas, at(cx, cy), face_axes, 0, 0, 360, _bgr(a.skin, light), -1)
    if a.beard:
        cv2.ellipse(
            canvas,
            at(cx, cy + a.face_height * 0.35),
            (face_axes[0] - 6, _pixel(a.face_height * 0.45, big)),
            0,
            0,
            180,
            _bgr(a.hair, light * 0.8),
            -1,
        )
    openness = rng.uniform(0.55, 1.0)
    gaze = rng.uniform(-0.3, 0.3)
    for side in (-1, 1):
        ex, ey = cx + side * a.eye_spacing, a.eye_height
        eye_axes = (_pixel(a.eye_size, big), max(1, _pixel(a.eye_size * 0.6 * openness, big)))
        cv2.ellipse(canvas, at(ex, ey), eye_axes, 0, 0, 360, (245, 245, 245), -1)
        cv2.circle(
            canvas,
            at(ex + gaze * a.eye_size * 0.5, ey),
            max(1, _pixel(a.eye_size * 0.45, big)),
            _bgr(a.iris, light),
            -1,
        )
        brow_y = ey - a.eye_size * 1.6
        tilt = side * a.brow_tilt * a.eye_size
        cv2.line(
            canvas,
            at(ex - a.eye_size * 1.2, brow_y + tilt),
            at(ex + a.eye_size * 1.2, brow_y - tilt),
            _bgr(a.hair, light * 0.7),
            max(1, _pixel(0.008 * a.brow_weight, big)),
        )
        if a.glasses:
            cv2.circle(canvas, at(ex, ey), _pixel(a.eye_size * 1.9, big), (20, 20, 20), max(1, _pixel(0.008, big)))
    nose_top, nose_tip = a.eye_height + 0.04, a.eye_height + 0.04 + a.nose_length
    nose = np.array([at(cx, nose_top), at(cx - a.nose_width, nose_tip), at(cx + a.nose_width, nose_tip)], np.int32)
    cv2.fillPoly(canvas, [nose], _bgr(a.skin, light * 0.8))
    smile = a.smile + rng.uniform(-0.5, 0.5)
    mouth_axes = (_pixel(a.mouth_width / 2, big), max(1, _pixel(abs(smile) * 0.03 + 0.006, big)))
    start, end = (0, 180) if smile >= 0 else (180, 360)
    cv2.ellipse(
        canvas, at(cx, a.mouth_height), mouth_axes, 0, start, end, _bgr(a.lips, light), max(2, _pixel(0.018, big))
    )

    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.9, 1.1)
    matrix = cv2.getRotationMatrix2D((big / 2, big / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * big
    border = tuple(int(v) for v in background)
    canvas = cv2.warpAffine(canvas, matrix, (big, big), flags=cv2.INTER_LINEAR, borderValue=border)
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.2))
    noise = rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 6.0))
    image = (image + noise).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, ::-1])


def render_identity_image(seed: int, identity: int, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Image `index` of `identity`: deterministic in (seed, identity, index)."""
    rng = np.random.default_rng([seed, identity, index, 0xFACE])
    return render_face(identity_attributes(seed, identity), rng, size)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    return encoded.tobytes()


def _identity_images(job: tuple[int, int, int, int, int]) -> list[bytes]:
    """Encoded images `first`..`first + count - 1` of one identity (a worker's unit of work)."""
    seed, identity, first, count, quality = job
    return [encode_jpeg(render_identity_image(seed, identity, index), quality) for index in range(first, first + count)]


@dataclass(frozen=True)
class SyntheticSet:
    """What `write_synthetic_set` wrote."""

    train_images: int
    train_identities: int
    holdout_identities: int
    pairs: int
    bytes_written: int
    seconds: float


def _pair_plan(holdout_start: int, holdout: int, images_per_identity: int, pairs: int, seed: int):
    """(identity, image) pairs from held-out identities, same and different alternating (every fold balanced)."""
    rng = np.random.default_rng([seed, 0xBEEF])
    plan = []
    for n in range(pairs):
        if n % 2 == 0:
            identity = holdout_start + int(rng.integers(holdout))
            first, second = rng.choice(images_per_identity, size=2, replace=False)
            plan.append(((identity, int(first)), (identity, int(second)), True))
        else:
            one, other = rng.choice(holdout, size=2, replace=False)
            plan.append(
                (
                    (holdout_start + int(one), int(rng.integers(images_per_identity))),
                    (holdout_start + int(other), int(rng.integers(images_per_identity))),
                    False,
                )
            )
    return plan


def write_synthetic_set(
    out_dir: str,
    identities: int,
    images_per_identity: int,
    holdout_identities: int,
    pairs: int,
    seed: int = 0,
    workers: int = 1,
    quality: int = 95,
    progress: bool = True,
) -> SyntheticSet:
    """Write `train.rec`/`.idx`/`.lst`/`property` and `synthetic.bin` (pairs of held-out identities) into `out_dir`.

    Training identities are 0..identities-1; the verification pairs use identities never trained on.
    """
    from multiprocessing import get_context
    from pathlib import Path

    from partial_fc.data.binfile import write_bin
    from partial_fc.data.faceset import FaceSetWriter
    from partial_fc.data.lst import LstEntry, write_lst
    from partial_fc.errors import InputError
    from partial_fc.progress import Progress

    if identities < 1 or images_per_identity < 1:
        raise InputError(
            f"make-synthetic needs at least 1 identity and 1 image each, got {identities} and {images_per_identity}"
        )
    if pairs > 0 and (holdout_identities < 2 or images_per_identity < 2):
        raise InputError("verification pairs need at least 2 held-out identities and 2 images per identity")
    out = Path(out_dir)
    bar = Progress(identities * images_per_identity, "make-synthetic", interval=2.0 if progress else float("inf"))
    jobs = [(seed, identity, 0, images_per_identity, quality) for identity in range(identities)]
    entries = []
    written = 0
    with get_context("fork").Pool(max(1, workers)) as pool, FaceSetWriter(out) as writer:
        for identity, images in enumerate(pool.imap(_identity_images, jobs, chunksize=4)):
            for index, image in enumerate(images):
                key = writer.write(identity, image)
                entries.append(LstEntry(key, identity, f"id_{identity}/{identity}_{index}.jpg"))
                written += len(image)
            bar.update(len(images))
        plan = _pair_plan(identities, holdout_identities, images_per_identity, pairs, seed)
        pair_jobs = [
            (seed, identity, index, 1, quality) for first, second, _ in plan for identity, index in (first, second)
        ]
        pair_images = [images[0] for images in pool.map(_identity_images, pair_jobs, chunksize=16)]
    write_lst(out / "train.lst", entries)
    if pairs:
        write_bin(out / "synthetic.bin", pair_images, [same for _, _, same in plan])
    if progress:
        bar.close()
    return SyntheticSet(
        identities * images_per_identity,
        identities,
        holdout_identities,
        pairs,
        written + sum(map(len, pair_images)),
        bar.seconds,
    )
