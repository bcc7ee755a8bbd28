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

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..encoder.batching import ImageGroup, encoded_counts
from ..encoder.outputs import LowResPass, PS3VisionOutput
from ..encoder.request import EncodeRequest
from ..encoder.selection import LookPlan, select_cells
from .tokens import _check_k, check_budgets, plan_block_looks, renamed

Size = tuple[int, int]
Maps = list[torch.Tensor]


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


@dataclass(frozen=True)
class BlockCells:
    """The MLLM's cell rule for the encoder's selection pipeline
    (``ps3.encoder.selection_pipeline``): each look takes whole k×k blocks, ranked by their mean
    probability; ``budgets`` are cells per high-res scale and look (``budget // k²`` blocks).
    A block with any cell encoded before the call is never taken again."""

    k: int
    budgets: tuple[int, ...]
    always_maps = True  # the projector reads the maps even when no look is taken

    def plan(self, group: ImageGroup, sizes: Sequence[Size], old: Maps | None) -> LookPlan:
        if group.num_token_look_close is not None:
            raise ValueError("num_token_look_close is not used by block-aligned selection: pass num_look_close")
        k = self.k
        grids = [(h // k, w // k) for h, w in sizes]
        encoded = encoded_counts(_old_blocks(old, k)) or [None] * len(group.samples)
        plans = [plan_block_looks(grids, self.budgets, k, group.num_look_close, m, e)
                 for m, e in zip(group.only_select_first_n_scale or [None] * len(group.samples), encoded)]
        looks = max(map(len, plans))
        return LookPlan([[[k * k * plan[j][i] if j < len(plan) else 0 for plan in plans] for i in range(len(grids))]
                         for j in range(looks)])

    def pick(self, probs: Maps, plan: LookPlan, old: Maps | None) -> list[Maps]:
        k = self.k
        scored = _block_probs(probs, k)
        taken = _old_blocks(old, k) or [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scored]
        looks = []
        for look in plan.budgets:
            new = select_cells(scored, taken, [[n // (k * k) for n in scale] for scale in look])
            taken = [t | n for t, n in zip(taken, new)]
            looks.append([_cells_of(n, tuple(p.shape[-2:]), k) for n, p in zip(new, probs)])
        return looks


def encode_for_llm(vision_model: Any, pixel_values, *, prompt: torch.Tensor | None = None,
                   low_res: LowResPass | None = None, k: int = 2,
                   max_select_num_each_scale: Sequence[int] | None = None,
                   num_look_close: int | str | None = None, only_select_first_n_scale=None, gt_selection_maps=None,
                   smooth_selection_prob: bool = False, num_hidden_layers_to_return: int | None = None,
                   max_tokens_per_pass: int | None = None, old_selection_maps: Sequence[torch.Tensor] | None = None,
                   budgets: Sequence[int] | None = None, num_looks: int | str | None = None) -> PS3VisionOutput:
    """Encode a batch with block-aligned selection; the output has the layout of a PS3 call
    (low-res tokens, then the selected cells in canvas order; ``selection_maps`` the union), and
    like one it takes a (B, 3, H, W) tensor or a list of images of any sizes (``lengths``,
    ``feature_sizes`` and ``num_looks`` are then set and the tokens zero-padded; ``per_sample()``
    splits it). It keeps the pooled feature and the bottom-up/top-down maps (a prompt head
    learns from the latter).

    ``max_select_num_each_scale``: cells per high-res scale and look (default: the model's);
    ``num_look_close``: looks per image, an int (0 = low-res only) or "all" (default 1);
    ``only_select_first_n_scale``: an int or one per image (see :func:`ps3.mllm.first_n_scales_for_sizes`).
    ``old_selection_maps``: look closer (as in ``PS3VisionModel.encode_looks``): blocks with a cell
    encoded before are not taken again; the output covers only the new blocks.
    ``budgets`` / ``num_looks``: deprecated names of ``max_select_num_each_scale`` / ``num_look_close``.
    """
    encoder = encoder_of(vision_model)
    k = _check_k(k)
    cells = renamed("budgets", "max_select_num_each_scale", budgets, max_select_num_each_scale,
                    encoder.max_select_num_each_scale)
    looks = renamed("num_looks", "num_look_close", num_looks, num_look_close, 1)
    rule = BlockCells(k, tuple(check_budgets(cells, len(encoder.ps3_scales) - 1, encoder.ps3_scales)))
    request = EncodeRequest.build(
        pixel_values, width=encoder.width, num_look_close=looks, only_select_first_n_scale=only_select_first_n_scale,
        prompt=prompt, gt_selection_maps=gt_selection_maps, smooth_selection_prob=smooth_selection_prob,
        num_hidden_layers_to_return=num_hidden_layers_to_return, max_tokens_per_pass=max_tokens_per_pass,
        low_res=low_res, old_selection_maps=old_selection_maps)
    return encoder.encode_request(request, rule, scores=True)[0]
