"""Choosing a tile grid or a resolution for an image: the pure arithmetic several strategies share."""
from __future__ import annotations

import math


def closest_grid(width: int, height: int, min_num: int, max_num: int, tile: int) -> tuple[int, int]:
    """(cols, rows) with min_num ≤ cols·rows ≤ max_num whose cols/rows is closest to width/height,
    as InternVL's ``find_closest_aspect_ratio`` decides (and NVILA's copy of it).

    Candidates are visited by increasing tile count (within one count in the order of a Python set
    of the pairs, as the original does); a strictly closer ratio wins, and on an exact tie the
    later (larger) grid wins only when the image's area exceeds half the grid's pixel area."""
    aspect = width / height
    pairs = {(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num}
    best, best_diff = (1, 1), math.inf
    for cols, rows in sorted(pairs, key=lambda cr: cr[0] * cr[1]):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def best_pinpoint(width: int, height: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution``: the (W, H) pinpoint showing the most of the image
    after an aspect-preserving fit (area capped at the original's), then the least unused area."""
    best, best_eff, best_waste = pinpoints[0], -1, math.inf
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (pw, ph), eff, waste
    return best


def fit_and_pad(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """LLaVA-NeXT's ``resize_and_pad_image``: (new_h, new_w, top, left) of an aspect-preserving
    resize into the target (the fitted side rounded up) and its centred placement."""
    sw, sh = target_w / width, target_h / height
    if sw < sh:
        new_w, new_h = target_w, min(math.ceil(height * sw), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(width * sh), target_w)
    return new_h, new_w, (target_h - new_h) // 2, (target_w - new_w) // 2


def unpadded_grid(width: int, height: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """LLaVA-NeXT's ``unpad_image`` on a (grid_h, grid_w) feature map of a padded image:
    (first row, rows, first col, cols) kept. The kept size comes from truncating the scaled
    original side, then removing ⌊pad / 2⌋ from both ends — so an odd pad keeps one row more."""
    if width / height > grid_w / grid_h:
        new_h = int(height * (grid_w / width))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - 2 * pad, 0, grid_w
    new_w = int(width * (grid_h / height))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - 2 * pad


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``: both sides multiples of ``factor`` (rounded half to even),
    scaled down (floor) to at most ``max_pixels`` or up (ceil) to at least ``min_pixels``,
    keeping the aspect ratio as closely as the rounding allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {height}x{width} image has an aspect ratio above 200, which Qwen2-VL refuses; "
                         "crop it to at most 200:1")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def hd_columns(ratio: float, hd_num: int) -> int:
    """InternLM-XComposer2-4KHD's column count: the largest c with c·⌈c / ratio⌉ ≤ hd_num for a
    landscape ratio = width / height ≥ 1 (c·⌈c/ratio⌉ grows with c, so count up)."""
    c = 0
    while (c + 1) * math.ceil((c + 1) / ratio) <= hd_num:
        c += 1
    return c
