"""Image decoding (libjpeg-turbo bindings when installed, OpenCV otherwise) and the training transform.

Decoding always gives RGB ``uint8`` [H, W, 3]. JPEGs go to the fastest binding importable at start-up:
``simplejpeg``, then PyTurboJPEG (``turbojpeg``, which also needs the libturbojpeg shared library), else
``cv2.imdecode``; anything else (PNG, ...) and any JPEG the binding refuses goes to ``cv2.imdecode``, so every
backend accepts what OpenCV accepts. OpenCV is told to ignore EXIF orientation, as the bindings do, so the
pixels do not depend on which backend is installed.

The transform turns a decoded image into the network's input: resize (only when the size differs), random
horizontal flip drawn from a generator the caller passes (reproducible), and ``(x / 255 - 0.5) / 0.5`` as
float32 [3, H, W]. Normalising goes through a 256-entry table computed with exactly those float32 operations,
and ``binfile.decode_images`` goes through the same decoder and transform (training and evaluation see the same numbers).
"""

from __future__ import annotations

from typing import Callable, Union

import cv2
import numpy as np
import torch

from partial_fc.errors import InputError

__all__ = ["DECODER", "DecodeError", "ImageTransform", "decode_rgb", "normalize_lut"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

_CV2_FLAGS = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
_CV2_GIVES_BGR = not hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV < 4.10 can only decode to BGR
_JPEG_MAGIC = b"\xff\xd8"


class DecodeError(InputError):
    """A payload is not a decodable image; the message names its source (file and key or path)."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message if source is None else f"{source}: {message}")
        self.source = source


def _fast_jpeg_decoder() -> tuple[str, Callable[[Buffer], np.ndarray] | None]:
    """The fastest installed libjpeg-turbo binding, as ``(name, decode-to-RGB)``; ``("cv2", None)`` when none."""
    try:
        import simplejpeg

        return "simplejpeg", lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()  # raises when the libturbojpeg shared library is missing
        return "turbojpeg", lambda data: turbo.decode(data, pixel_format=TJPF_RGB)
    except (ImportError, OSError, RuntimeError):
        return "cv2", None


DECODER, _decode_jpeg = _fast_jpeg_decoder()
"""Which backend decodes JPEGs in this process: ``"simplejpeg"``, ``"turbojpeg"`` or ``"cv2"``."""


def _decode_cv2(buf: np.ndarray) -> np.ndarray | None:
    """``cv2.imdecode`` to RGB, or None when OpenCV cannot decode the buffer."""
    try:
        image = cv2.imdecode(buf, _CV2_FLAGS)
    except cv2.error:
        return None
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if _CV2_GIVES_BGR else image


def decode_rgb(data: Buffer, source: str | None = None) -> np.ndarray:
    """Decode an encoded image to RGB uint8 [H, W, 3]; ``DecodeError`` naming ``source`` when it is not one."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise DecodeError(f"expected encoded image bytes, got an array of {buf.dtype} {buf.shape}", source)
    if _decode_jpeg is not None and buf[:2].tobytes() == _JPEG_MAGIC:
        try:
            image = _decode_jpeg(buf)
        except (ValueError, OSError):
            image = None  # let OpenCV try: it is more lenient (e.g. truncated files, CMYK)
        if image is not None and image.ndim == 3 and image.shape[2] == 3:
            return image
    image = _decode_cv2(buf) if buf.size else None
    if image is None:
        head = buf[:8].tobytes()
        raise DecodeError(f"cannot decode image ({buf.size} bytes, starting {head!r}): not a JPEG/PNG", source)
    return image


def normalize_lut() -> np.ndarray:
    """``(x / 255 - 0.5) / 0.5`` in float32 for every uint8 ``x``: the normalisation as a lookup table."""
    x = np.arange(256, dtype=np.float32)
    return (x / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


_LUT = normalize_lut()


class ImageTransform:
    """RGB uint8 [H, W, 3] -> normalised float32 [3, H, W]: resize if needed, then a random horizontal flip."""

    def __init__(self, size: tuple[int, int] | None = None, flip: bool = False,
                 interpolation: int = cv2.INTER_LINEAR):
        """``size`` is (height, width) or None to keep each image's size; ``flip`` draws one flip per image."""
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if size[0] <= 0 or size[1] <= 0:
                raise InputError(f"image size must be positive, got {size}")
        self.size = size
        self.flip = flip
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, flip={self.flip})"

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator | None = None,
                 out: np.ndarray | None = None) -> torch.Tensor:
        """Transform one image; ``rng`` (required when ``flip``) decides the flip with probability 1/2.

        ``out``, a C-contiguous float32 [3, H, W] array (a slot of a batch), receives the result instead of a
        new array, so a batch is written in place and never stacked.
        """
        if self.size is not None and rgb.shape[:2] != self.size:
            rgb = cv2.resize(rgb, (self.size[1], self.size[0]), interpolation=self.interpolation)
        if self.flip:
            if rng is None:
                raise InputError("ImageTransform(flip=True) needs a numpy Generator to draw the flip from")
            if rng.random() < 0.5:
                rgb = cv2.flip(rgb, 1)
        if out is None:
            out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        elif out.shape != (3, *rgb.shape[:2]) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise InputError(f"out must be a contiguous float32 array of shape {(3, *rgb.shape[:2])}, got "
                             f"{out.dtype} {out.shape}")
        for channel, plane in enumerate(cv2.split(rgb)):  # de-interleave and normalise, one pass per channel
            cv2.LUT(plane, _LUT, dst=out[channel])
        return torch.from_numpy(out)
