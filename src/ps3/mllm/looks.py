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

from ..encoder.batching import encoded_counts, group_images, image_sizes, merge_group_maps, old_maps_of_group
from ..encoder.outputs import LowResPass, PS3VisionOutput
from ..encoder.selection import LookPlan, select_cells
from ..encoder.selection_features import apply_gt_and_smoothing, prior_and_prompt_probs, upsample_probs
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


def _block_plan(group_firsts: Sequence[int | None], grids, budgets, k: int, num_looks,
                encoded: Sequence[Sequence[int]] | None = None) -> LookPlan:
    """Cells each look takes per scale and image of a group (k² per block; 0 once an image is done);
    ``encoded``: per image, blocks per scale taken before this call."""
    encoded = encoded or [None] * len(group_firsts)
    plans = [plan_block_looks(grids, budgets, k, num_looks, m, e) for m, e in zip(group_firsts, encoded)]
    looks = max(map(len, plans))
    return LookPlan([[[k * k * plan[j][i] if j < len(plan) else 0 for plan in plans] for i in range(len(grids))]
                     for j in range(looks)])


def _old_blocks(old: Sequence[torch.Tensor] | None, k: int) -> list[torch.Tensor] | None:
    """Bool block maps (n, h//k, w//k) of blocks with any cell encoded before (never taken again)."""
    if old is None:
        return None
    out = []
    for m in old:
        h, w = m.shape[-2:]
        full = m[:, :h // k * k, :w // k * k].float().unsqueeze(1)
        out.append((F.max_pool2d(full, k) if k > 1 and full.numel() else full).squeeze(1) > 0)
    return out


def _select_blocks(probs: Sequence[torch.Tensor], plan: LookPlan, k: int, old: list[torch.Tensor] | None = None):
    """Each look's cells, chosen block by block: (union maps per scale, per look the canvas
    positions of its cells in canvas order, padded past shorter images). ``old``: bool block maps
    taken before this call, left out of the looks and of the returned maps."""
    scored = _block_probs(probs, k)
    taken = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scored] if old is None else old
    order = []
    for j, look in enumerate(plan.budgets):
        new = select_cells(scored, taken, [[n // (k * k) for n in scale] for scale in look])
        taken = [t | n for t, n in zip(taken, new)]
        cells = torch.cat([_cells_of(n, tuple(p.shape[-2:]), k).flatten(1) for n, p in zip(new, probs)], dim=1)
        order.append(torch.argsort((~cells).to(torch.int8), dim=1, stable=True)[:, :max(plan.tokens_per_look()[j])])
    if old is not None:
        taken = [t & ~o for t, o in zip(taken, old)]
    return [_cells_of(t, tuple(p.shape[-2:]), k).to(p.dtype) for t, p in zip(taken, probs)], order


def encode_for_llm(vision_model: Any, pixel_values, *, prompt: torch.Tensor | None = None,
                   low_res: LowResPass | None = None, k: int = 2, budgets: Sequence[int] | None = None,
                   num_looks: int | str = 1, only_select_first_n_scale=None, gt_selection_maps=None,
                   smooth_selection_prob: bool = False, num_hidden_layers_to_return: int | None = None,
                   max_tokens_per_pass: int | None = None,
                   old_selection_maps: Sequence[torch.Tensor] | None = None) -> PS3VisionOutput:
    """Encode a batch with block-aligned selection; the output has the layout of a PS3 call
    (low-res tokens, then the selected cells in canvas order; ``selection_maps`` the union), and
    like one it takes a (B, 3, H, W) tensor or a list of images of any sizes (``lengths`` is then
    set and the tokens are zero-padded; ``per_sample()`` splits it).

    ``budgets``: cells per high-res scale and look (default: the model's per-scale budgets);
    ``only_select_first_n_scale``: an int or one per image (see :func:`ps3.mllm.first_n_scales_for_sizes`).
    ``old_selection_maps``: look closer (as in ``PS3VisionModel.encode_looks``): blocks with a cell
    encoded before are not taken again; the output covers only the new blocks.
    """
    encoder = encoder_of(vision_model)
    k = _check_k(k)
    groups = group_images(pixel_values, None, None, only_select_first_n_scale, gt_selection_maps)
    if low_res is None:
        low_res = encode_low_res(encoder, pixel_values)
    else:
        encoder.check_low_res(low_res, pixel_values, needs_kv=True)
    B = low_res.batch_size
    budgets = list(encoder.max_select_num_each_scale if budgets is None else budgets)
    feats, highres = low_res.selection_features, low_res.highres_selection_features
    bottomup, topdown = prior_and_prompt_probs(feats, highres, encoder.prior_prompt, prompt,
                                               encoder.prompt_proj_for_highres)
    plans, orders, results = [], [], []
    for g in groups:
        sizes = encoder.feature_sizes(*g.size)
        part = [t if t is None or len(groups) == 1 else t.index_select(0, g.index) for t in (bottomup, topdown)]
        bu, td = [None if t is None else upsample_probs(t, sizes[1:], t.dtype) for t in part]
        probs = apply_gt_and_smoothing(td if td is not None else bu, g.gt_selection_maps, sizes[1:],
                                       smooth_selection_prob)
        _, grids = block_grids(*g.size, encoder.ps3_scales, encoder.patch_size, k)
        old = _old_blocks(old_maps_of_group(old_selection_maps, g, sizes[1:], len(image_sizes(pixel_values))), k)
        plan = _block_plan(g.only_select_first_n_scale or [None] * len(g.samples), grids, budgets, k, num_looks,
                           encoded_counts(old))
        maps, order = (_select_blocks(probs, plan, k, old) if plan.num_looks
                       else ([torch.zeros_like(p) for p in probs], []))
        plans.append(plan)
        orders.append(order)
        results.append((probs, bu, td, maps))
    out = PS3VisionOutput(pooled_output=low_res.pooled_output,
                          **{name: merge_group_maps(groups, [r[i] for r in results], B) for i, name in enumerate(
                              ("selection_probs", "bottomup_selection_probs", "topdown_selection_probs",
                               "selection_maps"))})
    hidden, totals = encoder.encode_selection(groups, plans, orders, low_res,
                                              num_hidden_layers_to_return=num_hidden_layers_to_return,
                                              max_tokens_per_pass=max_tokens_per_pass)
    out.hidden_states, out.last_hidden_state = list(hidden), hidden[-1]
    if not (isinstance(pixel_values, torch.Tensor) and len(groups) == 1 and len(set(totals)) == 1):
        out.lengths = torch.tensor(totals).to(feats.device, non_blocking=True)
        out.feature_sizes = [None] * B
        for g in groups:
            for b in g.samples:
                out.feature_sizes[b] = encoder.feature_sizes(*g.size)[1:]
    return out
