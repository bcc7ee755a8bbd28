"""load_image: every PIL mode to RGB, EXIF orientation, pixel limit, broken input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ps3.images import MAX_IMAGE_PIXELS, load_image


def _save(image: Image.Image, path, fmt: str, **kwargs) -> str:
    image.save(path, fmt, **kwargs)
    return str(path)


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


def test_rgb_png_from_path_bytes_file_and_pil_agree(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "a.png", "PNG")
    raw = open(path, "rb").read()
    expected = pixels.astype(np.int32)
    np.testing.assert_array_equal(_rgb(load_image(path)), expected)
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "a.png")), expected)
    np.testing.assert_array_equal(_rgb(load_image(raw)), expected)
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(_rgb(load_image(handle)), expected)
        assert not handle.closed  # the caller's file object is left open
    np.testing.assert_array_equal(_rgb(load_image(Image.open(path))), expected)


def test_jpeg_rgb(tmp_path):
    path = _save(Image.new("RGB", (16, 8), (200, 30, 40)), tmp_path / "a.jpg", "JPEG", quality=95)
    out = load_image(path)
    assert out.size == (16, 8)
    assert np.abs(_rgb(out) - np.array([200, 30, 40])).max() <= 4


def test_grey_and_bilevel(tmp_path):
    grey = np.arange(0, 240, 15, dtype=np.uint8).reshape(4, 4)
    out = _rgb(load_image(_save(Image.fromarray(grey), tmp_path / "l.png", "PNG")))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)
    bits = Image.fromarray(grey > 100).convert("1")
    out = _rgb(load_image(_save(bits, tmp_path / "b.png", "PNG")))
    np.testing.assert_array_equal(out[..., 0], np.where(grey > 100, 255, 0))


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 0)  # black everywhere; only alpha differs
    rgba[..., 3] = [[0, 255, 128], [0, 255, 128]]
    out = _rgb(load_image(_save(Image.fromarray(rgba), tmp_path / "a.png", "PNG")))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent → white, not black
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    assert abs(out[0, 2, 0] - 127) <= 1  # half transparent black over white

    la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], axis=-1)
    out = _rgb(load_image(_save(Image.fromarray(la), tmp_path / "la.png", "PNG")))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [40, 40, 40])

    premultiplied = Image.fromarray(la).convert("La")
    out = _rgb(load_image(premultiplied))
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 0], [40, 40, 40])


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9)
    indices = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    image = Image.frombytes("P", (2, 2), indices.tobytes())
    image.putpalette(palette)
    out = _rgb(load_image(_save(image, tmp_path / "p.png", "PNG")))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 255])

    path = _save(image, tmp_path / "pt.png", "PNG", transparency=0)  # index 0 (red) transparent
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])

    gif = _save(image, tmp_path / "p.gif", "GIF", transparency=1)
    out = _rgb(load_image(gif))
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 255])


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    path = _save(cmyk, tmp_path / "c.jpg", "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = _rgb(load_image(path))
    assert out[..., 0].min() > 240 and out[..., 1].max() < 15 and out[..., 2].max() < 15


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000], [32768, 60000, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png", "PNG")
    assert Image.open(path).mode.startswith("I;16")
    out = _rgb(load_image(path))
    expected = np.rint(values / 257.0).astype(np.int32)  # v·255/65535
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert out[1, 0, 0] == 128  # PIL's own conversion would clip this to 255


def test_32bit_int_and_float_tiffs(tmp_path):
    ints = np.array([[0, 65535], [257, 514]], dtype=np.int32)
    path = _save(Image.fromarray(ints), tmp_path / "i.tif", "TIFF")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_rgb(load_image(path))[..., 1], [[0, 255], [1, 2]])

    signed = np.array([[-100, 0], [100, 155]], dtype=np.int32)  # outside 16-bit: min..max stretch
    out = _rgb(load_image(_save(Image.fromarray(signed), tmp_path / "s.tif", "TIFF")))
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [200, 255]])

    unit = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    path = _save(Image.fromarray(unit), tmp_path / "f.tif", "TIFF")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(_rgb(load_image(path))[..., 0], [[0, 128], [255, 64]])

    wide = np.array([[-2.0, 0.0], [2.0, np.nan]], dtype=np.float32)
    out = _rgb(load_image(_save(Image.fromarray(wide), tmp_path / "w.tif", "TIFF")))
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 0]])


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:, :10] = (255, 0, 0)  # left half red
    stored[:, 10:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the left half ends up on top
    path = _save(image, tmp_path / "o.jpg", "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.size == (10, 20)
    top, bottom = _rgb(out)[2, 5], _rgb(out)[17, 5]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_pixel_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png", "PNG")
    assert MAX_IMAGE_PIXELS == 16384 * 16384
    with pytest.raises(ValueError, match=r"big\.png.*10000 pixels.*limit of 9999"):
        load_image(path, max_pixels=9999)
    assert load_image(path, max_pixels=10000).size == (100, 100)
    with pytest.raises(ValueError, match="limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=50)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_our_limit_governs_not_pils(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse > 200 pixels
    path = _save(Image.new("RGB", (50, 50)), tmp_path / "a.png", "PNG")
    assert load_image(path).size == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after the header was read


def test_broken_inputs_raise_value_error_naming_the_file(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(Image.fromarray(pixels), tmp_path / "good.jpg", "JPEG")
    raw = open(good, "rb").read()
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated or corrupt"):
        load_image(truncated)
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        load_image(Image.open(truncated))  # lazily opened PIL image
    garbage = tmp_path / "noise.jpg"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"noise\.jpg.*not an image"):
        load_image(garbage)
    with pytest.raises(ValueError, match="sample-7"):
        load_image(b"\x00" * 50, name="sample-7")
    with pytest.raises(ValueError, match="<bytes>"):
        load_image(b"")
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="source must be"):
        load_image(12345)  # type: ignore[arg-type]
    assert load_image(io.BytesIO(raw)).size == (64, 64)
