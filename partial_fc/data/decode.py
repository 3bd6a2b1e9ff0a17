"""Image decoding (libjpeg-turbo bindings when installed, OpenCV otherwise), flips, and normalisation.

Decoding always gives RGB ``uint8`` [H, W, 3]. JPEGs go to the fastest binding importable at start-up:
``simplejpeg``, then PyTurboJPEG (``turbojpeg``, which also needs the libturbojpeg shared library), else
``cv2.imdecode``; anything else (PNG, ...) and any JPEG the binding refuses goes to ``cv2.imdecode``, so every
backend accepts what OpenCV accepts. OpenCV is told to ignore EXIF orientation, as the bindings do, so the
pixels do not depend on which backend is installed.

Loading stays in ``uint8``: ``decode_into`` decodes (and resizes, only when the size differs) straight into a
slot of a batch [B, H, W, 3], and ``flip_images`` mirrors the chosen slots in place. ``normalize_images`` then
turns a whole batch into the network's input, ``(x / 255 - 0.5) / 0.5`` as float32 [B, 3, H, W], on the
device the batch was moved to (a quarter of the bytes to copy, and no per-image float work in the loader's
workers). It goes through a 256-entry table computed with exactly those float32 operations, and the
verification loaders use the same two functions, so training and evaluation see the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import cv2
import numpy as np
import torch

from partial_fc.errors import InputError

__all__ = ["DECODER", "DecodeError", "decode_into", "decode_rgb", "flip_images", "normalize_images", "normalize_lut"]

Buffer = bytes | bytearray | memoryview | np.ndarray

_CV2_FLAGS = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
_CV2_GIVES_BGR = not hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV < 4.10 can only decode to BGR
_JPEG_MAGIC = b"\xff\xd8"


class DecodeError(InputError):
    """A payload is not a decodable image; the message names its source (file and key or path)."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message if source is None else f"{source}: {message}")
        self.source, self.reason = source, message


class JpegBackend(NamedTuple):
    """A JPEG decoder: its name, decode-to-RGB, and decode-into-a-slot (None when it cannot write in place)."""

    name: str
    decode: Callable[[np.ndarray], np.ndarray] | None
    decode_into: Callable[[np.ndarray, np.ndarray], bool] | None


def _simplejpeg_into(simplejpeg: ModuleType) -> Callable[[np.ndarray, np.ndarray], bool]:
    """simplejpeg's in-place decode: False (nothing written) when the JPEG's size is not the slot's."""

    def decode_into(data: np.ndarray, out: np.ndarray) -> bool:
        if tuple(simplejpeg.decode_jpeg_header(data)[:2]) != out.shape[:2]:
            return False
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        return True

    return decode_into


def _fast_jpeg_decoder() -> JpegBackend:
    """The fastest installed libjpeg-turbo binding; ``JpegBackend("cv2", None, None)`` when none is."""
    try:
        import simplejpeg

        return JpegBackend(
            "simplejpeg", lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB"), _simplejpeg_into(simplejpeg)
        )
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()  # raises when the libturbojpeg shared library is missing
        return JpegBackend("turbojpeg", lambda data: turbo.decode(data, pixel_format=TJPF_RGB), None)
    except (ImportError, OSError, RuntimeError):
        return JpegBackend("cv2", None, None)


DECODER, _decode_jpeg, _decode_jpeg_into = _fast_jpeg_decoder()
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


def _encoded(data: Buffer, source: str | None) -> np.ndarray:
    """Encoded image bytes as a flat uint8 array (no copy); ``DecodeError`` for any other array."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise DecodeError(f"expected encoded image bytes, got an array of {buf.dtype} {buf.shape}", source)
    return buf


def decode_rgb(data: Buffer, source: str | None = None) -> np.ndarray:
    """Decode an encoded image to RGB uint8 [H, W, 3]; ``DecodeError`` naming ``source`` when it is not one."""
    buf = _encoded(data, source)
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


def decode_into(
    data: Buffer, out: np.ndarray, source: str | None = None, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Decode an encoded image into ``out`` (C-contiguous RGB uint8 [H, W, 3], e.g. a batch slot) and return it.

    A JPEG already of ``out``'s size is decoded in place, with no intermediate array; any other image is
    decoded and then resized into ``out``.
    """
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3 or not out.flags.c_contiguous:
        raise InputError(f"out must be a contiguous uint8 [H, W, 3] array, got {out.dtype} {out.shape}")
    buf = _encoded(data, source)
    if _decode_jpeg_into is not None and buf[:2].tobytes() == _JPEG_MAGIC:
        try:
            if _decode_jpeg_into(buf, out):
                return out
        except (ValueError, OSError):
            pass  # decode_rgb below retries with OpenCV, or names the source
    rgb = decode_rgb(buf, source)
    if rgb.shape[:2] == out.shape[:2]:
        out[...] = rgb
    else:
        cv2.resize(rgb, (out.shape[1], out.shape[0]), dst=out, interpolation=interpolation)
    return out


def flip_images(images: np.ndarray, flags: np.ndarray) -> None:
    """Mirror horizontally, in place, the images of a uint8 batch [B, H, W, C] whose ``flags`` are true."""
    for index in np.flatnonzero(flags):
        cv2.flip(images[index], 1, dst=images[index])  # in place: no fancy-indexed copy of the batch


def normalize_lut() -> np.ndarray:
    """``(x / 255 - 0.5) / 0.5`` in float32 for every uint8 ``x``: the normalisation as a lookup table."""
    x = np.arange(256, dtype=np.float32)
    return (x / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


_LUT = normalize_lut()
_DEVICE_LUTS: dict[torch.device, torch.Tensor] = {}


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch [B, H, W, 3] (on any device) as normalised float32 [B, 3, H, W] on the same device.

    The result is a channels-last view (the layout convolutions prefer on GPUs); ``.contiguous()`` gives NCHW.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
        raise InputError(f"expected a uint8 batch [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if images.device.type == "cpu":
        pixels = images.contiguous().numpy()
        out = np.empty(pixels.shape, dtype=np.float32)
        rows = pixels.shape[0] * pixels.shape[1]
        if out.size:
            cv2.LUT(pixels.reshape(rows, -1), _LUT, dst=out.reshape(rows, -1))
        normalised = torch.from_numpy(out)
    else:
        lut = _DEVICE_LUTS.get(images.device)
        if lut is None:
            lut = _DEVICE_LUTS[images.device] = torch.from_numpy(_LUT).to(images.device)
        normalised = lut[images.long()]
    return normalised.permute(0, 3, 1, 2)
