"""From PS3 tokens to LLM input embeddings: k×k merge per scale, then an MLP to the LLM width.

Output order, per image: the merged low-res tokens (row-major over the ``ceil(h_0/k) ×
ceil(w_0/k)`` grid, the low-res grid zero-padded to a multiple of k), then for each high-res
scale in ascending order its kept merged tokens, row-major over that scale's block grid. A
high-res block is kept only when all its k×k cells were encoded (blocks overhanging the grid's
edge never are). Inside a merged token the k² cell features are concatenated row-major.

Images of a batch may keep different numbers of tokens (ragged batches, or a selection that is
not block-aligned): the output is zero-padded at the end to the longest, with ``lengths`` and
an ``attention_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import _check_k


@dataclass
class ProjectedImage:
    """embeds (B, N, D); lengths (B,) long; attention_mask (B, N) bool (True on real tokens);
    low_res_tokens: how many leading tokens of every image are the merged low-res grid."""

    embeds: torch.Tensor
    lengths: torch.Tensor
    attention_mask: torch.Tensor
    low_res_tokens: int


def merge_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, h, w, C) → (B, ceil(h/k)·ceil(w/k), k²·C): zero-pad to multiples of k, concatenate each
    k×k block's cells row-major."""
    B, h, w, C = x.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    H, W = (h + ph) // k, (w + pw) // k
    return x.view(B, H, k, W, k, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H * W, k * k * C)


