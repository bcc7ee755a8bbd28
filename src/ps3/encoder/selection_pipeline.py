"""The selection pipeline every encoder call runs (design §3.5–3.9), with a pluggable cell rule.

1. **plan**: the rule decides how many cells each look takes, per scale and image (host
   arithmetic on sizes and arguments, so known before the model runs);
2. **low-res pass**: run, or reused from ``request.low_res``; its key/value cache is kept only
   when a look will attend to it;
3. **score**: every low-res cell against the prior prompt and the call's prompt, once for the
   whole batch; then, per group of images sharing grid sizes, the probabilities upsampled to
   each high-res grid, cells of the ground-truth maps set to 1, optional smoothing;
4. **pick**: the rule chooses each look's new cells from those probabilities, never a cell
   taken by an earlier look or encoded before the call (``old_selection_maps``);
5. **merge**: canvas order of each look's cells, union maps per scale, per-group maps padded
   into per-call maps.

A rule is a :class:`CellRule`. :class:`TopKCells` is the encoder's (plan by ``plan_looks``,
top-k cells). ``ps3.mllm.looks.BlockCells`` (whole k×k blocks, for an LLM projector) plugs in
from outside the core, which never imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .batching import ImageGroup, encoded_counts, merge_group_maps, old_maps_of_group
from .looks import GroupLooks
from .outputs import LowResPass, PS3VisionOutput
from .request import EncodeRequest
from .selection import LookPlan, plan_looks, select_cells
from .selection_features import apply_gt_and_smoothing, prior_and_prompt_probs, upsample_probs

Size = tuple[int, int]
Maps = list[torch.Tensor]


class CellRule(Protocol):
    """How the looks of one group of images are planned and their cells picked.

    ``plan``: the cells each look takes per scale and image (``sizes``: the group's high-res
    grids; ``old``: bool (n, h_i, w_i) maps of cells encoded before the call, or None).
    ``pick``: per look, per scale, bool (n, h_i, w_i) maps of the cells that look newly takes.
    ``always_maps``: whether the output carries selection maps even when nothing is encoded.
    """

    always_maps: bool

    def plan(self, group: ImageGroup, sizes: Sequence[Size], old: Maps | None) -> LookPlan: ...

    def pick(self, probs: Maps, plan: LookPlan, old: Maps | None) -> list[Maps]: ...


@dataclass(frozen=True)
class TopKCells:
    """The encoder's rule: looks planned from the per-scale budgets (``plan_looks``), each taking
    the top-k cells of every scale among those not taken yet. ``pretraining``: one look with the
    full budget (the pooled mode)."""

    budgets: tuple[int, ...]
    pretraining: bool = False
    always_maps = False

    def plan(self, group: ImageGroup, sizes: Sequence[Size], old: Maps | None) -> LookPlan:
        return plan_looks(sizes, self.budgets, len(group.samples), group.num_look_close, group.num_token_look_close,
                          group.only_select_first_n_scale, self.pretraining, encoded_counts(old))

    def pick(self, probs: Maps, plan: LookPlan, old: Maps | None) -> list[Maps]:
        taken, looks = old, []
        for budgets in plan.budgets:
            new = select_cells(probs, taken, budgets)
            taken = new if taken is None else [t | n for t, n in zip(taken, new)]
            looks.append(new)
        return looks


@dataclass(frozen=True)
class Selection:
    """What the pipeline chose for a call: per group its looks, and the per-call maps."""

    looks: list[GroupLooks]
    selection_probs: Maps
    bottomup_selection_probs: Maps
    topdown_selection_probs: Maps | None
    selection_maps: Maps | None
    feature_sizes: list[list[Size]]  # per image, its high-res grids
    num_looks: list[int]  # per image

    def output(self, request: EncodeRequest, *, hidden: Sequence[torch.Tensor] | None = None,
               totals: Sequence[int] | None = None, pooled: torch.Tensor | None = None,
               scores: bool = True) -> PS3VisionOutput:
        """The call's output, built once. ``hidden``/``totals``: the encoded tokens per kept layer
        and each image's token count (None in the pooled mode); ``scores``: keep the separate
        bottom-up/top-down maps (upstream's inference output leaves them None)."""
        mixed = not (request.uniform_tensor and len(self.looks) == 1 and (totals is None or len(set(totals)) == 1))
        lengths = None
        if mixed and totals is not None:
            lengths = torch.tensor(totals).to(hidden[-1].device, non_blocking=True)
        return PS3VisionOutput(
            last_hidden_state=hidden[-1] if hidden is not None else None,
            hidden_states=list(hidden) if hidden is not None else None,  # a list, as upstream returns it
            pooled_output=pooled, selection_maps=self.selection_maps, selection_probs=self.selection_probs,
            bottomup_selection_probs=self.bottomup_selection_probs if scores else None,
            topdown_selection_probs=self.topdown_selection_probs if scores else None,
            lengths=lengths, feature_sizes=self.feature_sizes if mixed else None,
            num_looks=self.num_looks if mixed else None)


def score_groups(encoder, features: torch.Tensor, highres: torch.Tensor | None, groups: Sequence[ImageGroup],
                 prompt: torch.Tensor | None = None, smooth: bool = False) -> list[tuple[Maps, Maps, Maps | None]]:
    """Per group, (selection probs, bottom-up probs, top-down probs or None) on its high-res grids.
    ``features``/``highres``: a LowResPass's selection features. The scores run once on the
    low-res grid, which every image shares; only the per-scale maps are built per group."""
    bottomup, topdown = prior_and_prompt_probs(features, highres, encoder.prior_prompt, prompt,
                                               encoder.prompt_proj_for_highres)
    out = []
    for g in groups:
        sizes = encoder.feature_sizes(*g.size)[1:]
        part = [t if t is None or len(groups) == 1 else t.index_select(0, g.index) for t in (bottomup, topdown)]
        bu, td = [None if t is None else upsample_probs(t, sizes, t.dtype) for t in part]
        out.append((apply_gt_and_smoothing(td if td is not None else bu, g.gt_selection_maps, sizes, smooth), bu, td))
    return out


def merge_looks(probs: Maps, plan: LookPlan, picked: list[Maps], old: Maps | None) -> tuple[Maps, list[torch.Tensor]]:
    """(union of the looks' new cells per scale, 0/1 in the probabilities' dtype as upstream builds
    them; per look the (n, T_j) canvas positions of its cells in canvas order)."""
    order = []
    for j, new in enumerate(picked):
        canvas = torch.cat([m.flatten(1) for m in new], 1)
        order.append(torch.argsort((~canvas).to(torch.int8), dim=1, stable=True)[:, :max(plan.tokens_per_look()[j])])
    union = picked[0]
    for new in picked[1:]:
        union = [u | n for u, n in zip(union, new)]
    if old is not None:
        union = [u & ~o for u, o in zip(union, old)]
    return [u.to(p.dtype) for u, p in zip(union, probs)], order


def select_looks(encoder, request: EncodeRequest, rule: CellRule) -> tuple[Selection, LowResPass]:
    """Steps 1–5 of the module docstring for one call: (what was chosen, the low-res pass)."""
    groups, batch = request.groups, request.batch_size
    sizes = [encoder.feature_sizes(*g.size) for g in groups]
    olds = [old_maps_of_group(request.old_selection_maps, g, s[1:], batch) for g, s in zip(groups, sizes)]
    plans = [rule.plan(g, s[1:], old) for g, s, old in zip(groups, sizes, olds)]
    needs_kv = any(p.num_looks for p in plans)
    low_res = request.low_res
    if low_res is None:
        low_res = encoder.encode_low_res(request.pixel_values, keep_kv=needs_kv)
    else:
        encoder.check_low_res(low_res, request.pixel_values, needs_kv)
    scores = score_groups(encoder, low_res.selection_features, low_res.highres_selection_features, groups,
                          request.prompt, request.smooth_selection_prob)
    looks, maps = [], []
    for g, s, plan, old, (probs, _, _) in zip(groups, sizes, plans, olds, scores):
        with torch.no_grad():
            union, order = merge_looks(probs, plan, rule.pick(probs, plan, old), old) if plan.num_looks else (
                [torch.zeros_like(p) for p in probs], [])
        looks.append(GroupLooks(g, s, plan, order))
        maps.append(union)
    feature_sizes, num_looks = [None] * batch, [0] * batch
    for gl in looks:
        for b in gl.group.samples:
            feature_sizes[b], num_looks[b] = gl.sizes[1:], gl.plan.num_looks
    keep_maps = needs_kv or request.old_selection_maps is not None or rule.always_maps
    merged = [merge_group_maps(groups, [sc[i] for sc in scores], batch) for i in range(3)]
    selection = Selection(looks, *merged, merge_group_maps(groups, maps, batch) if keep_maps else None,
                          feature_sizes, num_looks)
    return selection, low_res
