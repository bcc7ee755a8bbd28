"""``qwen2_vl``: Qwen2-VL's native resolution. The image is resized by ``smart_resize`` (sides
multiples of patch·merge = 28, at most ``max_pixels``, at least ``min_pixels``, never an aspect
ratio above 200) and goes through the backbone once at that size; a 2×2 merge gives
(h/28)·(w/28) tokens between ``<|vision_start|>`` and ``<|vision_end|>``. The backbone must take
non-square (1, 3, h, w) images. Facts from a written statement of ``smart_resize`` (Qwen2-VL's
``qwen_vl_utils``; its repository is not among this project's snapshots), with its guard that no
side goes below one factor.
"""
from __future__ import annotations

from typing import Any

from .base import Plan, Strategy, assemble, check_int, encode_views, features, fold, full_box, squash
from .grids import smart_resize


class Qwen2VL(Strategy):
    name = "qwen2_vl"
    defaults = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2}
    knob = "max_pixels"

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        patch = check_int("patch_size", p["patch_size"])
        merge = check_int("merge_size", p["merge_size"])
        factor = patch * merge
        lo = check_int("min_pixels", p["min_pixels"])
        hi = check_int("max_pixels", p["max_pixels"], low=max(lo, factor * factor),
                       hint=f" (at least min_pixels and one {factor}x{factor} token)")
        h, w = smart_resize(height, width, factor, lo, hi)
        seg = features("features", (h // factor, w // factor), full_box(height, width), 0)
        return self.make_plan(height, width, p, [squash("native", (h, w))], [seg], text_tokens=2,
                              notes=f"resized to {h}x{w} (h x w)")

    def encode(self, plan: Plan, backbone, image, separators=None):
        maps = encode_views(plan, backbone, image, plan.param("patch_size"))
        return assemble(plan, [fold(maps[0], plan.param("merge_size"))[0]], separators)

    def knob_values(self, height, width, budget, p):
        factor = p["patch_size"] * p["merge_size"]
        return [n * factor * factor for n in range(max(4, budget * 3 // 4), budget * 5 // 4 + 2)]
