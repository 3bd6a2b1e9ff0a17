"""insightface ``.bin`` verification files: safe reading (restricted unpickler), validation, decoding, writing."""

import builtins
import os
import pickle
import struct
import subprocess

import cv2
import numpy as np
import pytest
import torch

from partial_fc.data import binfile
from partial_fc.data.binfile import (
    BinFileError,
    VerificationBin,
    decode_image,
    decode_images,
    load_bin,
    read_bin,
    validate_bin,
    write_bin,
)
from partial_fc.errors import InputError

COLORS_RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 200, 10), (3, 90, 170), (128, 128, 128)]


def _rgb_image(seed: int, h: int = 112, w: int = 112) -> np.ndarray:
    """A small RGB image: a flat colour plus a seeded noise pattern (so images differ)."""
    rng = np.random.default_rng(seed)
    base = np.array(COLORS_RGB[seed % len(COLORS_RGB)], dtype=np.int16)
    noise = rng.integers(-3, 4, size=(h, w, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _expected_tensor(rgb: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255.0 - 0.5) / 0.5


@pytest.fixture
def pairs():
    rgbs = [_rgb_image(i) for i in range(8)]
    return rgbs, [_encode(x) for x in rgbs], [True, False, True, False]


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def test_write_read_round_trip_bytes(tmp_path, pairs):
    rgbs, images, issame = pairs
    path = tmp_path / "set.bin"
    write_bin(path, images, issame)
    # byte-identical to what insightface writes
    assert path.read_bytes() == pickle.dumps((images, issame), protocol=pickle.HIGHEST_PROTOCOL)
    data = read_bin(path)
    assert isinstance(data, VerificationBin)
    assert data.images == images and data.issame == issame and data.num_pairs == 4
    bins, flags = data  # unpacks like insightface's (bins, issame_list)
    assert flags == issame

    tensor, flags = load_bin(path)
    assert tensor.shape == (8, 3, 112, 112) and tensor.dtype == torch.float32
    assert flags == issame
    for i, rgb in enumerate(rgbs):  # PNG is lossless and no resize happens: exact values, RGB order
        torch.testing.assert_close(tensor[i], _expected_tensor(rgb), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["set.bin"]  # no temporary file left behind


def test_written_file_is_readable_by_plain_pickle_like_insightface(tmp_path, pairs):
    _, images, issame = pairs
    path = tmp_path / "set.bin"
    write_bin(path, [bytearray(b) for b in images], [1, 0, np.bool_(True), False])
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == images and all(type(b) is bytes for b in bins)
    assert issame_list == issame and all(type(v) is bool for v in issame_list)


def test_channel_order_and_normalization(tmp_path):
    red = np.zeros((112, 112, 3), np.uint8)
    red[..., 0] = 255
    grey = np.full((112, 112, 3), 51, np.uint8)
    out = decode_images([_encode(red), _encode(grey, ".jpg")])
    assert out[0, 0].eq(1.0).all() and out[0, 1:].eq(-1.0).all()  # RGB, not BGR
    assert torch.allclose(out[1], torch.full_like(out[1], (51 / 255 - 0.5) / 0.5), atol=2 / 127.5)


def test_resize_only_when_needed():
    small = _rgb_image(1, h=50, w=60)
    exact = _rgb_image(2)
    out = decode_images([_encode(small), _encode(exact)], (112, 112))
    assert out.shape == (2, 3, 112, 112)
    torch.testing.assert_close(out[1], _expected_tensor(exact), rtol=0, atol=0)
    expected_small = cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)
    torch.testing.assert_close(out[0], _expected_tensor(expected_small), rtol=0, atol=0)
    # (height, width) order, and an int means a square
    assert decode_images([_encode(exact)], (64, 48)).shape == (1, 3, 64, 48)
    assert decode_images([_encode(exact)], 32).shape == (1, 3, 32, 32)
    with pytest.raises(InputError):
        decode_images([_encode(exact)], (0, 5))


def test_grey_image_decodes_to_three_channels():
    grey = np.full((20, 20), 77, np.uint8)
    ok, buf = cv2.imencode(".png", grey)
    rgb = decode_image(buf.tobytes())
    assert rgb.shape == (20, 20, 3) and (rgb == 77).all()


def test_uint8_ndarray_images(tmp_path, pairs):
    rgbs, images, issame = pairs
    arrays = [np.frombuffer(b, dtype=np.uint8).copy() for b in images]
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # _reconstruct (protocol 2) and _frombuffer (protocol 5)
        path = tmp_path / f"arrays{protocol}.bin"
        path.write_bytes(pickle.dumps((arrays, issame), protocol=protocol))
        data = read_bin(path)
        assert all(isinstance(a, np.ndarray) for a in data.images)
        tensor, flags = load_bin(path)
        assert flags == issame
        for i, rgb in enumerate(rgbs):
            torch.testing.assert_close(tensor[i], _expected_tensor(rgb), rtol=0, atol=0)
    # writing converts arrays to bytes (the modern format)
    write_bin(tmp_path / "w.bin", arrays, issame)
    assert read_bin(tmp_path / "w.bin").images == images


def test_protocol_2_and_numpy_bool_flags(tmp_path, pairs):
    _, images, issame = pairs
    path = tmp_path / "p2.bin"
    # protocol 2 from Python 3 writes bytes as _codecs.encode(str, 'latin1') and bytearray via __builtin__
    path.write_bytes(pickle.dumps(([bytearray(images[0])] + images[1:], [np.bool_(v) for v in issame]), protocol=2))
    data = read_bin(path)
    assert [bytes(b) for b in data.images] == images
    assert data.issame == issame and all(type(v) is bool for v in data.issame)


def _py2_string(b: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def _py2_pickle(images, issame) -> bytes:
    """``pickle.dump((bins, issame_list), f, protocol=2)`` as Python 2 wrote it: images are ``str`` objects."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"](" + b"".join(_py2_string(b) for b in images) + b"e"  # EMPTY_LIST MARK ... APPENDS
    out += b"](" + b"".join(b"\x88" if v else b"\x89" for v in issame) + b"e"  # NEWTRUE / NEWFALSE
    out += b"\x86."  # TUPLE2 STOP
    return bytes(out)


def _py2_ndarray(data: bytes) -> bytes:
    """A 1-D uint8 numpy array pickled by Python 2 numpy (protocol 2): module names numpy.core, ``str`` data."""
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        b"cnumpy\nndarray\n"
        b"K\x00\x85"
        + _py2_string(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(K\x01"
        + b"J"
        + struct.pack("<i", len(data))
        + b"\x85"  # (1, (n,),
        + b"cnumpy\ndtype\n"
        + _py2_string(b"u1")
        + b"\x89\x88\x87R"  # dtype('u1', False, True)
        + b"(K\x03"
        + _py2_string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
        + b"\x89"
        + _py2_string(data)
        + b"tb"
    )  # False, data) BUILD


def test_python2_pickle_with_str_images(tmp_path, pairs):
    rgbs, images, issame = pairs
    raw = _py2_pickle(images, issame)
    # the images are Python 2 str: the default ASCII decoding cannot even read them, encoding='bytes' can
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)
    assert pickle.loads(raw, encoding="bytes") == (images, issame)
    path = tmp_path / "py2.bin"
    path.write_bytes(raw)
    data = read_bin(path)
    assert data.images == images and data.issame == issame
    tensor, _ = load_bin(path)
    torch.testing.assert_close(tensor[5], _expected_tensor(rgbs[5]), rtol=0, atol=0)


def test_python2_pickle_with_ndarray_images(tmp_path, pairs):
    rgbs, images, issame = pairs
    body = bytearray(b"\x80\x02](")
    for b in images:
        body += _py2_ndarray(b)
    body += b"e](" + b"".join(b"\x88" if v else b"\x89" for v in issame) + b"e\x86."
    path = tmp_path / "py2arr.bin"
    path.write_bytes(bytes(body))
    data = read_bin(path)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in data.images)
    assert [a.tobytes() for a in data.images] == images
    tensor, flags = load_bin(path)
    assert flags == issame
    torch.testing.assert_close(tensor[2], _expected_tensor(rgbs[2]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Malicious pickles


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _marker_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _payloads(marker):
    code = _marker_code(marker)
    return {
        "os.system": _Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": _Payload(builtins.exec, code),
        "builtins.eval": _Payload(builtins.eval, f"exec({code!r})"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


def test_payload_is_real(tmp_path):
    """Sanity check: the payload does create the marker when an unrestricted unpickler loads it."""
    marker = tmp_path / "pwned-by-plain-pickle"
    pickle.loads(pickle.dumps(([_Payload(builtins.exec, _marker_code(marker))], []), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("where", ["top", "image", "issame"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, pairs, kind, protocol, where):
    _, images, issame = pairs
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    obj = {
        "top": payload,
        "image": (images[:3] + [payload] + images[4:], issame),
        "issame": (images, [True, payload, True, False]),
    }[where]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(BinFileError) as info:
        read_bin(path)
    msg = str(info.value)
    assert str(path) in msg and "global" in msg
    func = payload.func
    assert f"{func.__module__}.{func.__qualname__}" in msg  # e.g. posix.system, builtins.eval, subprocess.Popen
    with pytest.raises(BinFileError):
        load_bin(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("numpy", "load"),
        ("numpy", "ndarray.tofile"),
        ("builtins", "getattr"),
        ("numpy._core.multiarray", "_reconstruct.__globals__"),
        ("copyreg", "_reconstructor"),
        ("numpy", "frombuffer"),
    ],
)
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name):
    # protocol 4 STACK_GLOBAL, which with the default find_class would even follow dotted names
    raw = (
        b"\x80\x04\x8c"
        + bytes([len(module)])
        + module.encode()
        + b"\x8c"
        + bytes([len(name)])
        + name.encode()
        + b"\x93."
    )
    path = tmp_path / "g.bin"
    path.write_bytes(raw)
    with pytest.raises(BinFileError, match=f"{module}.{name}".replace(".", r"\.")) as info:
        read_bin(path)
    assert str(path) in str(info.value)


def test_codecs_encode_is_restricted(tmp_path):
    raw = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "c.bin"
    path.write_bytes(raw)
    with pytest.raises(BinFileError, match="c.bin"):
        read_bin(path)


# ----------------------------------------------------------------------------------------------------------------
# Structure, truncation, bad images


def _write_raw(tmp_path, obj, name="bad.bin"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return path


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda im, s: {"bins": im}, r"expected a 2-tuple"),
        (lambda im, s: (im, s, None), r"expected a 2-tuple"),
        (lambda im, s: (im[:-1], s), r"7 images but issame_list has 4 pairs"),
        (lambda im, s: (im, s + [True]), r"8 images but issame_list has 5 pairs"),
        (lambda im, s: (im[:3] + [42] + im[4:], s), r"image 3: image must be encoded bytes"),
        (lambda im, s: (im[:5] + ["text"] + im[6:], s), r"image 5: .*got str"),
        (lambda im, s: (im[:1] + [np.zeros(4, np.float32)] + im[2:], s), r"image 1: .*dtype float32"),
        (lambda im, s: (im, [True, "yes", True, False]), r"issame 1: issame flag must be a bool"),
        (lambda im, s: (im, [True, False, 2, False]), r"issame 2: "),
        (lambda im, s: (im, [True, False, True, 0.0]), r"issame 3: "),
        (lambda im, s: ([], []), r"no pairs"),
        (lambda im, s: ("abc", s), r"bins must be a list"),
        (lambda im, s: (im, "TFTF"), r"issame_list must be a list"),
    ],
)
def test_structural_errors_name_file_and_index(tmp_path, pairs, make, pattern):
    _, images, issame = pairs
    path = _write_raw(tmp_path, make(list(images), list(issame)))
    with pytest.raises(BinFileError, match=pattern) as info:
        read_bin(path)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)


def test_accepted_flag_forms(tmp_path, pairs):
    _, images, _ = pairs
    path = _write_raw(tmp_path, (tuple(images), (1, 0, np.bool_(False), True)))
    assert read_bin(path).issame == [True, False, False, True]
    path = _write_raw(tmp_path, [images, np.array([1, 0, 0, 1], dtype=np.uint8)], "arr.bin")
    assert read_bin(path).issame == [True, False, False, True]


def test_truncated_empty_missing_and_non_pickle_files(tmp_path, pairs):
    _, images, issame = pairs
    good = tmp_path / "good.bin"
    write_bin(good, images, issame)
    raw = good.read_bytes()
    for cut in (1, 10, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"trunc{cut}.bin"
        path.write_bytes(raw[:cut])
        with pytest.raises(BinFileError, match="truncated") as info:
            read_bin(path)
        assert str(path) in str(info.value)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(BinFileError, match="empty.bin"):
        read_bin(empty)
    text = tmp_path / "text.bin"
    text.write_text("this is not a pickle at all\n")
    with pytest.raises(BinFileError, match="text.bin: not a valid pickle"):
        read_bin(text)
    jpeg = tmp_path / "img.bin"
    jpeg.write_bytes(images[0])
    with pytest.raises(BinFileError, match="img.bin"):
        read_bin(jpeg)
    with pytest.raises(BinFileError, match="missing.bin: cannot open"):
        read_bin(tmp_path / "missing.bin")


def test_undecodable_image_names_file_and_index(tmp_path, pairs):
    _, images, issame = pairs
    broken = list(images)
    broken[6] = b"\xff\xd8\xff\xe0 not really a jpeg"
    broken[7] = b""
    path = tmp_path / "broken.bin"
    write_bin(path, broken, issame)
    read_bin(path)  # structurally fine
    with pytest.raises(BinFileError, match=r"broken\.bin, image 6: cannot decode image"):
        load_bin(path)
    with pytest.raises(BinFileError, match=r"image 0: cannot decode"):
        decode_images([b""])


# ----------------------------------------------------------------------------------------------------------------
# Writing


def test_write_validates_and_is_atomic(tmp_path, pairs, monkeypatch):
    _, images, issame = pairs
    path = tmp_path / "set.bin"
    write_bin(str(path), images, issame)
    before = path.read_bytes()
    with pytest.raises(BinFileError, match=r"set\.bin: bins holds 7 images"):
        write_bin(path, images[:-1], issame)
    with pytest.raises(BinFileError, match=r"set\.bin, image 2"):
        write_bin(path, images[:2] + [None] + images[3:], issame)

    def failing_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(binfile.pickle, "dump", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        write_bin(path, images[::-1], issame)
    monkeypatch.undo()
    assert path.read_bytes() == before  # untouched by the failed writes
    assert sorted(os.listdir(tmp_path)) == ["set.bin"]  # and the temporary file was removed

    write_bin(path, images[::-1], issame[::-1])  # overwrite
    assert read_bin(path).images == images[::-1]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_validate_bin_direct(pairs):
    _, images, issame = pairs
    assert validate_bin((images, issame)).issame == issame
    with pytest.raises(BinFileError, match=r"^issame 0"):
        validate_bin((images, [None] * 4))


def test_error_pickles_intact(tmp_path):
    err = BinFileError("boom", path=tmp_path / "x.bin", index=3)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.index == 3 and again.path == str(tmp_path / "x.bin")
