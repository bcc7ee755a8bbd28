"""Every high-resolution strategy as an MLLM front-end on one PS3 model, behind one projector type.

A front-end turns an image into LLM input embeddings: the frozen vision part makes **rows**
(what :func:`ps3.strategies.encode` returns for the strategy: already merged as the original
merges, e.g. InternVL's 2×2 pixel shuffle, PS3's k×k blocks), then a trainable projector of
:class:`ps3.mllm.PS3Projector`'s type (LayerNorm → Linear → GELU → Linear to the LLM width)
maps each row to one LLM token, so the LLM sees exactly ``plan.num_tokens`` tokens.

Front-ends (``name``):

* ``low_res``: PS3's low-res grid merged k×k (PS3 with no look);
* ``ps3_bottom_up``: PS3 with one bottom-up look of ``num_token_look_close`` cells, block-aligned;
* ``ps3_top_down``: PS3 steered by the LLM (:class:`ps3.mllm.TwoPassPS3`); not a row maker: its
  selection depends on the question, so :func:`top_down` builds it; its count is the ``ps3``
  plan's at the same knob value;
* ``s2``, ``dynamic_s2``, ``internvl_tiling``, ``anyres``, ``qwen2_vl`` (and ``ixc_hd``): the
  strategies of :mod:`ps3.strategies` on the PS3 model's trunk, their geometry scaled from the
  originals' to the model's (:func:`geometry`): tiles of the low-res scale ``s_0`` (the trunk's
  native size, as 336/448 px is the originals'), scales the model's ``ps3_scales`` (S2:
  1×, 2×, 4×, 8× here, 1×, 2×, 3× in LLaVA-S2).

Every strategy is at one **budget knob** value; :func:`knob_for_tokens` picks the value whose
plan comes closest to a number of LLM tokens (ties: fewer), as ``ps3 compare --budget`` does;
the knob is the strategy's own (``resize_output_to_idx``, ``max_num``, ``grid_pinpoints``,
``max_pixels``, ``num_token_look_close``) except for Dynamic-S2, whose ``max_tiles`` only fits
the top scale to the aspect ratio: its budget is the scales it stops at (``s2_scales``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import strategies
from ..strategies.base import Plan
from .block_looks import encoder_of

__all__ = ["FRONTENDS", "RowFrontend", "RowProjector", "geometry", "knob_for_tokens", "knob_values", "plan_for",
           "ps3_budgets", "top_down", "trunk_backbone"]

FRONTENDS = ("low_res", "ps3_bottom_up", "ps3_top_down", "s2", "dynamic_s2", "internvl_tiling", "anyres",
             "qwen2_vl")


def geometry(name: str, vision: Any) -> dict[str, Any]:
    """Strategy parameters that tie ``name`` to this PS3 model (without its budget knob)."""
    encoder = encoder_of(vision)
    scales, patch = tuple(encoder.ps3_scales), encoder.patch_size
    s0, top = scales[0], scales[-1]
    if name in ("low_res", "ps3_bottom_up", "ps3_top_down", "ps3"):
        from ..strategies.ps3 import params_for

        return {**params_for(encoder), "num_looks": 0 if name == "low_res" else 1}
    if name == "s2":
        return {"s2_scales": scales, "max_split_size": s0, "patch_size": patch}
    if name == "dynamic_s2":
        return {"s2_scales": scales, "image_size": s0, "patch_size": patch, "max_tiles": (top // s0) ** 2}
    if name == "internvl_tiling":
        return {"image_size": s0, "patch_size": patch}
    if name == "anyres":
        return {"image_size": s0, "patch_size": patch, "grid_pinpoints": f"(1x1),...,({top // s0}x{top // s0})"}
    if name == "qwen2_vl":
        return {"patch_size": patch, "merge_size": 2, "min_pixels": (2 * patch) ** 2, "max_pixels": top * top}
    if name == "ixc_hd":
        return {"image_size": s0, "patch_size": patch}
    raise ValueError(f"unknown front-end {name!r}; pass one of {', '.join(FRONTENDS)}")


def _strategy(name: str) -> str:
    return "ps3" if name in ("low_res", "ps3_bottom_up", "ps3_top_down") else name


def knob_values(name: str, vision: Any) -> tuple[str | None, list[Any]]:
    """(knob, the values worth trying) of a front-end on this model, from none to the whole top scale."""
    encoder = encoder_of(vision)
    s0, top, patch = encoder.ps3_scales[0], encoder.ps3_scales[-1], encoder.patch_size
    tiles = (top // s0) ** 2
    if name == "low_res":
        return None, []
    if name in ("ps3_bottom_up", "ps3_top_down"):
        cells = sum((s // patch) ** 2 for s in encoder.ps3_scales[1:])
        return "num_token_look_close", list(range(4, cells + 1, 4))
    if name == "s2":
        return "resize_output_to_idx", list(range(len(encoder.ps3_scales)))
    if name == "dynamic_s2":  # max_tiles only shapes the top scale to the aspect: the scales set the budget
        return "s2_scales", [tuple(encoder.ps3_scales[:n]) for n in range(2, len(encoder.ps3_scales) + 1)]
    if name in ("internvl_tiling",):
        return "max_num", list(range(1, tiles + 1))
    if name == "ixc_hd":
        return "hd_num", list(range(1, tiles + 1))
    if name == "anyres":
        return "grid_pinpoints", [f"(1x1),...,({n}x{n})" for n in range(1, top // s0 + 1)]
    if name == "qwen2_vl":
        factor = 2 * patch
        return "max_pixels", [n * n * factor * factor for n in range(1, top // factor + 1)]
    raise ValueError(f"unknown front-end {name!r}; pass one of {', '.join(FRONTENDS)}")


def plan_for(name: str, vision: Any, height: int, width: int, knob_value: Any = None) -> Plan:
    """The plan of front-end ``name`` on this model for a ``height`` × ``width`` image."""
    params = geometry(name, vision)
    knob, _ = knob_values(name, vision)
    if knob is not None and knob_value is not None:
        params[knob] = knob_value
        if knob == "s2_scales":  # Dynamic-S2: tiles of the top scale it stops at (the aspect picks the grid)
            params["max_tiles"] = (knob_value[-1] // knob_value[0]) ** 2
    return strategies.plan(_strategy(name), height, width, **params)


def knob_for_tokens(name: str, vision: Any, height: int, width: int, tokens: int) -> Any:
    """The knob value whose plan gives the LLM closest to ``tokens`` tokens (ties: fewer); None
    for a front-end without a knob."""
    knob, values = knob_values(name, vision)
    if knob is None:
        return None
    tried = []
    for value in values:
        try:
            tried.append((value, plan_for(name, vision, height, width, value).num_tokens))
        except ValueError:
            continue  # a value this image size does not allow
    return min(tried, key=lambda vt: (abs(vt[1] - tokens), vt[1]))[0]


def ps3_budgets(vision: Any, knob_value: int | None) -> list[int]:
    """High-res cells per scale of one look at ``num_token_look_close = knob_value``, split as the
    ``ps3`` plan splits it (so a :class:`ps3.mllm.TwoPassPS3` with these budgets gives the LLM
    the plan's token count)."""
    from ..strategies.ps3 import _budgets

    return _budgets({**geometry("ps3_top_down", vision), "num_token_look_close": knob_value})


def top_down(vision: nn.Module, llm: nn.Module, image_token_id: int, knob_value: int | None,
             **kwargs: Any) -> nn.Module:
    """``ps3_top_down`` at one knob value: a :class:`ps3.mllm.TwoPassPS3` (one look, k = 2) whose
    LLM token count is the ``ps3`` plan's."""
    from .topdown import TwoPassPS3

    return TwoPassPS3(vision, llm, image_token_id=image_token_id,
                      max_select_num_each_scale=ps3_budgets(vision, knob_value), num_look_close=1, k=2, **kwargs)


def trunk_backbone(vision: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PS3 model's ViT as a plain backbone: (B, 3, h, w) in [0, 1] → (B, h/p · w/p, C)."""
    trunk = encoder_of(vision).trunk
    dtype = next(trunk.parameters()).dtype

    def backbone(x: torch.Tensor) -> torch.Tensor:
        return trunk.forward_blocks(trunk.embed((x * 2 - 1).to(dtype)))[0]  # mean = std = 0.5
    return backbone


class RowProjector(nn.Module):
    """LayerNorm(in) → Linear(in, D) → GELU → Linear(D, D): :class:`ps3.mllm.PS3Projector`'s
    layers, for rows a strategy has already merged."""

    def __init__(self, in_width: int, llm_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_width)
        self.fc1 = nn.Linear(in_width, llm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(rows.to(self.fc1.weight.dtype)))))


