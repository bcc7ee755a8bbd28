"""Selection overlays on real images."""
import numpy as np
import pytest
import torch
from PIL import Image

from ps3.viz import colormap, overlay_selection
from ps3.encoder.vision import PS3VisionOutput


def fake_output():
    probs = torch.zeros(1, 4, 4)
    probs[0, 1, 2] = 1.0
    maps = torch.zeros(1, 4, 4, dtype=torch.long)
    maps[0, 1, 2] = 1
    return PS3VisionOutput(selection_probs=[probs], selection_maps=[maps])


def test_colormap_is_ordered_dark_to_bright():
    ramp = colormap(np.linspace(0, 1, 11)).astype(float).sum(-1)
    assert ramp[0] < 20 and ramp[-1] > 600 and np.all(np.diff(ramp) > 0)


def test_overlay_marks_selected_cell():
    photo = Image.new("RGB", (80, 80), (128, 128, 128))
    out = overlay_selection(photo, fake_output(), scale=1, alpha=1.0, title="t")
    assert out.width == 80
    bar = out.height - 80
    pixels = np.asarray(out)[bar:]
    # Cell (1, 2) spans rows 20-39, cols 40-59: its outline is cyan, its inside the map's brightest colour.
    assert tuple(pixels[20, 45]) == (0, 255, 255)
    assert tuple(pixels[30, 50]) == tuple(colormap(np.array(1.0)))
    assert tuple(pixels[5, 5]) == tuple(colormap(np.array(0.0)))


@pytest.mark.parametrize("kw,match", [(dict(scale=0), r"scale=0, but this output has 1 high-res scale\(s\): pass "),
                                      (dict(scale=3), r"has 1 high-res scale\(s\): pass scale=1 \(1 is the first"),
                                      (dict(sample=3), "sample must be"), (dict(alpha=2.0), "alpha")])
def test_overlay_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        overlay_selection(Image.new("RGB", (8, 8)), fake_output(), **kw)
