"""Selection arithmetic for PS3: image/feature sizes per scale, token budgets, look planning and
top-k cell selection (design §3.1, §3.8, §3.9).

Everything that decides *how many* cells a look takes is pure Python on the host: the counts do
not depend on the image content, only on the config and the call's arguments, so they are known
before the model runs (``count_tokens``) and the forward pass needs no device→host syncs. Only
*which* cells are taken depends on the data (``select_cells``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

Size = tuple[int, int]


def scale_image_size(height: int, width: int, scales: Sequence[int], patch_size: int, index: int) -> Size:
    """Pixel size of the input resized for scale ``index`` (scale 0 is always the square s_0)."""
    s0 = scales[0]
    if index == 0:
        return (s0, s0)
    zoom = scales[index] // s0
    if height >= width:
        return (s0 * zoom, max(int(s0 / height * width) // patch_size, 1) * patch_size * zoom)
    return (max(int(s0 / width * height) // patch_size, 1) * patch_size * zoom, s0 * zoom)


def scale_feature_sizes(height: int, width: int, scales: Sequence[int], patch_size: int) -> list[Size]:
    """Token grid (h_i, w_i) of every scale for an input of height × width pixels."""
    out = []
    for i in range(len(scales)):
        h, w = scale_image_size(height, width, scales, patch_size, i)
        out.append((max(h // patch_size, 1), max(w // patch_size, 1)))
    return out


def default_budgets(max_select_num: int, scales: Sequence[int], each_scale: Sequence[int] | None = None) -> list[int]:
    """Per high-res scale token budget of one look: proportional to pixel count, remainder last."""
    if each_scale is not None:
        return [int(b) for b in each_scale]
    pixels = [s * s for s in scales]
    budgets = [int(max_select_num * pixels[i] / sum(pixels[1:])) for i in range(1, len(scales))]
    budgets[-1] += max_select_num - sum(budgets)
    return budgets


def look_budgets(max_budgets: Sequence[int], remaining: Sequence[int], num_tokens: int | None = None,
                 first_n_scales: int | None = None) -> list[int]:
    """Cells one look takes at each scale for one sample.

    ``num_tokens`` shrinks the look proportionally; ``first_n_scales`` = m puts the budget on the
    first m scales (1 token on the others, the last scale topped up so the total stays Σ max —
    kept as published for compatibility); a scale with fewer cells left than its budget takes
    them all and passes the shortfall to the next scale.
    """
    budgets = list(max_budgets)
    total = sum(max_budgets)
    if num_tokens is not None:
        budgets = [int(b * num_tokens / total) for b in max_budgets]
        budgets[-1] += num_tokens - sum(budgets)
    if first_n_scales is not None:
        head = sum(budgets[:first_n_scales])
        now = sum(budgets)
        budgets = [int(b / head * now) if i < first_n_scales else 1 for i, b in enumerate(budgets)]
        budgets[-1] += total - sum(budgets)
    for i in range(len(budgets)):
        if remaining[i] < budgets[i]:
            if i < len(budgets) - 1:
                budgets[i + 1] += budgets[i] - remaining[i]
            budgets[i] = remaining[i]
    return budgets


@dataclass(frozen=True)
class LookPlan:
    """Per look, per high-res scale, the number of cells each sample takes: budgets[look][scale][b]."""

    budgets: list[list[list[int]]]

    @property
    def num_looks(self) -> int:
        return len(self.budgets)

    def tokens_per_look(self) -> list[list[int]]:
        """[look][sample] → tokens in that look."""
        return [[sum(scale[b] for scale in look) for b in range(len(look[0]))] for look in self.budgets]

    def tokens_per_scale(self, sample: int = 0) -> list[int]:
        n_scales = len(self.budgets[0]) if self.budgets else 0
        return [sum(look[i][sample] for look in self.budgets) for i in range(n_scales)]


def _check_first_n(first_n: Sequence[int] | None, n_highres: int) -> None:
    if first_n is None:
        return
    for m in first_n:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n_highres:
            raise ValueError(f"only_select_first_n_scale must be an int in [1, {n_highres}] (or one per sample), got {m!r}")


def _first_n_per_sample(only_select_first_n_scale, batch_size: int, n_highres: int) -> list[int] | None:
    if isinstance(only_select_first_n_scale, bool):
        raise TypeError("only_select_first_n_scale must be an int or a sequence of ints, not a bool")
    if isinstance(only_select_first_n_scale, int):
        first_n: list[int] | None = [only_select_first_n_scale] * batch_size
    elif only_select_first_n_scale is None:
        first_n = None
    else:
        first_n = [int(m) if isinstance(m, torch.Tensor) else m for m in only_select_first_n_scale]
        if len(first_n) != batch_size:
            raise ValueError(f"only_select_first_n_scale has {len(first_n)} entries for a batch of {batch_size}")
    _check_first_n(first_n, n_highres)
    return first_n


@dataclass(frozen=True)
class _LookCount:
    looks: int
    first_tokens: int | None = None  # tokens of the first look, when it is shrunk
    last_tokens: int | None = None  # tokens of the last look, when it is shrunk
    until_done: bool = False  # "all": continue until every covered cell is taken


def check_look_option(name: str, value) -> None:
    """``num_look_close`` / ``num_token_look_close`` of one image: None, an int >= 0 or "all"."""
    if value is None or (isinstance(value, str) and value == "all"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or 'all', got {value!r}")


def _look_count(num_look_close, num_token_look_close, total: int, step: int) -> _LookCount:
    """How many looks (design §3.9), and the token counts of shrunk first/last looks."""
    check_look_option("num_look_close", num_look_close)
    check_look_option("num_token_look_close", num_token_look_close)
    if num_look_close == 0 or num_token_look_close == 0:
        return _LookCount(0)
    first_tokens = None
    if num_look_close is not None and isinstance(num_token_look_close, int) and num_token_look_close <= step:
        first_tokens = num_token_look_close  # both given: upstream shrinks the first look only
    if num_look_close == "all" or num_token_look_close == "all":
        return _LookCount(math.ceil(total / step), first_tokens, until_done=True)
    if num_look_close is not None:
        return _LookCount(min(num_look_close, math.ceil(total / step)), first_tokens)
    if num_token_look_close is not None:
        tokens = min(num_token_look_close, total)
        return _LookCount(math.ceil(tokens / step), tokens if tokens <= step else None, tokens % step or step)
    raise ValueError("pass num_look_close (an int >= 0 or 'all') or num_token_look_close (an int >= 0 or 'all')")


def _plan_samples(cells: Sequence[int], max_budgets: Sequence[int], count: _LookCount, first_n: int | None,
                  covered: int) -> list[list[int]]:
    """Per look, the cells each scale takes for samples sharing ``first_n``."""
    step = sum(max_budgets)
    remaining = list(cells)
    plan: list[list[int]] = []
    for j in range(count.looks):
        tokens = count.first_tokens if j == 0 else (count.last_tokens if j == count.looks - 1 else None)
        b = look_budgets(max_budgets, remaining, tokens, first_n)
        remaining = [r - n for r, n in zip(remaining, b)]
        plan.append(b)
    # Only where the looks above leave cells (budgets that do not divide the grids): more
    # looks, each giving a budget lost past the last scale to the earliest scale with cells.
    while count.until_done and sum(remaining[:covered if first_n is None else first_n]) > 0:
        b = look_budgets(max_budgets, remaining, None, first_n)
        lost = step - sum(b)
        for i in range(len(max_budgets)):
            extra = min(lost, remaining[i] - b[i])
            if extra > 0:
                b[i] += extra
                lost -= extra
        if sum(b) == 0:
            break
        remaining = [r - n for r, n in zip(remaining, b)]
        plan.append(b)
    return plan


def plan_looks(highres_sizes: Sequence[Size], max_budgets: Sequence[int], batch_size: int,
               num_look_close: int | str | None = None, num_token_look_close: int | str | None = None,
               only_select_first_n_scale: int | Sequence[int] | None = None,
               pretraining: bool = False, encoded: Sequence[Sequence[int]] | None = None) -> LookPlan:
    """How many looks a call makes and how many cells each takes per scale and sample (design §3.9).

    ``"all"`` encodes every high-res cell (of the first m scales with ``only_select_first_n_scale``)
    exactly once. Upstream stops after ceil(total / Σb) looks, which misses cells when the
    per-scale budgets do not divide the grids; here looks continue until nothing is left, and a
    budget lost past the last scale is given to the earliest scale that still has cells. On the
    published configs both give the same looks.

    ``encoded[b][i]``: cells of scale i that sample b had encoded before this call (look closer,
    ``old_selection_maps``); the looks then plan over the cells left, as later looks of one call do.
    """
    n_highres = len(max_budgets)
    cells = [h * w for h, w in highres_sizes]
    step = sum(max_budgets)
    first_n = _first_n_per_sample(only_select_first_n_scale, batch_size, n_highres)
    covered = max(first_n) if first_n is not None else n_highres
    if pretraining:
        tokens = num_token_look_close if isinstance(num_token_look_close, int) and num_token_look_close <= step else None
        b = look_budgets(max_budgets, cells, tokens)
        return LookPlan([[[b[i]] * batch_size for i in range(n_highres)]])
    if encoded is not None and len(encoded) != batch_size:
        raise ValueError(f"encoded needs one entry per sample ({batch_size}), got {len(encoded)}")
    left = [tuple(cells) if encoded is None else tuple(c - int(e) for c, e in zip(cells, encoded[b]))
            for b in range(batch_size)]
    samples = list(zip(first_n if first_n is not None else [None] * batch_size, left))
    per_group = {}
    for m, rest in dict.fromkeys(samples):
        count = _look_count(num_look_close, num_token_look_close, sum(rest[:covered]), step)
        per_group[m, rest] = _plan_samples(rest, max_budgets, count, m, covered) if count.looks else []
    n_looks = max(len(p) for p in per_group.values())
    if n_looks == 0:
        return LookPlan([])
    budgets = [[[0] * batch_size for _ in range(n_highres)] for _ in range(n_looks)]
    for r, key in enumerate(samples):
        for j, b in enumerate(per_group[key]):
            for i in range(n_highres):
                budgets[j][i][r] = b[i]
    return LookPlan(budgets)


def select_cells(probs: Sequence[torch.Tensor], taken: Sequence[torch.Tensor] | None,
                 budgets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """One look: per scale, the top-k cells of each sample's prob map among cells not yet taken.

    probs[i], taken[i]: (B, h_i, w_i); budgets[i][b] = k for sample b. Returns bool maps of the
    newly taken cells. Taken cells are set to -1 first (as upstream does). Ties at the boundary
    follow :func:`tie_rule`.
    """
    rule = tie_rule()
    out = []
    for i, prob in enumerate(probs):
        flat = prob.detach().flatten(1)
        if taken is not None:
            flat = torch.where(taken[i].flatten(1), torch.full_like(flat, -1.0), flat)
        out.append(top_cells(flat, budgets[i], rule).view_as(prob))
    return out


TIE_RULES = ("topk", "lowest_index")


def tie_rule() -> str:
    """How cells of equal probability at the top-k boundary are chosen (``PS3_TIE_RULE``):

    * ``topk`` (default): ``torch.topk`` over each sample's flattened map, as upstream selects;
      on a CPU this reproduces upstream's recorded choices (also which look a tied cell lands in,
      which changes its features), and it is deterministic for a given device and kernel, but the
      order among equal values is the kernel's: CUDA's differs from the CPU's.
    * ``lowest_index``: the lowest canvas index (row-major) first, on every device and dtype (the
      first k of a stable descending sort) — the same cells everywhere, at the price of differing
      from upstream inside ties.
    """
    rule = os.environ.get("PS3_TIE_RULE", "topk")
    if rule not in TIE_RULES:
        raise ValueError(f"PS3_TIE_RULE must be one of {', '.join(TIE_RULES)}, got {rule!r}")
    return rule


def top_cells(flat: torch.Tensor, ks: Sequence[int], rule: str = "topk") -> torch.Tensor:
    """(B, n) bool: the ``ks[b]`` largest values of each row ``flat[b]``, ties broken by ``rule``
    (see :func:`tie_rule`); no sort, no host sync."""
    if rule == "lowest_index":
        return _top_cells_lowest_index(flat, ks)
    new = torch.zeros_like(flat, dtype=torch.bool)
    for k in dict.fromkeys(ks):
        k = min(k, flat.shape[1])
        if k == 0:
            continue
        rows = [b for b, kb in enumerate(ks) if min(kb, flat.shape[1]) == k]
        if len(rows) == len(ks):
            new.scatter_(1, flat.topk(k, dim=1).indices, True)
        else:
            rows_t = torch.tensor(rows).to(flat.device, non_blocking=True)
            part = torch.zeros(len(rows), flat.shape[1], dtype=torch.bool, device=flat.device)
            new[rows_t] = part.scatter_(1, flat[rows_t].topk(k, dim=1).indices, True)
    return new


def _top_cells_lowest_index(flat: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Every cell above the k-th largest value, then the boundary value's cells in index order."""
    k_max = min(max(ks, default=0), flat.shape[1])
    if k_max == 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    k = torch.tensor(list(ks)).clamp(max=flat.shape[1]).to(flat.device, non_blocking=True).unsqueeze(1)
    boundary = flat.topk(k_max, dim=1).values.gather(1, (k - 1).clamp(min=0))  # the k-th largest value
    above = flat > boundary
    at = flat == boundary
    need = k - above.sum(1, keepdim=True)
    return (above | (at & (at.cumsum(1) <= need))) & (k > 0)


