"""Boxes of the text-box records and their ground-truth maps (design §5).

A box is ``[x0, y0, x1, y1]`` in the pixels of the original image, edge coordinates (pixel
columns ``x0 … x1-1``). :func:`clip_box` clips it to the image (or names why it is unusable);
:func:`box_cells` maps it through the squash resize of the image to a target size and returns
the inclusive rows ``floor(y0)…ceil(y1)`` and columns ``floor(x0)…ceil(x1)`` of the map, clipped
to it; :func:`box_to_gt_map` draws that rectangle of ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .shards import SKIP_REASONS

__all__ = ["Box", "clip_box", "box_cells", "box_to_gt_map"]

Box = tuple[float, float, float, float]


def clip_box(box: Any, width: int, height: int) -> Box | str:
    """The box clipped to a ``width`` × ``height`` image, or the skip reason when it cannot be
    used: ``"bad_box"`` (not 4 finite numbers, inverted or zero area) or ``"box_outside_image"``
    (nothing left after clipping)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return "bad_box"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return "bad_box"
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return "bad_box"  # non-finite, inverted or zero-area
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        return "box_outside_image"
    return x0, y0, x1, y1


def _map_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of the map from ``S`` or ``(H, W)``."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        height = width = image_size
    elif isinstance(image_size, Sequence) and len(image_size) == 2:
        height, width = image_size
    else:
        raise ValueError(f"image_size must be an int S or a pair (height, width), got {image_size!r}")
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"image_size must hold positive ints, got {image_size!r}")
    return height, width


def box_cells(box: Sequence[float], original_size: tuple[int, int],
              image_size: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Inclusive ``(row0, row1, col0, col1)`` of the gt map for a (clipped) box in the pixels of
    an image of ``original_size = (width, height)`` squash-resized to ``image_size`` (``S`` or
    ``(H, W)``)."""
    width, height = original_size
    map_height, map_width = _map_size(image_size)
    # Multiply before dividing: 20 * 10 / 50 is exactly 4, 20 * (10 / 50) is not.
    x0, x1 = box[0] * map_width / width, box[2] * map_width / width
    y0, y1 = box[1] * map_height / height, box[3] * map_height / height
    last_row, last_col = map_height - 1, map_width - 1
    row0, row1 = min(max(math.floor(y0), 0), last_row), min(max(math.ceil(y1), 0), last_row)
    col0, col1 = min(max(math.floor(x0), 0), last_col), min(max(math.ceil(x1), 0), last_col)
    return row0, row1, col0, col1


def box_to_gt_map(box: Sequence[float] | None, original_size: tuple[int, int],
                  image_size: int | Sequence[int]) -> torch.Tensor:
    """The float 0/1 ground-truth map, (S, S) or (H, W), of a box ``[x0, y0, x1, y1]`` given in
    the pixels of an image of ``original_size = (width, height)`` after the squash resize to
    ``image_size`` (design §5). ``box=None`` (a global caption) gives the whole-image map of ones.
    The box is clipped to the image first; an unusable box raises ``ValueError``."""
    gt = torch.zeros(_map_size(image_size))
    if box is None:
        return gt.fill_(1.0)
    clipped = clip_box(box, *original_size)
    if isinstance(clipped, str):
        raise ValueError(f"box {box!r} is not usable for an image of size {original_size}: {SKIP_REASONS[clipped]}")
    row0, row1, col0, col1 = box_cells(clipped, original_size, image_size)
    gt[row0:row1 + 1, col0:col1 + 1] = 1.0
    return gt
