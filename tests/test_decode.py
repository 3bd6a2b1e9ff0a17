"""Image decoding (colour order, backends, errors) and the training transform (resize, flip, normalisation)."""

import sys

import cv2
import numpy as np
import pytest
import torch

from partial_fc.data import decode
from partial_fc.data.binfile import decode_images
from partial_fc.data.decode import DECODER, DecodeError, ImageTransform, decode_rgb, normalize_lut
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


def test_red_jpeg_gives_high_channel_0():
    tensor = ImageTransform()(decode_rgb(_pure_red_bgr_jpeg()))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 16, 16)
    assert tensor[0].min() > 0.9 and tensor[1:].max() < -0.9


def test_fast_backend_and_cv2_agree_and_fallback(monkeypatch):
    data = _encode(render_identity_image(0, 1, 0, size=48))
    fast = decode_rgb(data)
    monkeypatch.setattr(decode, "_decode_jpeg", None)
    assert np.array_equal(decode_rgb(data), fast)  # libjpeg-turbo and OpenCV's decoder give the same pixels

    def refuses(_):
        raise ValueError("unsupported JPEG")

    monkeypatch.setattr(decode, "_decode_jpeg", refuses)
    assert np.array_equal(decode_rgb(data), fast)  # a JPEG the binding refuses goes to OpenCV


def test_falls_back_to_cv2_without_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "turbojpeg", None)
    assert decode._fast_jpeg_decoder() == ("cv2", None)


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
    tensor = ImageTransform()(decode_rgb(png))
    expected = (torch.from_numpy(ramp).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(tensor, expected)
    assert torch.equal(tensor.unsqueeze(0), decode_images([png], (16, 16)))  # bit-identical to .bin loading
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


def test_resize_only_when_size_differs():
    rgb = render_identity_image(0, 2, 0, size=48)
    same = ImageTransform((48, 48))(rgb)
    assert torch.equal(same, ImageTransform()(rgb))
    assert ImageTransform((32, 40))(rgb[:, :40]).shape == (3, 32, 40)
    with pytest.raises(InputError):
        ImageTransform((0, 112))


def test_writes_into_a_batch_slot():
    rgb = render_identity_image(0, 4, 0, size=20)
    batch = np.zeros((2, 3, 20, 20), np.float32)
    result = ImageTransform()(rgb, out=batch[1])
    assert torch.equal(result, ImageTransform()(rgb)) and torch.equal(torch.from_numpy(batch[1]), result)
    assert not batch[0].any()
    with pytest.raises(InputError, match="out must be"):
        ImageTransform()(rgb, out=np.zeros((3, 20, 21), np.float32))


def test_flip_is_reproducible_and_mirrors():
    rgb = render_identity_image(0, 3, 0, size=32)
    plain = ImageTransform()(rgb)
    mirrored = torch.flip(plain, dims=[2])
    transform = ImageTransform(flip=True)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [transform(rgb, rng) for _ in range(16)]

    first, second = run(5), run(5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    flips = [torch.equal(t, mirrored) for t in first]
    assert all(f or torch.equal(t, plain) for f, t in zip(flips, first))
    assert any(flips) and not all(flips)
    assert [torch.equal(t, mirrored) for t in run(6)] != flips  # another seed, another draw
    with pytest.raises(InputError, match="Generator"):
        transform(rgb)
