"""PS3ImageProcessor on real image files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ps3 import PS3ImageProcessor


def photo(w=90, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_pixels_are_squash_bicubic_then_normalised(tmp_path):
    path = tmp_path / "a.jpg"
    photo().save(path, quality=95)
    proc = PS3ImageProcessor(image_size=56, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    got = proc(str(path))["pixel_values"][0]
    ref = np.asarray(Image.open(path).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) \
        / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert got.shape == (3, 56, 56) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_batch_and_stack():
    proc = PS3ImageProcessor(image_size=28)
    out = proc([photo(seed=1), photo(seed=2)], return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, 28, 28) and -1 <= out.min() and out.max() <= 1


def test_palette_png_is_resized_in_rgb_not_nearest(tmp_path):
    base = photo(40, 40)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / "p.png"
    pal.save(path)
    proc = PS3ImageProcessor(image_size=100)
    got = proc(str(path))["pixel_values"][0]
    want = proc(pal.convert("RGB"))["pixel_values"][0]
    torch.testing.assert_close(got, want)


def test_exif_orientation_applied(tmp_path):
    img = photo(80, 40)  # landscape pixels, EXIF says rotate 90°: upright it is portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    proc = PS3ImageProcessor(image_size=16)
    got = proc(buf.getvalue())["pixel_values"][0]
    upright = Image.open(io.BytesIO(buf.getvalue())).transpose(Image.Transpose.ROTATE_270)
    upright = Image.fromarray(np.asarray(upright))  # plain pixels, no EXIF left to apply
    assert upright.size == (40, 80)
    torch.testing.assert_close(got, proc(upright)["pixel_values"][0])


def test_save_and_load(tmp_path):
    proc = PS3ImageProcessor(image_size=3780, extra_key="kept")
    proc.save_pretrained(tmp_path)
    again = PS3ImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict() and again.extra["extra_key"] == "kept"


@pytest.mark.parametrize("kw,match", [(dict(image_size=0), "image_size"), (dict(std=[1, 0, 1]), "std"),
                                      (dict(resize_mode="shortest"), "resize_mode"),
                                      (dict(interpolation="bilinear"), "interpolation")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        PS3ImageProcessor(**kw)


def test_bad_images(tmp_path):
    proc = PS3ImageProcessor(image_size=16)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        proc(str(tmp_path / "broken.jpg"))
    with pytest.raises(ValueError, match="empty"):
        proc([])
    with pytest.raises(ValueError, match="return_tensors"):
        proc(photo(), return_tensors="np")
