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
                                      (dict(interpolation="bilinear"), "interpolation"),
                                      (dict(image_size=(252, 0)), "image_size"),
                                      (dict(image_size=[1, 2, 3]), "image_size"),
                                      (dict(image_size="252x378"), "image_size"), (dict(max_pixels=100), "max_pixels"),
                                      (dict(resize_mode="keep_aspect", patch_size=0), "patch_size")])
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


def reference(image, size_hw, mean=0.5, std=0.5):
    """PIL bicubic of the RGB image to (height, width), scaled and normalised, by hand."""
    rgb = np.asarray(image.convert("RGB").resize(size_hw[::-1], Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return (torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std


@pytest.mark.parametrize("mode", ["P", "RGBA", "L"])
def test_height_width_pair_for_every_mode(tmp_path, mode):
    base = photo(90, 60)
    image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16) if mode == "P" else base.convert(mode)
    if mode == "RGBA":  # opaque alpha, so compositing over white leaves the colours as they are
        image.putalpha(255)
    path = tmp_path / "im.png"
    image.save(path)
    got = PS3ImageProcessor(image_size=(252, 378))(str(path))["pixel_values"][0]
    assert got.shape == (3, 252, 378)
    torch.testing.assert_close(got, reference(image, (252, 378)))


def test_image_size_pair_from_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"image_size": [252, 378], "resize_mode": "squash"}')
    proc = PS3ImageProcessor.from_pretrained(tmp_path)
    assert proc.image_size == (252, 378)
    assert proc(photo())["pixel_values"][0].shape == (3, 252, 378)
    proc.save_pretrained(tmp_path / "again")
    assert PS3ImageProcessor.from_pretrained(tmp_path / "again").to_dict() == proc.to_dict()
    assert proc.to_dict()["image_size"] == [252, 378]
    # a per-call size may be a pair too, and an int is still a square
    assert proc(photo(), image_size=(28, 14))["pixel_values"][0].shape == (3, 28, 14)
    assert proc(photo(), image_size=20)["pixel_values"][0].shape == (3, 20, 20)


def test_keep_aspect_long_side_becomes_image_size():
    proc = PS3ImageProcessor(image_size=56, resize_mode="keep_aspect")
    panorama, portrait = photo(400, 100, seed=3), photo(60, 90, seed=4)
    out = proc([panorama, portrait])["pixel_values"]
    assert [tuple(p.shape) for p in out] == [(3, 14, 56), (3, 56, 37)]  # 60·56/90 = 37.3
    torch.testing.assert_close(out[0], reference(panorama, (14, 56)))
    with pytest.raises(ValueError, match="return_tensors=None"):
        proc([panorama, portrait], return_tensors="pt")
    same = proc([panorama, photo(800, 200)], return_tensors="pt")["pixel_values"]
    assert same.shape == (2, 3, 14, 56)


def test_keep_aspect_patch_multiples_and_pixel_budget():
    proc = PS3ImageProcessor(image_size=56, resize_mode="keep_aspect", patch_size=14)
    assert proc(photo(60, 90))["pixel_values"][0].shape == (3, 56, 28)  # 37.3 → 2 patches
    assert proc(photo(300, 10))["pixel_values"][0].shape == (3, 14, 56)  # at least one patch
    budget = PS3ImageProcessor(image_size=1000, resize_mode="keep_aspect", max_pixels=600)
    assert budget.output_size(200, 300) == (20, 30)  # scale sqrt(600 / 60000) = 0.1
    assert budget.output_size(20, 30) == (20, 30)  # upscaling stops at the budget too
    both = PS3ImageProcessor(image_size=1000, resize_mode="keep_aspect", max_pixels=600, patch_size=7)
    assert both.output_size(200, 300) == (14, 28)
    assert both.to_dict()["max_pixels"] == 600 and both.to_dict()["patch_size"] == 7
    assert "max_pixels" not in PS3ImageProcessor().to_dict()
    # the 4K long side: 3780 is 270 patches of 14 exactly
    big = PS3ImageProcessor(image_size=3780, resize_mode="keep_aspect", patch_size=14)
    assert big.output_size(1000, 4000) == (938, 3780) and big.output_size(3000, 1000) == (3780, 1260)


def test_keep_aspect_output_runs_through_the_model():
    # The tiny fixture model (scales 56/112/224, patch 14): a 4:1 panorama kept at 56 x 224 gets
    # 4:1 high-res grids (2x8 and 4x16 cells, design §3.1) instead of the squashed 8x8 and 16x16.
    from pathlib import Path

    import ps3

    vision = ps3.PS3VisionModel.from_pretrained(Path(__file__).parent / "fixtures" / "ps3_tiny" / "model")
    proc = PS3ImageProcessor(image_size=vision.config.ps3_scales[-1], resize_mode="keep_aspect", patch_size=14)
    pixels = proc(photo(400, 100, seed=5))["pixel_values"][0]
    assert pixels.shape == (3, 56, 224)
    with torch.no_grad():
        out = vision(pixels[None], num_look_close="all")
    kept = vision.count_tokens(56, 224, num_look_close="all")
    assert kept.per_scale == [2 * 8, 4 * 16] and out.last_hidden_state.shape[1] == kept.total == 16 + 80
    assert [tuple(m.shape[1:]) for m in out.selection_maps] == [(2, 8), (4, 16)]
    assert vision.count_tokens(224, 224, num_look_close="all").total == 16 + 64 + 256
