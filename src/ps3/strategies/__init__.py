"""Every high-resolution strategy on one backbone, with exact token counts before anything runs
(design §7).

``plan(name, height, width, **params)`` describes, without running anything, what a strategy
does to an image of that size: the resize / crop / pad of every view, the tile grid, the backbone
passes and the exact number of rows the LLM receives (``num_tokens``, learned separator rows
included) and of text tokens the original wraps around them (``num_text_tokens``).
``encode(plan, backbone, image)`` runs it on any backbone ``(B, 3, h, w) → (B, N, C)`` and returns
exactly ``plan.num_tokens`` rows and their :class:`Layout`; both read the same plan, so the count
is right by construction.

Strategies (each original's parameter names and defaults):

========================  =========================================================================
``"s2"``                  LLaVA-1.5-S2: 336/672/1008 px, 336 px pieces, 576 tokens, 14 passes
``"dynamic_s2"``          NVILA: 448/896/1344 px, top scale tiled to the aspect ratio, ``max_tiles`` 12
``"internvl_tiling"``     InternVL ``dynamic_preprocess``: 448 px tiles, ``max_num`` 12, thumbnail
``"anyres"``              LLaVA-NeXT: pinpoint canvas in 336 px tiles, base image, unpadding, newlines
``"qwen2_vl"``            Qwen2-VL ``smart_resize``: native resolution up to ``max_pixels``
``"ixc_hd"``              InternLM-XComposer2-4KHD: ``hd_num`` 25 tiles of 336 px, global view, separators
``"ps3"``                 this library's encoder (:mod:`ps3.strategies.ps3`; loads the encoder on first use)
========================  =========================================================================

Images for ``encode`` are (3, H, W) floats in [0, 1] at their original size (padding uses the
original's colour in those units); the backbone normalises as it needs. Learned separator rows
(LLaVA-NeXT's ``image_newline``, InternLM-XComposer's ``sub_GN`` and ``glb_GN``) come from
``separators={name: (C,) tensor}``, e.g. ``nn.Parameter`` s the caller trains; a name not given
is a row of zeros.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import Layout, Plan, Segment, Strategy, View
from .native import Qwen2VL
from .ps3 import PS3Strategy
from .s2style import S2, DynamicS2
from .tiling import IXCHD, AnyRes, InternVLTiling

__all__ = ["Layout", "Plan", "Segment", "Strategy", "View", "encode", "get", "knob_for_budget", "load_image_tensor",
           "names", "plan", "register"]

_STRATEGIES: dict[str, Strategy] = {s.name: s for s in (S2(), DynamicS2(), InternVLTiling(), AnyRes(), Qwen2VL(),
                                                        IXCHD(), PS3Strategy())}
ORDER = ("s2", "dynamic_s2", "internvl_tiling", "anyres", "qwen2_vl", "ixc_hd", "ps3")


def load_image_tensor(source: Any) -> torch.Tensor:
    """An image file, bytes or PIL image as the (3, H, W) float32 tensor in [0, 1] ``encode`` takes
    (upright, RGB: :func:`ps3.images.load_image`, which returns the PIL image)."""
    import numpy as np

    from ..images import load_image as load_rgb

    rgb = np.asarray(load_rgb(source), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def load_image(source: Any) -> torch.Tensor:
    """Deprecated name of :func:`load_image_tensor` (:func:`ps3.images.load_image` returns a PIL image)."""
    warnings.warn("ps3.strategies.load_image is renamed load_image_tensor", DeprecationWarning, stacklevel=2)
    return load_image_tensor(source)


def register(strategy: Strategy) -> Strategy:
    """Make ``strategy`` available to :func:`plan` by its ``name``."""
    _STRATEGIES[strategy.name] = strategy
    return strategy


def names() -> tuple[str, ...]:
    return ORDER + tuple(n for n in _STRATEGIES if n not in ORDER)


def get(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; pass one of {', '.join(names())}")
    return _STRATEGIES[name]


def plan(name: str, height: int, width: int, **params: Any) -> Plan:
    """What strategy ``name`` does to a ``height`` × ``width`` image, computed without running
    anything; ``params`` override its defaults (``get(name).defaults``)."""
    return get(name).plan(height, width, **params)


def encode(plan: Plan, backbone: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
           separators: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Layout]:
    """Run ``plan`` on ``image`` ((3, H, W) in [0, 1], the size planned) with ``backbone``:
    (``plan.num_tokens``, C') rows in the plan's segment order, and their layout. ``backbone`` maps
    (B, 3, h, w) to (B, h/p · w/p, C) with p the plan's ``patch_size`` (for ``"ps3"``: a PS3 vision
    model)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a ps3.strategies.Plan from plan(name, height, width), got {type(plan).__name__}")
    return get(plan.strategy).encode(plan, backbone, image, separators)


def knob_for_budget(name: str, height: int, width: int, budget: int, **params: Any) -> tuple[str | None, Any]:
    """(knob name, value) that brings strategy ``name`` closest to ``budget`` tokens on this image
    size (ties: fewer tokens); (None, None) for a strategy without a budget knob."""
    strategy = get(name)
    if strategy.knob is None:
        return None, None
    tried = []
    for value in strategy.knob_values(height, width, budget, {**strategy.defaults, **params}):
        try:
            tried.append((value, strategy.plan(height, width, **{**params, strategy.knob: value}).num_tokens))
        except ValueError:
            continue  # a value the image size does not allow
    if not tried:
        return strategy.knob, strategy.defaults[strategy.knob]
    return strategy.knob, min(tried, key=lambda vt: (abs(vt[1] - budget), vt[1]))[0]
