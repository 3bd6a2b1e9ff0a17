"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...): safe reading, writing, decoding.

Format (as insightface writes it): ``pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)`` where

- ``bins`` is a list of ``2 * N`` encoded images (JPEG/PNG bytes), the two images of pair ``i`` at ``2i`` and
  ``2i + 1``;
- ``issame_list`` is a list of ``N`` bools, ``True`` when the pair shows the same identity.

Files made under Python 2 hold ``str`` images: they are unpickled with ``encoding='bytes'`` so those come back as
``bytes``. Some files hold the encoded bytes as 1-D ``uint8`` numpy arrays instead of ``bytes``.

A pickle can run arbitrary code when loaded, so :func:`read_bin` uses a restricted unpickler: the only globals it
hands out are the few the format needs (see ``_ALLOWED``); any other global request (``os.system``,
``builtins.eval``, ...) is refused with a :class:`BinFileError` naming the file and the global, before anything
is called. The loaded object is then checked for the structure above.
"""

from __future__ import annotations

import _compat_pickle
import numbers
import os
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from partial_fc.data.decode import DecodeError, decode_into, decode_rgb, normalize_images
from partial_fc.errors import InputError
from partial_fc.fileio import PathLike, atomic_path

__all__ = [
    "BinFileError",
    "VerificationBin",
    "decode_image",
    "decode_images",
    "load_bin",
    "read_bin",
    "validate_bin",
    "write_bin",
]

ImageBuffer = bytes | bytearray | np.ndarray


class BinFileError(InputError):
    """A ``.bin`` verification file is unsafe, malformed or holds an undecodable image.

    The message names the file and, where one entry is at fault, its index (``image <i>`` or ``issame <i>``).
    """

    def __init__(self, message: str, *, path: PathLike | None = None, index: int | None = None, what: str = "image"):
        where = []
        if path is not None:
            where.append(os.fspath(path))
        if index is not None:
            where.append(f"{what} {index}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.path = None if path is None else os.fspath(path)
        self.index = index

    def __reduce__(self):
        """Pickle as the finished message (so errors cross process boundaries intact)."""
        return (_rebuild_error, (self.args[0], self.path, self.index))


def _rebuild_error(message: str, path: str | None, index: int | None) -> BinFileError:
    err = BinFileError.__new__(BinFileError)
    Exception.__init__(err, message)
    err.path, err.index = path, index
    return err


class VerificationBin(NamedTuple):
    """A loaded verification set: ``2 * N`` encoded images and ``N`` same-identity flags."""

    images: list[ImageBuffer]
    issame: list[bool]

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (numpy 1)."""
    import importlib

    for package in ("numpy._core", "numpy.core"):
        try:
            module = importlib.import_module(f"{package}.{submodule}")
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"numpy has no {submodule}.{name}")  # pragma: no cover - every supported numpy has them


def _safe_codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of ``bytes`` (protocol < 3) use it: only str -> latin-1 bytes."""
    if isinstance(encoding, (bytes, bytearray)):
        encoding = bytes(encoding).decode("ascii", "replace")
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode is only allowed as encode(str, 'latin1'), got encode({type(obj).__name__}, {encoding!r})"
        )
    return obj.encode("latin-1")


def _safe_bytearray(*args: Any) -> bytearray:
    """``bytearray`` as pickles build it: ``bytearray()``, ``bytearray(bytes)`` or ``bytearray(str, 'latin-1')``."""
    if len(args) == 2 and isinstance(args[1], (bytes, bytearray)):  # Python 2 pickle read with encoding='bytes'
        args = (args[0], bytes(args[1]).decode("ascii", "replace"))
    if len(args) == 2 and str(args[1]).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"bytearray(str, {args[1]!r}) is not allowed (only latin-1)")
    if len(args) > 2 or (len(args) == 1 and not isinstance(args[0], (bytes, bytearray))):
        raise pickle.UnpicklingError("bytearray is only allowed from bytes or from (str, 'latin-1')")
    return bytearray(*args)


def _safe_bytes(*args: Any) -> bytes:
    """``bytes`` as protocol < 3 pickles build an empty one: ``bytes()`` (or from bytes)."""
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise pickle.UnpicklingError("bytes is only allowed as bytes() or bytes(bytes)")
    return bytes(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    scalar = _numpy_attr("multiarray", "scalar")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        # ndarray pickles: protocol < 5 use _reconstruct + __setstate__, protocol 5 uses _frombuffer;
        # numpy scalars (e.g. a numpy.bool_ issame flag) use scalar(dtype, bytes).
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
        allowed[(f"{package}.multiarray", "scalar")] = scalar
    for module in ("builtins", "__builtin__"):  # protocol 2 writes __builtin__, Python 2 always did
        allowed[(module, "bytearray")] = _safe_bytearray
        allowed[(module, "bytes")] = _safe_bytes
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` and refuses every other one."""

    def __init__(self, file: Any, path: PathLike):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if isinstance(module, bytes):  # pragma: no cover - defensive: names always arrive as str
            module = module.decode("latin-1")
        if isinstance(name, bytes):  # pragma: no cover
            name = name.decode("latin-1")
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        wanted = f"{module}.{name}"
        py3 = _python3_name(module, name)
        if py3 != wanted:
            wanted += f" ({py3} in Python 3)"
        raise BinFileError(
            f"refusing to load: the pickle asks for the global {wanted}, which a verification "
            f".bin file never needs (only encoded images and bools are allowed); nothing was run",
            path=self._path,
        )