class RowFrontend(nn.Module):
    """A strategy on a frozen PS3 model at one knob value: :meth:`rows` (no gradient: the vision
    part is frozen, so rows can be computed once per image) and :attr:`projector` (trained)."""

    def __init__(self, name: str, vision: nn.Module, llm_width: int, height: int, width: int,
                 knob_value: Any = None):
        super().__init__()
        if name == "ps3_top_down":
            raise ValueError("ps3_top_down is steered by the LLM: build it with ps3.mllm.TwoPassPS3 (its selection "
                             "depends on the question, so it has no fixed rows)")
        self.name, self.size, self.knob_value = name, (height, width), knob_value
        self.plan = plan_for(name, vision, height, width, knob_value)
        self.vision = [vision]  # not a submodule: frozen and shared by every front-end
        self.projector = RowProjector(self.row_width(), llm_width)

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    def row_width(self) -> int:
        """Width of one row: the trunk width times the channels the strategy stacks in a row."""
        with torch.no_grad():
            probe = self._rows(torch.zeros(3, *self.size))
        return probe.shape[-1]

    def _rows(self, image: torch.Tensor) -> torch.Tensor:
        vision = self.vision[0]
        backbone = vision if self.plan.strategy == "ps3" else trunk_backbone(vision)
        rows, _ = strategies.encode(self.plan, backbone, image)
        return rows

    @torch.no_grad()
    def rows(self, image: torch.Tensor) -> torch.Tensor:
        """(num_tokens, row width) rows of one (3, H, W) image in [0, 1] of the planned size."""
        return self._rows(image)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens, row width) rows → (B, num_tokens, LLM width) embeddings."""
        return self.projector(rows)
