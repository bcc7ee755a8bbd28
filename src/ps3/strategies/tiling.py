"""Tiling strategies: the image cut into backbone-sized tiles plus a global view.

* ``internvl_tiling`` — InternVL's ``dynamic_preprocess`` (OpenGVLab/InternVL 2410d1d,
  ``internvl_chat/internvl/train/dataset.py``; VILA's ``dynamic`` mode is the same code): the
  image squashed to the closest-ratio grid of 448 px tiles, a 448 px thumbnail after them when
  there is more than one tile, 256 tokens per tile after the 0.5 pixel shuffle, ``<img>`` and
  ``</img>`` around them. InternVL trains with ``max_num`` 6 and its model cards infer with 12.
* ``anyres`` — LLaVA-NeXT (haotian-liu/LLaVA c121f04, ``llava/mm_utils.py`` and
  ``llava/model/llava_arch.py``): the base image squashed to 336 px first, then the pinpoint
  canvas (aspect-preserving resize, centred black padding) in 336 px tiles; the padding is
  removed from the stitched feature map by ``unpad_image``'s proportional crop and a learned
  ``image_newline`` row follows every remaining feature row.
* ``ixc_hd`` — InternLM-XComposer2-4KHD (InternLM/InternLM-XComposer 0f70c3e,
  ``InternLM-XComposer-2.0/finetune/ixc_utils.py`` ``HD_transform`` / ``padding_336``): portraits
  handled as landscapes, c columns of 336 px, height padded (white, centred) to whole tiles; a
  336 px global view of that padded image; 12×12 tokens per view after a 2×2 fold; the learned
  ``sub_GN`` after every token row and ``glb_GN`` between the global view and the tiles.
"""
from __future__ import annotations

import math
import re
from typing import Any

from .base import (Plan, Strategy, View, assemble, check_int, encode_views, features, fold, full_box, separator,
                   squash, stitch, tokens_per_side)
from .grids import best_pinpoint, closest_grid, fit_and_pad, hd_columns, unpadded_grid


