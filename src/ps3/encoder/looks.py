"""Encoding looks (design §3.10–3.12, §3.14): tokenising the selected cells, packing every look of
every image of a call into few trunk passes, and putting the tokens back in canvas order.

A *row* is one look of one image: its selected cells, attending to that image's low-res keys and
values and to itself (looks do not see each other). Rows of equal length go through the trunk
together without padding; leftover rows of other lengths (images of other sizes or budgets) are
padded into a shared pass only while the tokens computed stay within ``MAX_PADDING`` × the tokens
returned, with a key mask so padding is never attended to. Each row's low-res prefix is gathered
from its own image's cache.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batching import ImageGroup
from .selection import LookPlan, scale_image_size
from .vit import PatchEmbed, resize_patches

Size = tuple[int, int]

# Tokens computed per token returned, at most, when rows of different lengths share a pass.
MAX_PADDING = 1.25


@dataclass(frozen=True)
class LookParts:
    """The parts of the encoder that encoding looks uses, each named (the encoder builds one per
    call, :meth:`PS3VisionEncoder.look_parts`): how a cell becomes a token, and how tokens go
    through the trunk.

    ``blocks(x, kv_cache=, keep_hidden=)`` runs the trunk's blocks as inference runs them (replayed
    from CUDA graphs when enabled); ``masked_blocks`` is the eager ``forward_blocks``, which also
    takes per-row cache rows (``prefix_rows``) and a ``key_mask``. ``pos_embed_at(h, w, rows,
    cols)``: the trunk's position table resampled to an h × w grid, at the given cells;
    ``pos_emb_residual[s]``: the learned (1, side², C) residual table of high-res scale s (None
    when the model has none). ``pool(x, key_mask)``: final norm + MAP pooling.
    """

    patch_embed: PatchEmbed
    pos_embed_at: Callable[..., torch.Tensor]
    pos_emb_residual: nn.ParameterList | None
    scales: tuple[int, ...]
    patch_size: int
    blocks: Callable[..., tuple]
    masked_blocks: Callable[..., tuple]
    pool: Callable[..., torch.Tensor]


@dataclass
class GroupLooks:
    """Selection outcome of one image group: which cells each look encodes."""

    group: ImageGroup
    sizes: list[Size]  # feature grid of every scale, the low-res one first
    plan: LookPlan
    order: list[torch.Tensor]  # per look (n, T_j): canvas positions of the look's cells, canvas order

    def row_length(self, look: int, member: int) -> int:
        return sum(scale[member] for scale in self.plan.budgets[look])


@dataclass(frozen=True)
class Row:
    group: int
    look: int
    member: int
    sample: int
    length: int


def list_rows(groups: Sequence[GroupLooks]) -> list[Row]:
    return [Row(g, j, i, gl.group.samples[i], gl.row_length(j, i))
            for g, gl in enumerate(groups) for j in range(gl.plan.num_looks) for i in range(len(gl.group.samples))]


def plan_passes(lengths: Sequence[int], min_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Rows (indices into ``lengths``) of each trunk pass, longest rows first.

    Rows of one length fill passes of at most ``max_tokens`` tokens, in whole multiples of
    ``min_rows`` rows (a uniform batch: whole looks, as before). A pass left with fewer than
    ``min_rows`` rows takes shorter rows while the padding stays within MAX_PADDING.
    """
    def row_limit(cap: int) -> int:
        if max_tokens is None:
            return len(lengths)
        return max(1, max_tokens // (cap * min_rows)) * min_rows

    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for length, same in itertools.groupby(order, key=lambda i: lengths[i]):
        rows = list(same)
        while rows:
            if passes and len(passes[-1]) < min_rows:
                last = passes[-1]
                cap = lengths[last[0]]
                take = rows[:row_limit(cap) - len(last)]
                returned = sum(lengths[i] for i in last) + length * len(take)
                if take and cap * (len(last) + len(take)) <= MAX_PADDING * returned:
                    last.extend(take)
                    rows = rows[len(take):]
                    continue
            n = row_limit(length)
            passes.append(rows[:n])
            rows = rows[n:]
    return passes


def embed_cells(parts: LookParts, pixel_values: torch.Tensor, sizes: Sequence[Size], counts: Sequence[Sequence[int]],
                canvas_index: torch.Tensor, row_image: torch.Tensor) -> torch.Tensor:
    """Tokens (R, T, C) for the cells at ``canvas_index`` (R, T) of the canvas of all high-res
    cells (scales ascending, row-major) of image ``row_image[r]`` of ``pixel_values``: patch
    embedding of the cell's pixels at its scale + trunk position embedding resampled to the
    scale's grid + the scale's residual embedding. Columns past a row's cells are zeros.

    ``counts[s][r]`` is how many of row r's cells lie at scale s (known from the look plan): canvas
    order puts them in one run per scale, so each scale embeds only its own cells. Only the
    selected patches are resized (``resize_patches``), so no full-resolution copy is ever made.
    """
    R, T = canvas_index.shape
    H, W = pixel_values.shape[-2:]
    device = canvas_index.device
    cell_start = 0
    first = [0] * R  # where each row's run of the current scale begins
    out = None
    for s, (h, w) in enumerate(sizes):
        ks = counts[s]
        k = max(ks)
        if k:
            j = torch.arange(k, device=device)
            # Host lists go over without waiting for the device (non_blocking copies of
            # pageable memory are staged at once and never synchronise the stream).
            per_row = torch.tensor([ks, first]).to(device, non_blocking=True).unsqueeze(-1)
            valid = j < per_row[0]
            # Columns of this scale's tokens; rows with fewer write to a spare column T.
            cols = torch.where(valid, per_row[1] + j, T)
            local = torch.where(valid, canvas_index.gather(1, cols.clamp(max=T - 1)) - cell_start, 0)
            rows, cols_in_grid = local // w, local % w
            batch = row_image.unsqueeze(1).expand(R, k)
            image_size = scale_image_size(H, W, parts.scales, parts.patch_size, s + 1)
            pix = resize_patches(pixel_values, image_size, parts.patch_size, batch.reshape(-1), rows.reshape(-1),
                                 cols_in_grid.reshape(-1)).to(pixel_values.dtype).view(R, k, -1)
            tok = parts.patch_embed.embed_patches(pix)
            tok = tok + parts.pos_embed_at(h, w, rows, cols_in_grid)
            if parts.pos_emb_residual is not None:
                side = parts.scales[s + 1] // parts.patch_size
                tok = tok + parts.pos_emb_residual[s].view(side, side, tok.shape[-1])[rows, cols_in_grid]
            if out is None:
                out = tok.new_zeros(R, T + 1, tok.shape[-1])
            out = out.scatter(1, cols.unsqueeze(-1).expand(-1, -1, tok.shape[-1]), tok)
        first = [f + n for f, n in zip(first, ks)]
        cell_start += h * w
    return out[:, :T]


def _fit(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Crop or pad (with ``fill``) the last dimension of ``x`` to ``width``."""
    if x.shape[1] >= width:
        return x[:, :width]
    return F.pad(x, (0, width - x.shape[1]), value=fill)


def rows_of(per_look: Sequence[torch.Tensor], rows: Sequence[Row], width: int, fill) -> torch.Tensor:
    """Stack the given rows of per-look (n, T_j) tensors of one group, each fitted to ``width``."""
    parts = []
    for look, same in itertools.groupby(rows, key=lambda r: r.look):
        members = [r.member for r in same]
        source = per_look[look]
        if members != list(range(source.shape[0])):
            source = source.index_select(0, torch.tensor(members).to(source.device, non_blocking=True))
        parts.append(_fit(source, width, fill))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def embed_pass(parts: LookParts, groups: Sequence[GroupLooks], rows: Sequence[Row], width: int) -> torch.Tensor:
    """Tokens (R, width, C) of a pass's rows (grouped by image group, then look, then member)."""
    out = []
    for g, same in itertools.groupby(rows, key=lambda r: r.group):
        same = list(same)
        gl = groups[g]
        canvas = rows_of(gl.order, same, width, 0)
        counts = [[gl.plan.budgets[r.look][s][r.member] for r in same] for s in range(len(gl.sizes) - 1)]
        members = torch.tensor([r.member for r in same]).to(canvas.device, non_blocking=True)
        out.append(embed_cells(parts, gl.group.pixels, gl.sizes[1:], counts, canvas, members))
    return torch.cat(out) if len(out) > 1 else out[0]


def output_positions(groups: Sequence[GroupLooks], low_res_tokens: int, width: int, trash: int) -> list[list[torch.Tensor]]:
    """Per group and look, (n, T_j) flat positions in a (B·width + 1)-row output buffer where each
    look token lands: its image's row, after the low-res tokens, in canvas order among all that
    image's selected cells (one sort of their canvas positions). Padding goes to ``trash``."""
    out = []
    for gl in groups:
        n = len(gl.group.samples)
        if not gl.order:
            out.append([])
            continue
        device = gl.order[0].device
        valid = []
        for j, order in enumerate(gl.order):
            lengths = torch.tensor([gl.row_length(j, i) for i in range(n)]).to(device, non_blocking=True)
            valid.append(torch.arange(order.shape[1], device=device) < lengths.unsqueeze(1))
        valid_all = torch.cat(valid, dim=1)
        positions = torch.where(valid_all, torch.cat(gl.order, dim=1), torch.iinfo(torch.long).max)
        rank = positions.argsort(dim=1).argsort(dim=1)
        base = (gl.group.index * width + low_res_tokens).unsqueeze(1)
        dest = torch.where(valid_all, base + rank, trash)
        out.append(list(dest.split([o.shape[1] for o in gl.order], dim=1)))
    return out


def _pass_rows(rows: Sequence[Row], ids: Sequence[int]) -> list[Row]:
    return sorted((rows[i] for i in ids), key=lambda r: (r.group, r.look, r.member))


def _run_pass(parts: LookParts, tokens: torch.Tensor, rows: Sequence[Row], low_res, batch: int, keep: int,
              eager: bool = False):
    """The trunk over one pass: (final tokens, kept hidden states, key mask of the real tokens or
    None). Whole looks of the whole batch in batch order use the plain path (the low-res cache
    broadcast to the rows, CUDA graphs allowed); other passes gather each row's own cache and
    mask the padding."""
    cap = tokens.shape[1]
    samples = [r.sample for r in rows]
    padded = any(r.length < cap for r in rows)
    run = parts.masked_blocks if eager else parts.blocks
    if not padded and samples == list(range(batch)) * (len(rows) // batch):
        x, hidden, _ = run(tokens, kv_cache=low_res.kv_cache, keep_hidden=keep)
        return x, hidden, None
    if not padded and len(set(samples)) == 1:
        # Looks of one image: its slice of the cache (a view) broadcasts to them, nothing gathered.
        s = samples[0]
        kv = [(k[s:s + 1], v[s:s + 1]) for k, v in low_res.kv_cache]
        x, hidden, _ = run(tokens, kv_cache=kv, keep_hidden=keep)
        return x, hidden, None
    device = tokens.device
    prefix_rows = torch.tensor(samples).to(device, non_blocking=True)
    valid = None
    key_mask = None
    if padded:
        lengths = torch.tensor([r.length for r in rows]).to(device, non_blocking=True)
        valid = torch.arange(cap, device=device) < lengths.unsqueeze(1)
        prefix = low_res.kv_cache[0][0].shape[2]
        key_mask = torch.cat([valid.new_ones(len(rows), prefix), valid], dim=1)
    x, hidden, _ = parts.masked_blocks(tokens, kv_cache=low_res.kv_cache, keep_hidden=keep,
                                                prefix_rows=prefix_rows, key_mask=key_mask)
    return x, hidden, valid


def run_looks(parts: LookParts, groups: Sequence[GroupLooks], low_res, batch: int, keep: int,
              max_tokens: int | None, min_rows: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Encode every look of every group: per kept layer (B, width, C) — each image's low-res tokens
    then its selected high-res tokens in canvas order, zero-padded — and each image's token count.
    ``min_rows`` (default ``batch``): the rows a pass is filled to, with shorter rows if need be."""
    P = low_res.hidden_states[0].shape[1]
    rows = list_rows(groups)
    totals = [P] * batch
    for r in rows:
        totals[r.sample] += r.length
    width = max(totals)
    trash = batch * width
    # Only the padding is zeroed: every other position is written exactly once below.
    padding = None
    if min(totals) < width:
        device = low_res.hidden_states[-1].device
        padding = torch.arange(width, device=device) >= torch.tensor(totals).to(device, non_blocking=True)[:, None]
    buffers = []
    for layer in range(keep):
        low = low_res.hidden_states[len(low_res.hidden_states) - keep + layer]
        buf = low.new_empty(trash + 1, low.shape[-1])
        out = buf[:trash].view(batch, width, -1)
        if padding is not None:
            out.masked_fill_(padding[..., None], 0)
        out[:, :P] = low
        buffers.append(buf)
    dests = output_positions(groups, P, width, trash)
    for ids in plan_passes([r.length for r in rows], min_rows or batch, max_tokens):
        prow = _pass_rows(rows, ids)
        cap = max(r.length for r in prow)
        tokens = embed_pass(parts, groups, prow, cap)
        _, hidden, _ = _run_pass(parts, tokens, prow, low_res, batch, keep)
        dest = torch.cat([rows_of(dests[g], list(same), cap, trash)
                          for g, same in itertools.groupby(prow, key=lambda r: r.group)]).flatten()
        for buf, h in zip(buffers, hidden):
            buf[dest] = h.reshape(-1, h.shape[-1])
    return [buf[:trash].view(batch, width, -1) for buf in buffers], totals


def pool_looks(parts: LookParts, groups: Sequence[GroupLooks], low_res, batch: int,
               gt_cells: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
    """Pre-training mode (design §3.14): each image's one look through the trunk, then MAP pooling
    over its tokens after the final norm → (B, C). ``gt_cells[g]`` (n, T) marks the look tokens
    whose cell the gt map covers (pool over those only; an image with none keeps all)."""
    rows = list_rows(groups)
    samples, pooled = [], []
    for ids in plan_passes([r.length for r in rows], batch, None):
        prow = _pass_rows(rows, ids)
        cap = max(r.length for r in prow)
        tokens = embed_pass(parts, groups, prow, cap)
        x, _, valid = _run_pass(parts, tokens, prow, low_res, batch, 0, eager=True)
        mask = valid
        if gt_cells is not None:
            gt = torch.cat([rows_of([gt_cells[g]], list(same), cap, False)
                            for g, same in itertools.groupby(prow, key=lambda r: r.group)])
            valid = valid if valid is not None else torch.ones_like(gt)
            mask = gt & valid
            mask = torch.where(mask.any(1, keepdim=True), mask, valid)
        pooled.append(parts.pool(x, mask))
        samples += [r.sample for r in prow]
    pooled = torch.cat(pooled)
    if samples == list(range(batch)):
        return pooled
    index = torch.tensor(samples).to(pooled.device, non_blocking=True)
    return pooled.new_zeros(batch, pooled.shape[-1]).index_copy(0, index, pooled)