def _python3_name(module: str, name: str) -> str:
    """The Python 3 name of a global a protocol < 3 pickle spells the Python 2 way (``__builtin__.eval``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _restricted_load(path: PathLike) -> Any:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BinFileError(f"cannot open: {exc}", path=path) from exc
    with f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except BinFileError:
            raise
        except EOFError as exc:
            raise BinFileError("not a complete pickle (the file is empty or truncated)", path=path) from exc
        except pickle.UnpicklingError as exc:
            raise BinFileError(f"not a valid pickle (truncated or not a .bin file): {exc}", path=path) from exc
        except MemoryError as exc:
            raise BinFileError("not a valid pickle: it declares an object too large to allocate", path=path) from exc
        except (
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OverflowError,
            UnicodeError,
            RecursionError,
        ) as exc:
            raise BinFileError(f"not a valid pickle ({type(exc).__name__}: {exc})", path=path) from exc


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _as_issame(value: Any, path: PathLike | None, index: int) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    raise BinFileError(
        f"issame flag must be a bool (or 0/1), got {type(value).__name__} {value!r:.60}",
        path=path,
        index=index,
        what="issame",
    )


def _check_image(value: Any, path: PathLike | None, index: int) -> None:
    if isinstance(value, (bytes, bytearray)):
        return
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return
    if isinstance(value, np.ndarray):
        raise BinFileError(
            f"image must be encoded bytes or a uint8 array, got an array of dtype {value.dtype}", path=path, index=index
        )
    raise BinFileError(
        f"image must be encoded bytes (bytes/bytearray) or a uint8 numpy array, got {type(value).__name__}",
        path=path,
        index=index,
    )


def validate_bin(obj: Any, path: PathLike | None = None) -> VerificationBin:
    """Check that ``obj`` has the ``(bins, issame_list)`` structure and return it as a :class:`VerificationBin`.

    ``bins`` must be a list/tuple of ``2 * len(issame_list)`` images, each ``bytes``/``bytearray`` or a ``uint8``
    numpy array (the encoded bytes); ``issame_list`` a list/tuple (or 1-D array) of bools or 0/1 integers, and
    non-empty. Flags come back as Python bools, images as they are. Errors name ``path`` and the offending index.
    """
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        what = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise BinFileError(f"expected a 2-tuple (bins, issame_list), got {what}", path=path)
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinFileError(f"bins must be a list of encoded images, got {type(bins).__name__}", path=path)
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1:
            raise BinFileError(f"issame_list must be 1-D, got an array of shape {issame.shape}", path=path)
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)):
        raise BinFileError(f"issame_list must be a list of bools, got {type(issame).__name__}", path=path)
    flags = [_as_issame(v, path, i) for i, v in enumerate(issame)]
    if not flags:
        raise BinFileError("the file holds no pairs (issame_list is empty)", path=path)
    if len(bins) != 2 * len(flags):
        raise BinFileError(
            f"bins holds {len(bins)} images but issame_list has {len(flags)} pairs "
            f"(expected {2 * len(flags)} images, two per pair)",
            path=path,
        )
    for i, image in enumerate(bins):
        _check_image(image, path, i)
    return VerificationBin(list(bins), flags)


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing


def read_bin(path: PathLike) -> VerificationBin:
    """Load a ``.bin`` verification file safely (restricted unpickler, ``encoding='bytes'``) and validate it.

    Raises :class:`BinFileError` naming ``path`` when the file cannot be opened, is truncated or not a pickle,
    asks for a global outside the allow-list, or does not have the expected structure.
    """
    return validate_bin(_restricted_load(path), path)


def _to_bytes(image: Any) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image).reshape(-1).tobytes()
    return bytes(image)


def write_bin(path: PathLike, images: Sequence[ImageBuffer], issame: Sequence[bool]) -> None:
    """Write ``(images, issame)`` as insightface does: ``pickle.dump((bins, issame_list), f, HIGHEST_PROTOCOL)``.

    ``images`` are encoded images (``bytes``; ``bytearray`` and ``uint8`` arrays are written as ``bytes``), two
    per pair; ``issame`` one bool (or 0/1) per pair, written as Python bools. The input is validated like a file
    being read. The write is atomic and durable (``fileio.atomic_path``): readers never see a partial file.
    """
    checked = validate_bin((list(images), list(issame)), path)
    payload = ([_to_bytes(image) for image in checked.images], list(checked.issame))
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise InputError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise InputError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _encoded_bytes(image: ImageBuffer, *, path: PathLike | None, index: int | None) -> np.ndarray:
    """One stored image (bytes, or a uint8 array of the encoded bytes) as a flat uint8 array; else BinFileError."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise BinFileError(f"image array must be uint8, got {image.dtype}", path=path, index=index)
        return np.ascontiguousarray(image).reshape(-1)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return np.frombuffer(image, dtype=np.uint8)
    raise BinFileError(f"image must be encoded bytes, got {type(image).__name__}", path=path, index=index)