@dataclass(frozen=True)
class TokenCount:
    """Tokens a call returns per sample: the low-res grid, each high-res scale, and the total."""

    low_res: int
    per_scale: list[int]
    num_looks: int

    @property
    def total(self) -> int:
        return self.low_res + sum(self.per_scale)


# VILA-HD never skips a scale on models whose largest scale is at most this many pixels (1.5K models).
NEVER_SKIP_MAX_SCALE = 2000


def first_n_scales_for_sizes(sizes: Sequence, scales: Sequence[int]) -> list[int]:
    """Per-image ``only_select_first_n_scale`` by VILA-HD's rule (``ps3_dynamic_aspect_ratio``).

    With high-res scales s_1 < … < s_{S-1}, the last threshold is (s_{S-2} + s_{S-1}) / 2 (2646 px
    for 378/756/1512/3780). An image uses every high-res scale when its original long side is
    strictly greater than that threshold, or when the largest scale is at most 2000 px (1.5K models
    never skip); otherwise it uses all but the largest. A model with a single high-res scale
    always keeps it.

    ``sizes``: (height, width) pairs, image tensors (..., H, W) or PIL images. ``scales``: the
    model's ``ps3_scales``.
    """
    n_high = len(scales) - 1
    if n_high < 1:
        raise ValueError(f"scales needs a low-res and at least one high-res scale, got {list(scales)}")
    never_skip = n_high == 1 or scales[-1] <= NEVER_SKIP_MAX_SCALE
    threshold = (scales[-2] + scales[-1]) / 2
    out = []
    for size in sizes:
        if isinstance(size, torch.Tensor):
            height, width = size.shape[-2:]
        elif hasattr(size, "size") and not isinstance(size, (tuple, list)):
            width, height = size.size  # PIL: (width, height)
        else:
            height, width = size
        out.append(n_high if never_skip or max(height, width) > threshold else n_high - 1)
    return out