class InternVLTiling(Strategy):
    name = "internvl_tiling"
    defaults = {"image_size": 448, "min_num": 1, "max_num": 12, "use_thumbnail": True, "downsample_ratio": 0.5,
                "patch_size": 14}
    knob = "max_num"

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        tile = check_int("image_size", p["image_size"])
        lo = check_int("min_num", p["min_num"])
        hi = check_int("max_num", p["max_num"], low=lo, hint=f" (at least min_num={lo})")
        ratio = p["downsample_ratio"]
        if ratio not in (1, 0.5, 0.25):
            raise ValueError(f"downsample_ratio must be 0.5 (InternVL's pixel shuffle), 0.25 or 1, got {ratio!r}")
        if not isinstance(p["use_thumbnail"], bool):
            raise ValueError(f"use_thumbnail must be True or False, got {p['use_thumbnail']!r}")
        side = tokens_per_side(tile, check_int("patch_size", p["patch_size"]), round(1 / ratio))
        cols, rows = closest_grid(width, height, lo, hi, tile)
        views = [squash("tiles", (rows * tile, cols * tile), (rows, cols))]
        sx, sy = width / cols, height / rows
        segments = [features(f"tile {r},{c}", (side, side), (c * sx, r * sy, (c + 1) * sx, (r + 1) * sy), 0)
                    for r in range(rows) for c in range(cols)]
        if p["use_thumbnail"] and rows * cols > 1:
            views.append(squash("thumbnail", (tile, tile)))
            segments.append(features("thumbnail", (side, side), full_box(height, width), 1))
        return self.make_plan(height, width, p, views, segments, text_tokens=2, grid=(rows, cols))

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        k = round(1 / plan.param("downsample_ratio"))
        tiles = list(fold(maps[0], k).unbind(0))
        if len(plan.views) > 1:
            tiles.append(fold(maps[1], k)[0])
        return assemble(plan, tiles, separators)

    def knob_values(self, height, width, budget, p):
        return list(range(1, max(1, budget // 256) + 4))


_GRID_RANGE = re.compile(r"^\((\d+)x(\d+)\),\.\.\.,\((\d+)x(\d+)\)$")
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def parse_pinpoints(value: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """Pinpoints as (W, H) pairs: a list of pairs, or a range "(1x1),...,(3x3)" (every cols×rows
    grid of ``tile`` px tiles in between, LLaVA-OneVision's notation)."""
    if isinstance(value, str):
        m = _GRID_RANGE.match(value.replace(" ", ""))
        if not m:
            raise ValueError(f"grid_pinpoints as a string must look like '(1x1),...,(3x3)', got {value!r}")
        c0, r0, c1, r1 = map(int, m.groups())
        return tuple((c * tile, r * tile) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1))
    try:
        pairs = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError):
        raise ValueError(f"grid_pinpoints must be (W, H) pairs, e.g. [(336, 672), (672, 672)], or a range such as "
                         f"'(1x1),...,(3x3)', got {value!r}") from None
    if not pairs or any(w < tile or h < tile or w % tile or h % tile for w, h in pairs):
        raise ValueError(f"grid_pinpoints must be (W, H) pairs of positive multiples of image_size={tile}, "
                         f"got {value!r}")
    return pairs


class AnyRes(Strategy):
    name = "anyres"
    defaults = {"grid_pinpoints": LLAVA_NEXT_PINPOINTS, "image_size": 336, "patch_size": 14}
    knob = "grid_pinpoints"
    separators = ("image_newline",)

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        tile = check_int("image_size", p["image_size"])
        side = tokens_per_side(tile, check_int("patch_size", p["patch_size"]))
        pinpoints = parse_pinpoints(p["grid_pinpoints"], tile)
        if not isinstance(p["grid_pinpoints"], str):
            p["grid_pinpoints"] = pinpoints
        tw, th = best_pinpoint(width, height, pinpoints)
        new_h, new_w, top, left = fit_and_pad(width, height, tw, th)
        rows, cols = th // tile, tw // tile
        views = [squash("base", (tile, tile)),
                 View("tiles", (new_h, new_w), (-top, -left, th, tw), (rows, cols))]
        r0, kh, c0, kw = unpadded_grid(width, height, rows * side, cols * side)
        segments = [features("base", (side, side), full_box(height, width), 0),
                    features("tiles", (kh, kw), full_box(height, width), 1, row_separator="image_newline")]
        notes = f"pinpoint {tw}x{th}, unpadded rows {r0}:{r0 + kh}, cols {c0}:{c0 + kw}"
        return self.make_plan(height, width, p, views, segments, text_tokens=0, grid=(rows, cols), notes=notes)

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        grid = stitch(maps[1], plan.views[1].grid)
        side = maps[0].shape[1]
        r0, kh, c0, kw = unpadded_grid(plan.width, plan.height, plan.grid[0] * side, plan.grid[1] * side)
        return assemble(plan, [maps[0][0], grid[r0:r0 + kh, c0:c0 + kw]], separators)

    def knob_values(self, height, width, budget, p):
        return [f"(1x1),...,({n}x{n})" for n in range(1, 9)]


class IXCHD(Strategy):
    name = "ixc_hd"
    defaults = {"hd_num": 25, "image_size": 336, "patch_size": 14}
    knob = "hd_num"
    separators = ("sub_GN", "glb_GN")

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        hd_num = check_int("hd_num", p["hd_num"])
        tile = check_int("image_size", p["image_size"])
        side = tokens_per_side(tile, check_int("patch_size", p["patch_size"]), fold=2)
        portrait = width < height
        long, short = (height, width) if portrait else (width, height)
        ratio = long / short
        cols = hd_columns(ratio, hd_num)
        new_long = cols * tile
        new_short = int(new_long / ratio)
        if new_short == 0:
            raise ValueError(f"a {height}x{width} image is too narrow for hd_num={hd_num}: its short side becomes 0 px "
                             f"(the original fails too); pass hd_num >= {math.ceil(ratio / tile) ** 2} or crop it")
        padded = math.ceil(new_short / tile) * tile
        pad = int((padded - new_short) / 2)
        rows = padded // tile
        if portrait:
            hd = View("tiles", (new_long, new_short), (0, -pad, new_long, padded), (cols, rows), fill=1.0)
        else:
            hd = View("tiles", (new_short, new_long), (-pad, 0, padded, new_long), (rows, cols), fill=1.0)
        views = [hd, View("global", (tile, tile), (0, 0, tile, tile), (1, 1), of=0)]
        g, span = hd.grid, hd.span(height, width)  # both views show the padded image
        segments = [features("global", (side, side), span, 1, row_separator="sub_GN"),
                    separator("glb_GN"),
                    features("tiles", (g[0] * side, g[1] * side), span, 0, row_separator="sub_GN")]
        return self.make_plan(height, width, p, views, segments, text_tokens=0, grid=g)

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        mosaic = stitch(fold(maps[0], 2), plan.views[0].grid)
        return assemble(plan, [fold(maps[1], 2)[0], None, mosaic], separators)

    def knob_values(self, height, width, budget, p):
        return list(range(1, max(1, budget // 144) + 4))