def decode_image(image: ImageBuffer, *, path: PathLike | None = None, index: int | None = None) -> np.ndarray:
    """Decode one encoded image (bytes or uint8 array of the encoded bytes) to an RGB ``uint8`` array [H, W, 3].

    Decoded exactly as training images are (``decode.decode_rgb``); grey images come back with three equal
    channels. Raises :class:`BinFileError` naming ``path`` and ``index`` when the buffer is not a decodable image.
    """
    try:
        return decode_rgb(_encoded_bytes(image, path=path, index=index))
    except DecodeError as error:
        raise BinFileError(str(error), path=path, index=index) from None


def decode_images(
    images: Sequence[ImageBuffer],
    image_size: int | Sequence[int] = (112, 112),
    *,
    path: PathLike | None = None,
    interpolation: int = cv2.INTER_LINEAR,
) -> torch.Tensor:
    """Decode encoded images into a float32 tensor [len(images), 3, H, W], RGB, normalized to ``(x/255 - 0.5)/0.5``.

    ``image_size`` is ``(height, width)`` (or one int for both). An image already of that size is used as it is;
    any other is resized to it with ``cv2.resize(..., interpolation)``. Errors name ``path`` and the image index.
    """
    h, w = _size_hw(image_size)
    pixels = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        try:
            decode_into(_encoded_bytes(image, path=path, index=i), pixels[i], interpolation=interpolation)
        except DecodeError as error:
            raise BinFileError(str(error), path=path, index=i) from None
    return normalize_images(torch.from_numpy(pixels)).contiguous()


def load_bin(
    path: PathLike, image_size: int | Sequence[int] = (112, 112), *, interpolation: int = cv2.INTER_LINEAR
) -> tuple[torch.Tensor, list[bool]]:
    """Read, validate and decode a ``.bin`` file: returns ``(images [2N, 3, H, W] float32, issame [N])``.

    Images are RGB, normalized to ``(x/255 - 0.5)/0.5``, resized to ``image_size`` (height, width) only when they
    are not that size already. Pair ``i`` is images ``2i`` and ``2i + 1``.
    """
    data = read_bin(path)
    return decode_images(data.images, image_size, path=path, interpolation=interpolation), list(data.issame)
