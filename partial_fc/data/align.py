"""Five-point face alignment: the similarity that takes detected landmarks onto the ArcFace template, and the crop.

The transform and the warp are insightface's ``face_align.estimate_norm``/``norm_crop`` (Umeyama's least-squares
similarity without reflection, ``cv2.warpAffine`` with a black border), so crops made here match the ones
insightface's models and IJB evaluation were made with. Training-data tools and evaluation both use this module.
"""

from __future__ import annotations

import cv2
import numpy as np

from partial_fc.errors import InputError

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)  # left eye, right eye, nose tip, left and right mouth corners in a 112 x 112 crop (float32, as insightface)
ARCFACE_DST.setflags(write=False)


def destination_points(size: int = 112) -> np.ndarray:
    """The ArcFace template for a `size` x `size` crop, as insightface scales it (multiples of 112 or 128)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or (size % 112 and size % 128):
        raise InputError(f"alignment size {size!r} is not a positive multiple of 112 or 128")
    if size % 112 == 0:
        return ARCFACE_DST * np.float32(size / 112.0)
    ratio = size / 128.0
    points = ARCFACE_DST * np.float32(ratio)
    points[:, 0] += np.float32(8.0 * ratio)
    return points


def landmark_array(landmarks: object) -> np.ndarray:
    """`landmarks` as a float64 [5, 2] array of finite (x, y) points, or an InputError saying what is wrong."""
    try:
        points = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"landmarks must be 5 (x, y) numbers, got {landmarks!r}") from None
    if points.shape != (5, 2):
        raise InputError(f"landmarks must be 5 (x, y) points (shape (5, 2)), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise InputError(f"landmarks must be finite numbers, got {points.tolist()}")
    return points


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 float64 similarity (rotation, uniform scale, shift; no reflection) that best maps `src` onto `dst`
    in least squares (Umeyama 1991)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise InputError(f"similarity_transform needs two [N, 2] point sets, got shapes {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_variance = (src_centered**2).sum(axis=1).mean()
    if src_variance <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise InputError(f"landmarks are degenerate (all at one point): {src.tolist()}")
    covariance = dst_centered.T @ src_centered / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal fit is a reflection: take the best rotation
        signs[1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(singular @ signs) / src_variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def alignment_matrix(landmarks: object, size: int = 112) -> np.ndarray:
    """The 2x3 matrix taking image coordinates to the `size` x `size` ArcFace crop (insightface's estimate_norm)."""
    return similarity_transform(landmark_array(landmarks), destination_points(size))


def norm_crop(image: np.ndarray, landmarks: object, size: int = 112) -> np.ndarray:
    """The `size` x `size` x 3 crop of `image` (H x W x 3 uint8) with the 5 `landmarks` on the ArcFace template;
    outside the image is black (insightface's norm_crop)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InputError(f"norm_crop needs an H x W x 3 image, got {getattr(image, 'shape', type(image).__name__)}")
    matrix = alignment_matrix(landmarks, size)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)
