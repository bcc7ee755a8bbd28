"""``ps3`` as a strategy of :mod:`ps3.strategies`: this library's encoder at a token budget.

The LLM receives what :class:`ps3.mllm.PS3Projector` merges (before its MLP): the low-res grid
merged k×k, then the kept k×k blocks of every high-res scale, counted exactly as
:func:`ps3.mllm.count_llm_tokens` counts (blocks are selected whole, so the count does not
depend on the content; *which* blocks does, and the layout returned by ``encode`` says).

Parameters: ``scales`` (the model's ``ps3_scales``), ``patch_size``, ``budgets`` (high-res cells
per scale and look; default the model's pixel-proportional split of ``max_select_num``),
``num_token_look_close`` (the knob: high-res cells per look, split over the scales in proportion
to ``budgets``), ``num_looks`` (an int or "all"), ``k`` (the merge, 2), ``only_select_first_n_scale``
and ``resize_mode`` (``"squash"`` to the largest scale, as the published checkpoints were
trained, or ``"keep_aspect"``: the long side becomes the largest scale, both sides whole
patches). ``backbone_passes`` counts trunk passes: the low-res pass and one per look.
``params_for(model)`` gives a model's own geometry.

The strategy is registered like the others, but the encoder and the MLLM token rules it runs are
a layer above this package: they are imported inside the methods that use them, so this package
does not import them at import time and no import cycle can form.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..processor import fit_size
from ..registry import SCALES_4K
from .base import (Layout, Plan, Segment, Strategy, as_image, check_int, features, full_box, resize_antialiased_fp32,
                   squash)


def params_for(vision_model: Any) -> dict[str, Any]:
    """The plan parameters a PS3 vision model (or encoder) encodes with."""
    from ..mllm.block_looks import encoder_of

    encoder = encoder_of(vision_model)
    return {"scales": tuple(encoder.ps3_scales), "patch_size": encoder.patch_size,
            "budgets": tuple(encoder.max_select_num_each_scale)}


def _budgets(p: dict[str, Any]) -> list[int]:
    from ..encoder.selection import default_budgets

    scales = p["scales"]
    budgets = list(default_budgets(2560, scales) if p["budgets"] is None else p["budgets"])
    if len(budgets) != len(scales) - 1 or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in budgets):
        raise ValueError(f"budgets must give one cell count >= 0 per high-res scale ({len(scales) - 1} for scales "
                         f"{list(scales)}), got {p['budgets']!r}")
    n = p["num_token_look_close"]
    if n is None:
        return budgets
    n = check_int("num_token_look_close", n, low=0, hint=" (high-res cells per look)")
    total = sum(budgets) or 1
    out = [int(b * n / total) for b in budgets]
    out[-1] += n - sum(out)
    return out


class PS3Strategy(Strategy):
    name = "ps3"
    defaults = {"scales": SCALES_4K, "patch_size": 14, "budgets": None, "num_token_look_close": None, "num_looks": 1,
                "k": 2, "only_select_first_n_scale": None, "resize_mode": "squash"}
    knob = "num_token_look_close"

    def input_size(self, height: int, width: int, p: dict[str, Any]) -> tuple[int, int]:
        top = p["scales"][-1]
        if p["resize_mode"] == "squash":
            return top, top
        if p["resize_mode"] == "keep_aspect":
            return fit_size(height, width, top, None, p["patch_size"])
        raise ValueError(f"resize_mode must be 'squash' or 'keep_aspect', got {p['resize_mode']!r}")

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        from ..mllm.tokens import _check_k, block_grids, plan_block_looks

        scales = p["scales"] = tuple(check_int("scales[i]", s) for s in p["scales"])
        if len(scales) < 2 or list(scales) != sorted(set(scales)):
            raise ValueError(f"scales must be increasing sizes, a low-res one and at least one high-res, got {scales}")
        patch, k = check_int("patch_size", p["patch_size"]), _check_k(p["k"])
        budgets = _budgets(p)
        if p["budgets"] is not None:
            p["budgets"] = tuple(p["budgets"])
        ih, iw = self.input_size(height, width, p)
        low, grids = block_grids(ih, iw, scales, patch, k)
        looks = plan_block_looks(grids, budgets, k, p["num_looks"], p["only_select_first_n_scale"])
        segments = [features("low-res", low, full_box(height, width), 0)]
        for i, (grid, s) in enumerate(zip(grids, scales[1:])):
            blocks = sum(look[i] for look in looks)
            if blocks:
                segments.append(Segment("features", f"scale {s}", blocks, grid, full_box(height, width), 0))
        per_scale = [sum(look[i] for look in looks) for i in range(len(grids))]
        plan = self.make_plan(height, width, p, [squash("input", (ih, iw))], segments, text_tokens=0,
                              notes=f"{len(looks)} look(s), blocks per scale {per_scale}")
        return dataclasses.replace(plan, backbone_passes=1 + len(looks))

    def encode(self, plan: Plan, backbone, image, separators=None):
        from ..mllm.block_looks import encode_for_llm, encoder_of
        from ..mllm.projector import kept_block_tokens, merge_grid

        encoder = encoder_of(backbone)
        p = dict(plan.params)
        if tuple(encoder.ps3_scales) != p["scales"] or encoder.patch_size != p["patch_size"]:
            raise ValueError(f"the plan is for scales {list(p['scales'])} and patch {p['patch_size']} but the model "
                             f"has {list(encoder.ps3_scales)} and {encoder.patch_size}; plan with "
                             "**ps3.strategies.ps3.params_for(model)")
        image = as_image(image)
        dtype = next(encoder.parameters()).dtype
        pixels = (resize_antialiased_fp32(image, plan.views[0].resize).float() * 2 - 1).to(dtype)  # mean = std = 0.5
        out = encode_for_llm(encoder, pixels, k=p["k"], max_select_num_each_scale=_budgets(p),
                             num_look_close=p["num_looks"],
                             only_select_first_n_scale=p["only_select_first_n_scale"], num_hidden_layers_to_return=1)
        tokens, k = out.last_hidden_state[0], p["k"]
        h0, w0 = encoder.feature_sizes(*pixels.shape[-2:])[0]
        low = merge_grid(tokens[None, :h0 * w0].reshape(1, h0, w0, -1), k)[0]
        maps = list(out.selection_maps)
        high, _, _ = kept_block_tokens(tokens[None, h0 * w0:], maps, k, plan.num_tokens, low.shape[0])
        rows = torch.cat([low, high[0]])
        assert rows.shape[0] == plan.num_tokens, (rows.shape, plan.num_tokens)
        layout = Layout(plan, plan.segments)
        for index, seg in enumerate(plan.segments):
            if index:
                m = maps[[f"scale {s}" for s in p["scales"][1:]].index(seg.name)][0]
                h, w = seg.grid
                layout.masks[index] = m[:h * k, :w * k].reshape(h, k, w, k).bool().all(3).all(1).cpu()
        return rows, layout

    def knob_values(self, height, width, budget, p):
        from ..mllm.tokens import block_grids

        low = block_grids(*self.input_size(height, width, p), p["scales"], p["patch_size"], p["k"])[0]
        blocks = max(budget - low[0] * low[1], 0)
        return [p["k"] ** 2 * n for n in range(max(blocks - 40, 0), blocks + 41)]

