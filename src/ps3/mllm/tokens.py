"""How many LLM tokens an image becomes, known before anything runs.

The MLLM path selects high-res cells in whole k×k **blocks** (see :mod:`ps3.mllm.block_looks`), so the
projector's all-cells-selected rule keeps every encoded block and the count below is exact: it
depends only on the image size, the per-scale budgets, the look count, the skipped scales and k,
never on the image content. Blocks that would overhang the grid's bottom/right edge (when k does
not divide a high-res grid) are never selected; the low-res grid is zero-padded to a multiple
of k and always kept whole (27×27 → 14×14 for k = 2).

Budgets are given in high-res **cells** per look and scale, as PS3 configs state them
(``max_select_num_each_scale``, e.g. 85 + 340 + 2125 for 4K); a scale takes ``budget // k²``
blocks per look. ``only_select_first_n_scale = m`` keeps the first m high-res scales and hands the
blocks of the skipped ones to the kept ones in proportion (so a look's total stays the same); a
scale with fewer free blocks than its share passes the rest to the next kept scale, and what is
left past the last one goes to the earliest kept scale that still has room.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import PS3VisionConfig
from ..encoder.selection import TokenCount, default_budgets, scale_feature_sizes
from ..encoder.vit import arch_from_config

Size = tuple[int, int]


@dataclass(frozen=True)
class LLMTokenCount(TokenCount):
    """LLM tokens of one image: merged low-res tokens, merged tokens per high-res scale, looks."""


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k not in (1, 2, 3):
        raise ValueError(f"k (the merge size) must be 1, 2 or 3, got {k!r}")
    return k


def vision_geometry(model_or_config: Any) -> tuple[list[int], int, list[int]]:
    """(ps3_scales, patch size, default per-scale cell budgets) of a vision model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "vision_config", config)
    if not isinstance(config, PS3VisionConfig):
        raise TypeError("pass a PS3VisionModel, PS3VisionEncoder, PS3Model or their config, "
                        f"got {type(model_or_config).__name__}")
    scales = list(config.ps3_scales)
    patch = arch_from_config(config.model_name, config.vit).patch_size
    return scales, patch, default_budgets(config.max_select_num, scales, config.max_select_num_each_scale)


def block_grids(height: int, width: int, scales: Sequence[int], patch_size: int, k: int) -> tuple[Size, list[Size]]:
    """(merged low-res grid, selectable block grid per high-res scale) for an input image size."""
    sizes = scale_feature_sizes(height, width, scales, patch_size)
    (h0, w0), high = sizes[0], sizes[1:]
    return (math.ceil(h0 / k), math.ceil(w0 / k)), [(h // k, w // k) for h, w in high]


def renamed(old: str, new: str, old_value, new_value, default=None):
    """The value of a keyword argument that was renamed from ``old`` to ``new``: the new name's, or
    the old name's with a DeprecationWarning (both at once: TypeError); ``default`` if neither."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"pass {new} only ({old} is its deprecated name), not both")
    warnings.warn(f"{old} is deprecated: pass {new} (the same value)", DeprecationWarning, stacklevel=3)
    return old_value


def check_budgets(budgets: Sequence[int], n_highres: int, scales: Sequence[int]) -> list[int]:
    """``max_select_num_each_scale`` of the MLLM path: one non-negative int (cells per look) per
    high-res scale of the model (``scales``: its ``ps3_scales``)."""
    values = list(budgets) if isinstance(budgets, (list, tuple)) else None
    if values is None or len(values) != n_highres or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in values):
        raise ValueError(f"max_select_num_each_scale must give one cell budget (an int >= 0) per high-res scale of "
                         f"this model (ps3_scales={list(scales)}: {n_highres} high-res), got {budgets!r}")
    return values


def look_block_budgets(budgets: Sequence[int], k: int, first_n: int | None) -> list[int]:
    """Blocks one look takes per high-res scale before shortfalls (see the module docstring)."""
    blocks = [int(b) // (k * k) for b in budgets]
    if first_n is None or first_n >= len(blocks):
        return blocks
    total, kept = sum(blocks), sum(blocks[:first_n])
    out = [int(b * total / kept) if kept else 0 for b in blocks[:first_n]]
    out[-1] += total - sum(out)
    return out + [0] * (len(blocks) - first_n)


def plan_block_looks(grids: Sequence[Size], budgets: Sequence[int], k: int, num_looks: int | str = 1,
                     first_n: int | None = None, encoded: Sequence[int] | None = None) -> list[list[int]]:
    """Blocks taken per look and per high-res scale for one image: plan[look][scale].
    ``encoded[i]``: blocks of scale i taken before this call (look closer); they are not planned again."""
    n = len(grids)
    if first_n is not None and (isinstance(first_n, bool) or not isinstance(first_n, int) or not 1 <= first_n <= n):
        raise ValueError(f"only_select_first_n_scale must be an int in [1, {n}] or None, got {first_n!r}")
    if len(budgets) != n:
        raise ValueError(f"max_select_num_each_scale must give one cell budget per high-res scale ({n}), "
                         f"got {list(budgets)}")
    kept = n if first_n is None else first_n
    remaining = [h * w - (int(encoded[i]) if encoded is not None else 0) if i < kept else 0
                 for i, (h, w) in enumerate(grids)]
    base = look_block_budgets(budgets, k, first_n)
    step = sum(base)
    if num_looks == "all":
        looks = math.ceil(sum(remaining) / step) if step else 0
    elif isinstance(num_looks, bool) or not isinstance(num_looks, int) or num_looks < 0:
        raise ValueError(f"num_look_close must be a non-negative int or 'all', got {num_looks!r}")
    else:
        looks = num_looks
    plan = []
    for _ in range(looks):
        take, carry = [], 0
        for i in range(n):
            want = base[i] + carry
            take.append(min(want, remaining[i]))
            carry = want - take[-1]
        for i in range(n):  # what no later scale could take goes to the earliest with room
            extra = min(carry, remaining[i] - take[i])
            take[i] += extra
            carry -= extra
        if not sum(take):
            break  # nothing left to encode: later looks would be empty
        remaining = [r - t for r, t in zip(remaining, take)]
        plan.append(take)
    return plan


def count_llm_tokens(model_or_config: Any, height: int, width: int, *,
                     max_select_num_each_scale: Sequence[int] | None = None, k: int = 2,
                     num_look_close: int | str | None = None, only_select_first_n_scale: int | None = None,
                     budgets: Sequence[int] | None = None, num_looks: int | str | None = None) -> LLMTokenCount:
    """Exact LLM tokens :func:`ps3.mllm.encode_for_llm` + :class:`PS3Projector` give a height × width
    image: ``ceil(h_0/k)·ceil(w_0/k)`` low-res tokens plus the blocks of every look.

    ``max_select_num_each_scale``: cells per high-res scale per look (default: the model's);
    ``num_look_close``: an int (0 = low-res only) or "all" (default 1). ``budgets`` /
    ``num_looks``: their deprecated names.
    """
    k = _check_k(k)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    scales, patch, default = vision_geometry(model_or_config)
    cells = check_budgets(renamed("budgets", "max_select_num_each_scale", budgets, max_select_num_each_scale, default),
                          len(scales) - 1, scales)
    looks = renamed("num_looks", "num_look_close", num_looks, num_look_close, 1)
    low, grids = block_grids(height, width, scales, patch, k)
    plan = plan_block_looks(grids, cells, k, looks, only_select_first_n_scale)
    per_scale = [sum(look[i] for look in plan) for i in range(len(grids))]
    return LLMTokenCount(low[0] * low[1], per_scale, len(plan))
