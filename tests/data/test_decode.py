"""Image decoding (colour order, backends, errors, in place into batch slots), flips and normalisation."""

import sys

import cv2
import numpy as np
import pytest
import torch

from partial_fc.data import decode
from partial_fc.data.binfile import decode_images
from partial_fc.data.decode import (
    DECODER,
    DecodeError,
    decode_into,
    decode_rgb,
    flip_images,
    normalize_images,
    normalize_lut,
)
from partial_fc.data.synthetic import render_identity_image
from partial_fc.errors import InputError


def _encode(rgb: np.ndarray, ext: str = ".jpg") -> bytes:
    """Encode an RGB image the way files are written by OpenCV (BGR in, so convert)."""
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _pure_red_bgr_jpeg() -> bytes:
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[..., 2] = 255  # red, in OpenCV's BGR order
    ok, buf = cv2.imencode(".jpg", bgr)
    assert ok
    return buf.tobytes()


def test_backend_is_known():
    assert DECODER in ("simplejpeg", "turbojpeg", "cv2")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_colour_order_is_rgb(ext):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255
    image = decode_rgb(_encode(rgb, ext))
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    assert image[..., 0].min() > 240 and image[..., 1:].max() < 15


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    """One RGB uint8 image as network input [3, H, W]."""
    return normalize_images(torch.from_numpy(rgb).unsqueeze(0))[0]


def test_red_jpeg_gives_high_channel_0():
    tensor = _normalised(decode_rgb(_pure_red_bgr_jpeg()))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 16, 16)
    assert tensor[0].min() > 0.9 and tensor[1:].max() < -0.9


def test_fast_backend_and_cv2_agree_and_fallback(monkeypatch):
    data = _encode(render_identity_image(0, 1, 0, size=48))
    fast = decode_rgb(data)
    monkeypatch.setattr(decode, "_decode_jpeg", None)
    assert np.array_equal(decode_rgb(data), fast)  # libjpeg-turbo and OpenCV's decoder give the same pixels

    def refuses(*_):
        raise ValueError("unsupported JPEG")

    monkeypatch.setattr(decode, "_decode_jpeg", refuses)
    assert np.array_equal(decode_rgb(data), fast)  # a JPEG the binding refuses goes to OpenCV
    monkeypatch.setattr(decode, "_decode_jpeg_into", refuses)
    assert np.array_equal(decode_into(data, np.zeros_like(fast)), fast)


def test_falls_back_to_cv2_without_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "turbojpeg", None)
    assert decode._fast_jpeg_decoder() == ("cv2", None, None)


def test_grey_image_gives_three_equal_channels():
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    image = decode_rgb(buf.tobytes())
    assert image.shape == (16, 16, 3)
    assert np.array_equal(image[..., 0], grey) and np.array_equal(image[..., 2], grey)


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\xff\xd8\xff\xe0 truncated jpeg junk"])
def test_non_image_names_its_source(payload):
    with pytest.raises(DecodeError, match=r"^faces\.rec, key 7: cannot decode image") as info:
        decode_rgb(payload, "faces.rec, key 7")
    assert isinstance(info.value, InputError)
    assert info.value.source == "faces.rec, key 7"
    assert str(type(info.value)(str(info.value))) == str(info.value)  # rebuilt from its message (DataLoader does)


def test_normalisation_is_exact_and_matches_eval_path():
    x = np.arange(256, dtype=np.float32)
    assert np.array_equal(normalize_lut(), (x / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
    ramp = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    ramp = ramp.astype(np.uint8)
    png = _encode(ramp, ".png")  # lossless: the decoded pixels are the ramp
    tensor = _normalised(decode_rgb(png))
    expected = (torch.from_numpy(ramp).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(tensor, expected)
    assert torch.equal(tensor.unsqueeze(0), decode_images([png], (16, 16)))  # bit-identical to .bin loading
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


def test_normalize_images_layout_and_refusals():
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8))
    out = normalize_images(batch)
    assert out.shape == (3, 3, 5, 7) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.from_numpy(normalize_lut()[batch.numpy()]).permute(0, 3, 1, 2))
    assert normalize_images(batch[:0]).shape == (0, 3, 5, 7)
    for bad in (batch.float(), batch[0], batch[..., :2]):
        with pytest.raises(InputError, match="uint8 batch"):
            normalize_images(bad)


def test_decode_into_a_slot_resizes_only_when_size_differs():
    rgb = render_identity_image(0, 2, 0, size=48)
    data = _encode(rgb)
    batch = np.zeros((2, 48, 48, 3), np.uint8)
    slot = batch[1]
    assert decode_into(data, slot) is slot
    assert np.array_equal(batch[1], decode_rgb(data)) and not batch[0].any()
    small = np.zeros((32, 40, 3), np.uint8)
    decode_into(data, small)
    expected = cv2.resize(decode_rgb(data), (40, 32), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(small, expected)
    with pytest.raises(InputError, match="out must be"):
        decode_into(data, np.zeros((48, 48, 3), np.float32))
    with pytest.raises(DecodeError, match="^faces, key 3: cannot decode"):
        decode_into(b"junk", batch[0], "faces, key 3")


def test_flip_images_mirrors_the_chosen_slots_in_place():
    batch = np.stack([render_identity_image(0, i, 0, size=20) for i in range(4)])
    before = batch.copy()
    flip_images(batch, np.array([True, False, True, False]))
    assert np.array_equal(batch[0], before[0][:, ::-1]) and np.array_equal(batch[2], before[2][:, ::-1])
    assert np.array_equal(batch[1], before[1]) and np.array_equal(batch[3], before[3])
