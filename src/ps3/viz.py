"""Selection overlays: which high-res patches PS3 chose, and how strongly it wanted each one.

``overlay_selection(image, output, scale=1)`` blends the selection probability of one high-res
scale over the photo as a heatmap, outlines the selected patches and adds a title bar. Pillow only.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .images import load_image


# Anchor colours of a perceptually ordered dark-to-bright map (black → purple → orange → yellow).
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 by linear interpolation between the anchors."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).round().astype(np.uint8)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def overlay_selection(image: Any, output: Any, scale: int = 1, sample: int = 0, alpha: float = 0.55,
                      title: str | None = None, outline: Sequence[int] = (0, 255, 255), max_side: int = 1024
                      ) -> Image.Image:
    """Heatmap of ``output.selection_probs[scale-1]`` over ``image`` with selected cells outlined.

    image: anything :func:`ps3.images.load_image` takes (path, PIL image, bytes).
    output: a PS3VisionOutput (or anything with ``selection_probs`` / ``selection_maps`` lists).
    scale: which high-res scale, 1-based (1 = the first high-res scale).
    """
    probs = getattr(output, "selection_probs", None)
    if not probs:
        raise ValueError("output has no selection_probs: pass the output of a PS3 vision call")
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= len(probs):
        which = "scale=1" if len(probs) == 1 else f"scale=1 to {len(probs)}"
        raise ValueError(f"scale={scale!r}, but this output has {len(probs)} high-res scale(s): pass {which} "
                         "(1 is the first high-res scale, the model's ps3_scales[1])")
    if not 0 <= sample < probs[0].shape[0]:
        raise ValueError(f"sample must be in [0, {probs[0].shape[0]}), got {sample}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    photo = load_image(image)
    ratio = min(1.0, max_side / max(photo.size))
    size = (max(1, round(photo.width * ratio)), max(1, round(photo.height * ratio)))
    photo = photo.resize(size, Image.Resampling.BICUBIC)
    W, H = photo.size
    prob = _as_numpy(probs[scale - 1][sample])
    gh, gw = prob.shape
    heat = Image.fromarray(colormap(prob)).resize((W, H), Image.Resampling.NEAREST)
    canvas = Image.blend(photo, heat, alpha)
    maps = getattr(output, "selection_maps", None)
    selected = 0
    if maps:
        chosen = _as_numpy(maps[scale - 1][sample]) > 0
        selected = int(chosen.sum())
        draw = ImageDraw.Draw(canvas)
        for r, c in zip(*np.nonzero(chosen)):
            x0, y0 = c * W / gw, r * H / gh
            x1, y1 = (c + 1) * W / gw - 1, (r + 1) * H / gh - 1
            draw.rectangle([x0, y0, x1, y1], outline=tuple(outline), width=1 if gw > 40 else 2)
    label = title if title is not None else f"scale {scale}: {selected}/{gh * gw} patches selected"
    return _with_title(canvas, label)


def _with_title(canvas: Image.Image, text: str) -> Image.Image:
    font = ImageFont.load_default()
    lines = text.split("\n")
    line_h = 14
    bar = 8 + line_h * len(lines) + 16
    out = Image.new("RGB", (canvas.width, canvas.height + bar), (255, 255, 255))
    out.paste(canvas, (0, bar))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    # A legend: the colour ramp of the selection probability, from 0 to 1.
    ramp_w = min(200, canvas.width - 50)
    if ramp_w > 20:
        ramp = Image.fromarray(colormap(np.linspace(0, 1, ramp_w)[None].repeat(8, 0)))
        y = bar - 14
        out.paste(ramp, (30, y))
        draw.text((6, y - 2), "0", fill=(0, 0, 0), font=font)
        draw.text((34 + ramp_w, y - 2), "1", fill=(0, 0, 0), font=font)
    return out