def _block_cells(h: int, w: int, k: int, offset: int, device: torch.device) -> torch.Tensor:
    """Canvas index of every cell of every full k×k block of an (h, w) grid: (blocks, k²)."""
    rows = torch.arange(h // k, device=device).view(-1, 1, 1, 1) * k + torch.arange(k, device=device).view(1, 1, k, 1)
    cols = torch.arange(w // k, device=device).view(1, -1, 1, 1) * k + torch.arange(k, device=device).view(1, 1, 1, k)
    return (offset + rows * w + cols).reshape(-1, k * k)


def _kept_blocks(maps: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """(B, Σ full blocks) bool: blocks whose k×k cells were all selected, scales in order."""
    out = []
    for m in maps:
        h, w = m.shape[-2:]
        full = m[:, :h // k * k, :w // k * k].bool()
        out.append(full.reshape(m.shape[0], h // k, k, w // k, k).all(4).all(2).flatten(1))
    return torch.cat(out, dim=1)


class PS3Projector(nn.Module):
    """Merge → LayerNorm(k²C) → Linear(k²C, D) → GELU → Linear(D, D), shared by every scale.

    ``scale_embeddings``: add a learned (D,) vector per scale (low-res first), so the LLM can tell
    the scales apart. Build it with :meth:`for_vision_model` to read the widths from a model.
    """

    def __init__(self, vision_width: int, llm_width: int, *, low_res_grid: tuple[int, int], num_high_res_scales: int,
                 k: int = 2, scale_embeddings: bool = False):
        super().__init__()
        self.k = _check_k(k)
        self.vision_width = int(vision_width)
        self.llm_width = int(llm_width)
        self.low_res_grid = (int(low_res_grid[0]), int(low_res_grid[1]))
        self.num_high_res_scales = int(num_high_res_scales)
        merged = k * k * self.vision_width
        self.norm = nn.LayerNorm(merged)
        self.fc1 = nn.Linear(merged, self.llm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.llm_width, self.llm_width)
        self.scale_embed = (nn.Parameter(torch.zeros(self.num_high_res_scales + 1, self.llm_width))
                            if scale_embeddings else None)

    @classmethod
    def for_vision_model(cls, vision_model: nn.Module, llm_width: int, *, k: int = 2,
                         scale_embeddings: bool = False) -> "PS3Projector":
        encoder = getattr(vision_model, "vision_model", vision_model)
        side = encoder.ps3_scales[0] // encoder.patch_size
        return cls(encoder.width, llm_width, low_res_grid=(side, side), num_high_res_scales=len(encoder.ps3_scales) - 1,
                   k=k, scale_embeddings=scale_embeddings)

    @property
    def low_res_tokens(self) -> int:
        h, w = self.low_res_grid
        return -(-h // self.k) * -(-w // self.k)

    def forward(self, features, selection_maps: Sequence[torch.Tensor] | None = None, *, feature_layer: int = -1,
                num_tokens: int | None = None) -> ProjectedImage:
        """``features``: a :class:`ps3.PS3VisionOutput` (its ``hidden_states[feature_layer]`` and
        ``selection_maps`` are used) or a (B, h_0·w_0 + N_sel, C) tensor with ``selection_maps``.
        ``num_tokens``: the padded length when known (e.g. from :func:`count_llm_tokens`); without
        it the longest image's count is read from the device (one sync)."""
        tokens, maps = self._inputs(features, selection_maps, feature_layer)
        tokens = tokens.to(self.fc1.weight.dtype)  # e.g. a bf16 encoder in front of a float32 projector
        k, (h0, w0) = self.k, self.low_res_grid
        B, N, C = tokens.shape
        low = merge_grid(tokens[:, :h0 * w0].reshape(B, h0, w0, C), k)
        parts, scale_ids = [low], [torch.zeros(low.shape[1], dtype=torch.long, device=tokens.device)]
        lengths = torch.full((B,), low.shape[1], dtype=torch.long, device=tokens.device)
        if maps:
            high, ids, kept_count = kept_block_tokens(tokens[:, h0 * w0:], maps, k, num_tokens, low.shape[1])
            parts.append(high)
            scale_ids.append(ids)
            lengths = lengths + kept_count
        merged = torch.cat(parts, dim=1)
        ids = torch.cat([s.expand(B, -1) if s.dim() == 1 else s for s in scale_ids], dim=1)
        mask = torch.arange(merged.shape[1], device=tokens.device) < lengths.unsqueeze(1)
        embeds = self.fc2(self.act(self.fc1(self.norm(merged))))
        if self.scale_embed is not None:
            embeds = embeds + self.scale_embed[ids]
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return ProjectedImage(embeds, lengths, mask, low.shape[1])

    def _inputs(self, features, selection_maps, feature_layer):
        if isinstance(features, torch.Tensor):
            tokens, maps = features, selection_maps
        else:
            hidden = getattr(features, "hidden_states", None)
            if hidden is None:
                raise ValueError("features is a vision output without hidden_states: call the encoder with "
                                 "output_hidden_states=True (the default)")
            tokens = hidden[feature_layer]
            maps = selection_maps if selection_maps is not None else features.selection_maps
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.vision_width:
            raise ValueError(f"features must be (B, N, {self.vision_width}) tokens, got "
                             f"{tuple(getattr(tokens, 'shape', ())) or type(tokens).__name__}")
        if tokens.shape[1] < self.low_res_grid[0] * self.low_res_grid[1]:
            raise ValueError(f"features hold {tokens.shape[1]} tokens, fewer than the {self.low_res_grid} low-res grid")
        maps = list(maps or [])
        if maps and len(maps) != self.num_high_res_scales:
            raise ValueError(f"selection_maps must hold one (B, h_i, w_i) map per high-res scale "
                             f"({self.num_high_res_scales}), got {len(maps)}")
        return tokens, maps


def kept_block_tokens(high: torch.Tensor, maps: Sequence[torch.Tensor], k: int, num_tokens: int | None,
                      low_count: int):
    """Merged kept blocks (B, M, k²C) in output order, their scale ids (B, M), kept counts (B,).

    Gathers only the kept blocks' cells from the selected-token list (a cell's token is at its
    rank among the selected cells in canvas order), never a canvas of every high-res cell.
    """
    B, C = high.shape[0], high.shape[-1]
    device = high.device
    cells, scale_of_block, offset = [], [], 0
    for i, m in enumerate(maps):
        h, w = m.shape[-2:]
        cells.append(_block_cells(h, w, k, offset, device))
        scale_of_block.append(torch.full((cells[-1].shape[0],), i + 1, dtype=torch.long, device=device))
        offset += h * w
    cells_t, scale_t = torch.cat(cells), torch.cat(scale_of_block)
    kept = _kept_blocks(maps, k)
    kept_count = kept.sum(1)
    M = int(kept_count.max()) if num_tokens is None else max(int(num_tokens) - low_count, 0)
    M = min(M, kept.shape[1])
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :M]  # kept blocks first, in order
    flat = torch.cat([m.flatten(1).bool() for m in maps], dim=1)
    rank = flat.long().cumsum(1) - 1  # position of each selected cell among the selected tokens
    token_index = rank.gather(1, cells_t[order].view(B, -1)).clamp(0, max(high.shape[1] - 1, 0))
    if high.shape[1] == 0:
        merged = high.new_zeros(B, M, k * k * C)
    else:
        merged = high.gather(1, token_index.unsqueeze(-1).expand(-1, -1, C)).view(B, M, k * k * C)
    return merged, scale_t[order], kept_count
