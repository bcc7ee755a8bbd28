"""PS3 encoding for an LLM: high-res cells selected in whole k×k blocks.

The projector merges k×k cells into one LLM token and keeps a block only when all its cells
were encoded. Selecting cell by cell (as plain PS3 calls do) leaves partly selected blocks whose
encoded tokens are then thrown away, and makes the LLM token count depend on the image content.
Here each look ranks the **blocks** of every scale by their mean selection probability and takes
the top ones, so nothing encoded is wasted and :func:`ps3.mllm.count_llm_tokens` is exact.

The low-res pass can be given (``low_res=``, from an earlier pass over the same images, e.g. the
first pass of the two-pass LLM helper): the low-res trunk then does not run again; the high-res
looks attend to its cached keys/values.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..selection import select_cells
from ..vision import LowResPass, PS3VisionOutput
from .tokens import _check_k, block_grids, plan_block_looks


def encoder_of(vision_model: Any):
    """The PS3VisionEncoder of a PS3VisionModel / PS3Model, or the encoder itself."""
    encoder = getattr(vision_model, "vision_model", vision_model)
    if not hasattr(encoder, "trunk") or not hasattr(encoder, "ps3_scales"):
        raise TypeError(f"expected a PS3 vision model or encoder, got {type(vision_model).__name__}")
    return encoder


def encode_low_res(vision_model: Any, pixel_values: torch.Tensor) -> LowResPass:
    """Run the low-res trunk pass once, keeping what selection and the high-res looks need."""
    return encoder_of(vision_model).encode_low_res(pixel_values, keep_kv=True)


def _block_probs(probs: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Mean probability of every full k×k block: (B, h//k, w//k) per scale."""
    out = []
    for p in probs:
        h, w = p.shape[-2:]
        full = p.detach()[:, :h // k * k, :w // k * k].float().unsqueeze(1)
        out.append(F.avg_pool2d(full, k).squeeze(1) if k > 1 and full.numel() else full[:, 0, ::k, ::k])
    return out


def _cells_of(blocks: torch.Tensor, size: tuple[int, int], k: int) -> torch.Tensor:
    """Block map (B, h//k, w//k) → cell map (B, h, w) (edge cells outside full blocks stay off)."""
    cells = blocks.repeat_interleave(k, 1).repeat_interleave(k, 2)
    return F.pad(cells, (0, size[1] - cells.shape[2], 0, size[0] - cells.shape[1]))


def _per_sample(value: Any, batch: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {batch}: pass one per image or one value")
        return [int(v) if isinstance(v, torch.Tensor) else v for v in value]
    return [value] * batch


def block_looks(probs: Sequence[torch.Tensor], plans: Sequence[Sequence[Sequence[int]]], k: int) -> list[list[torch.Tensor]]:
    """Cell maps of every look: looks[j][scale] (B, h, w) bool. ``plans[b][j][scale]`` = blocks."""
    B = probs[0].shape[0]
    scored = _block_probs(probs, k)
    taken = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scored]
    looks = []
    for j in range(len(plans[0])):
        budgets = [[plans[b][j][i] for b in range(B)] for i in range(len(scored))]
        new = select_cells(scored, taken, budgets)
        taken = [t | n for t, n in zip(taken, new)]
        looks.append([_cells_of(n, tuple(p.shape[-2:]), k) for n, p in zip(new, probs)])
    return looks


def encode_for_llm(vision_model: Any, pixel_values: torch.Tensor, *, prompt: torch.Tensor | None = None,
                   low_res: LowResPass | None = None, k: int = 2, budgets: Sequence[int] | None = None,
                   num_looks: int | str = 1, only_select_first_n_scale=None,
                   gt_selection_maps: torch.Tensor | None = None, smooth_selection_prob: bool = False,
                   num_hidden_layers_to_return: int | None = None) -> PS3VisionOutput:
    """Encode a batch with block-aligned selection; the output has the layout of a PS3 call
    (low-res tokens, then the selected cells in canvas order; ``selection_maps`` the union).

    ``budgets``: cells per high-res scale and look (default: the model's per-scale budgets);
    ``only_select_first_n_scale``: an int or one per image (see :func:`ps3.mllm.first_n_scales_for_sizes`).
    """
    encoder = encoder_of(vision_model)
    k = _check_k(k)
    B, _, H, W = pixel_values.shape
    if low_res is None:
        low_res = encode_low_res(encoder, pixel_values)
    else:
        encoder._check_low_res(low_res, pixel_values, needs_kv=True)
    budgets = list(encoder.max_select_num_each_scale if budgets is None else budgets)
    _, grids = block_grids(H, W, encoder.ps3_scales, encoder.patch_size, k)
    firsts = _per_sample(only_select_first_n_scale, B, "only_select_first_n_scale")
    plans = [plan_block_looks(grids, budgets, k, num_looks, m) for m in firsts]
    keep = min(num_hidden_layers_to_return or encoder.num_hidden_layers_to_return or encoder.layers, encoder.layers)
    probs, bottomup, topdown = encoder._probs(low_res.selection_features, low_res.highres_selection_features,
                                              encoder.feature_sizes(H, W), prompt, gt_selection_maps,
                                              smooth_selection_prob)
    out = PS3VisionOutput(pooled_output=low_res.pooled_output, selection_probs=probs,
                          bottomup_selection_probs=bottomup, topdown_selection_probs=topdown)
    low_hidden = low_res.hidden_states[encoder.layers - keep:]
    _check_equal_looks(plans)
    if not plans[0]:
        out.hidden_states, out.last_hidden_state = tuple(low_hidden), low_hidden[-1]
        return out
    looks = block_looks(probs, plans, k)
    out.selection_maps = [torch.stack([look[i] for look in looks]).any(0).long() for i in range(len(grids))]
    sizes = encoder.feature_sizes(H, W)[1:]
    per_look, orders = [], []
    for j, look in enumerate(looks):
        canvas = torch.cat([m.flatten(1) for m in look], dim=1)
        count = k * k * sum(plans[0][j])
        order = torch.argsort((~canvas).to(torch.int8), dim=1, stable=True)[:, :count]
        cells = [[k * k * plans[b][j][i] for b in range(B)] for i in range(len(grids))]
        tokens = encoder._embed_cells(pixel_values, sizes, cells, order)
        per_look.append(encoder._blocks(tokens, kv_cache=low_res.kv_cache, keep_hidden=keep)[1])
        orders.append(order)
    back = torch.cat(orders, dim=1).argsort(dim=1).unsqueeze(-1)
    hidden = []
    for layer in range(keep):
        high = torch.cat([h[layer] for h in per_look], dim=1)
        hidden.append(torch.cat([low_hidden[layer], high.gather(1, back.expand(-1, -1, high.shape[-1]))], dim=1))
    out.hidden_states, out.last_hidden_state = tuple(hidden), hidden[-1]
    return out


def _check_equal_looks(plans: Sequence[Sequence[Sequence[int]]]) -> None:
    """Images of one call must encode equal token counts per look (their split over the scales
    may differ): the looks of a batch run as one padded-free trunk batch."""
    totals = [[sum(look) for look in plan] for plan in plans]
    if any(t != totals[0] for t in totals):
        raise ValueError(f"the images of this batch select different block counts per look ({totals}): "
                         "only_select_first_n_scale values whose looks differ in size must be encoded separately")
