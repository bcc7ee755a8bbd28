"""S2-style strategies: every scale through the same backbone, stitched and concatenated on channels.

* ``s2`` — LLaVA-1.5-S2 (haotian-liu/LLaVA c121f04, ``CLIPVisionTowerS2`` and ``process_images``;
  bfshi/scaling_on_scales 9c008a3 README): the CLIP processor's shortest edge and centre crop are
  set to the largest scale (so a non-square image loses its sides), S2 at 336/672/1008 with
  336 px pieces, features area-resized to the first scale's 24×24 and concatenated.
* ``dynamic_s2`` — NVILA (NVlabs/VILA b760c34, ``llava/mm_utils.py`` ``dynamic_s2_preprocess``
  and ``llava/model/llava_arch.py`` ``merge_features_for_dynamic_s2``): lower scales squash the
  image to k·448 squares of k×k tiles; the top scale takes the tile grid closest to the image's
  aspect ratio with at least (s_top / s_0)² tiles; every scale's stitched map is area-resized to
  the top scale's and concatenated; the projector's 2×2 fold runs per 32×32 tile. NVILA tiles
  every image in training but, at inference, only the single image of a one-image prompt.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import (Plan, Strategy, View, area_resize, assemble, check_int, check_multiple, encode_views, features,
                   fold, full_box, squash, stitch, tokens_per_side)
from .grids import closest_grid


def _check_scales(name: str, scales: Any) -> tuple[int, ...]:
    if not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"{name} must be a non-empty list of increasing sizes in pixels, e.g. [336, 672, 1008], "
                         f"got {scales!r}")
    out = tuple(check_int(f"{name}[{i}]", s) for i, s in enumerate(scales))
    if list(out) != sorted(set(out)):
        raise ValueError(f"{name} must increase, got {list(out)}; pass e.g. [336, 672, 1008]")
    return out


class S2(Strategy):
    name = "s2"
    defaults = {"s2_scales": (336, 672, 1008), "max_split_size": 336, "resize_output_to_idx": 0, "patch_size": 14}
    knob = "resize_output_to_idx"

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        scales = p["s2_scales"] = _check_scales("s2_scales", p["s2_scales"])
        split = check_int("max_split_size", p["max_split_size"])
        patch = check_int("patch_size", p["patch_size"])
        idx = p["resize_output_to_idx"]
        if isinstance(idx, bool) or not isinstance(idx, int) or not -len(scales) <= idx < len(scales):
            raise ValueError(f"resize_output_to_idx must be an int in [{-len(scales)}, {len(scales) - 1}] for "
                             f"s2_scales={list(scales)}, got {idx!r}")
        for s in scales:
            check_multiple("each of s2_scales", s, split, "max_split_size")
        side = tokens_per_side(split, patch)
        top = scales[-1]
        # The CLIP processor: shortest edge to the largest scale (the long side truncated), centre crop.
        short, long = min(height, width), max(height, width)
        long_px = int(top * long / short)
        resized = (top, long_px) if height <= width else (long_px, top)
        crop = ((resized[0] - top) // 2, (resized[1] - top) // 2, top, top)
        views = [View("crop", resized, crop, (1, 1), encoded=False)]
        views += [View(f"scale {s}", (s, s), (0, 0, s, s), (s // split, s // split), of=0) for s in scales]
        out = scales[idx] // split * side
        box = views[0].source_box(height, width)
        return self.make_plan(height, width, p, views, [features("features", (out, out), box, 1 + idx % len(scales))],
                              text_tokens=0)

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        stitched = [stitch(m, v.grid) for m, v in zip(maps[1:], plan.views[1:])]
        size = plan.segments[0].grid
        return assemble(plan, [torch.cat([area_resize(m, size) for m in stitched], dim=-1)], separators)

    def knob_values(self, height, width, budget, p):
        return list(range(len(p["s2_scales"])))


class DynamicS2(Strategy):
    name = "dynamic_s2"
    defaults = {"s2_scales": (448, 896, 1344), "image_size": 448, "max_tiles": 12, "patch_size": 14}
    knob = "max_tiles"

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        scales = p["s2_scales"] = _check_scales("s2_scales", p["s2_scales"])
        tile = check_int("image_size", p["image_size"])
        patch = check_int("patch_size", p["patch_size"])
        for s in scales:
            check_multiple("each of s2_scales", s, scales[0], "s2_scales[0]")
        min_tiles = (scales[-1] // scales[0]) ** 2
        max_tiles = p["max_tiles"]
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < min_tiles:
            raise ValueError(f"max_tiles must be an int >= {min_tiles}: the top scale {scales[-1]} needs at least "
                             f"({scales[-1]} // {scales[0]})² = {min_tiles} tiles (the original silently falls back "
                             f"to one tile below that); got {max_tiles!r}, pass max_tiles={min_tiles} or more")
        side = tokens_per_side(tile, patch, fold=2)
        cols, rows = closest_grid(width, height, min_tiles, max_tiles, tile)
        views = []
        for s in scales[:-1]:
            k = s // scales[0]
            views.append(squash(f"scale {s}", (k * tile, k * tile), (k, k)))
        views.append(squash(f"scale {scales[-1]}", (rows * tile, cols * tile), (rows, cols)))
        seg = features("features", (rows * side, cols * side), full_box(height, width), len(views) - 1)
        return self.make_plan(height, width, p, views, [seg], text_tokens=1, grid=(rows, cols))

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        stitched = [stitch(m, v.grid) for m, v in zip(maps, plan.views)]
        top = tuple(stitched[-1].shape[:2])
        merged = torch.cat([area_resize(m, top) for m in stitched], dim=-1)
        # The 2×2 fold runs per tile; tiles have an even token side, so folding the stitched map is the same.
        return assemble(plan, [fold(merged.unsqueeze(0), 2)[0]], separators)

    def knob_values(self, height, width, budget, p):
        scales = p["s2_scales"]
        low = (scales[-1] // scales[0]) ** 2
        return list(range(low, max(low, budget // 256 + 4) + 1))
