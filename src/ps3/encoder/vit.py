"""A plain pre-norm Vision Transformer with a key/value cache and selected-patch embedding.

Parameter names follow timm's ``VisionTransformer`` so published checkpoints load unchanged
(``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``,
``norm``, ``attn_pool.*``). Two things beyond a standard ViT are what PS3 needs:

* every block can return its keys/values and can attend to a prefix of cached keys/values, so
  high-res tokens attend to the low-res tokens without recomputing them;
* patches can be embedded from a gathered subset (``PatchEmbed.embed_patches``), so only the
  selected high-res patches are ever projected.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import VIT_REGISTRY, ViTArch, arch_from_config  # noqa: F401  (re-exported)
from .precision import attention
from .radio import RadioSpec

if TYPE_CHECKING:
    from ..config import PS3VisionConfig


class Mlp(nn.Module):
    """fc1 → GELU → (optional LayerNorm) → fc2, the timm layout (``fc1``, ``norm``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 gelu_approximate: str = "none", hidden_norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.norm = nn.LayerNorm(hidden_features, eps=hidden_norm_eps) if hidden_norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled():
            hidden = self.act(hidden)
        else:  # inference: GELU over fc1's output in place, one 4×-wide activation fewer per block
            hidden = torch.ops.aten.gelu_(hidden, approximate=self.act.approximate)
        return self.fc2(self.norm(hidden))


def _prepend(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``prefix`` (b, H, P, d) before ``x`` (B, H, N, d) along the tokens. B may be a
    multiple of b (several looks of the same b images stacked look-major): row r then takes
    prefix row r % b, broadcast inside the one copy the concatenation makes anyway."""
    b, B = prefix.shape[0], x.shape[0]
    if b == B:
        return torch.cat([prefix, x], dim=2)
    if B % b:
        raise ValueError(f"a key/value prefix of batch {b} cannot serve a batch of {B} rows")
    n = B // b
    out = torch.cat([prefix.unsqueeze(0).expand(n, *prefix.shape), x.view(n, b, *x.shape[1:])], dim=3)
    return out.view(B, *out.shape[2:])


class Attention(nn.Module):
    """Multi-head self-attention that can prepend cached keys/values of other tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_kv: bool = False, prefix_rows: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None):
        """``prefix_rows`` (B,): row r attends to prefix row ``prefix_rows[r]`` (each row its own
        image's cache); ``key_mask`` (B, prefix + N) bool: the keys each row may attend to."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        own_kv = (k, v)
        if kv_prefix is not None:
            pk, pv = kv_prefix
            if prefix_rows is not None:
                pk, pv = pk.index_select(0, prefix_rows), pv.index_select(0, prefix_rows)
            k, v = _prepend(pk, k), _prepend(pv, v)
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = attention(q, k, v, attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, own_kv) if return_kv else out


class Block(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        dim = arch.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=arch.norm_eps)
        self.attn = Attention(dim, arch.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=arch.norm_eps)
        self.mlp = Mlp(dim, arch.mlp_hidden, gelu_approximate=arch.gelu_approximate)

    def forward(self, x: torch.Tensor, kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_kv: bool = False, prefix_rows: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None):
        attn = self.attn(self.norm1(x), kv_prefix, return_kv, prefix_rows, key_mask)
        if return_kv:
            attn, kv = attn
        x = x + attn
        x = x + self.mlp(self.norm2(x))
        return (x, kv) if return_kv else x


class AttentionPoolLatent(nn.Module):
    """MAP pooling: one learned query attends over the tokens (optionally a key subset)."""

    def __init__(self, arch: ViTArch):
        super().__init__()
        dim = arch.embed_dim
        self.num_heads = arch.num_heads
        self.head_dim = dim // arch.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=arch.norm_eps)
        self.mlp = Mlp(dim, arch.mlp_hidden, gelu_approximate=arch.gelu_approximate)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` (B, N) bool keeps the keys marked True; a row with none kept keeps all."""
        B, N, C = x.shape
        q = self.q(self.latent).view(1, self.num_heads, 1, self.head_dim).expand(B, -1, -1, -1)
        k, v = self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None
        if key_mask is not None:
            key_mask = key_mask | ~key_mask.any(dim=1, keepdim=True)
            attn_mask = key_mask.view(B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, C))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, (H/p)(W/p), C), row-major."""
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed already-gathered patches (..., 3·p·p) laid out as (channel, row, col) — the conv
        restricted to those patches."""
        weight = self.proj.weight
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)


def resample_grid(table: torch.Tensor, h: int, w: int, crop_only: bool = False) -> torch.Tensor:
    """A square (g, g, C) position table for an (h, w) token grid (design §2).

    As is when h == w == g; otherwise bicubic with antialias to (max(h,w), max(h,w)) and the
    top-left h × w kept. ``crop_only`` (RADIO) skips the interpolation.
    """
    g = table.shape[0]
    if (h == w == g) or crop_only:
        return table[:h, :w]
    n = max(h, w)
    grid = table.permute(2, 0, 1).unsqueeze(0).float()
    grid = F.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False, antialias=True)
    return grid[0, :, :h, :w].permute(1, 2, 0).to(table.dtype)


@functools.lru_cache(maxsize=64)
def interpolation_taps(src: int, dst: int, antialias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic 1-D resampling from ``src`` to ``dst`` samples (align_corners=False) as sparse taps.

    Returns (index, weight), each (dst, k): output j = Σ_a weight[j, a] · input[index[j, a]].
    F.interpolate is linear and separable, so resampling the identity gives its exact weights
    (border clamping included). This lets a resampled image or position table be evaluated at a
    few selected cells without building the whole thing. Computed on the CPU (tiny) and cached.
    """
    # Resample a few unit impulses at a time: the dense (dst, src) matrix of a 4K image would take
    # hundreds of MB for a handful of non-zeros per row.
    outs, sources, weights = [], [], []
    for start in range(0, src, 128):
        n = min(128, src - start)
        impulses = torch.zeros(n, 1, 1, src)
        impulses[torch.arange(n), 0, 0, start + torch.arange(n)] = 1.0
        resampled = F.interpolate(impulses, size=(1, dst), mode="bicubic", align_corners=False,
                                  antialias=antialias).view(n, dst)
        i, j = resampled.nonzero(as_tuple=True)
        outs.append(j)
        sources.append(i + start)
        weights.append(resampled[i, j])
    out, source, weight = torch.cat(outs), torch.cat(sources), torch.cat(weights)
    order = torch.argsort(out * src + source)
    out, source, weight = out[order], source[order], weight[order]
    counts = torch.bincount(out, minlength=dst)
    k = max(int(counts.max()), 1)
    slot = torch.arange(out.numel()) - (torch.cumsum(counts, 0) - counts)[out]
    index = torch.zeros(dst, k, dtype=torch.long)
    value = torch.zeros(dst, k)
    index[out, slot] = source
    value[out, slot] = weight
    return index, value


@functools.lru_cache(maxsize=64)
def interpolation_taps_on(src: int, dst: int, antialias: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``interpolation_taps`` already on ``device``: copied once, so a forward pass makes no
    host-to-device copy (a blocking copy waits for the GPU's queue to drain)."""
    index, weight = interpolation_taps(src, dst, antialias)
    return index.to(device), weight.to(device)


@functools.lru_cache(maxsize=64)
def patch_taps(src: int, dst: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic resampling (no antialias) from ``src`` to ``dst`` samples, grouped by output patch:
    (index (n, L), weight (n, p, L)) for the n = dst // p patches, so that output sample i of patch
    r is Σ_l weight[r, i, l] · input[index[r, l]].

    The L sources of a patch are a contiguous window over all its taps when that is shorter than
    listing the p·k taps one by one (upsampling and mild downsampling, where neighbouring outputs
    share most taps: ~11 sources instead of 56 for 2× up), else the taps themselves. Sources past
    the input's end are clamped and carry zero weight. Computed on the CPU (tiny) and cached.
    """
    index, weight = interpolation_taps(src, dst, antialias=False)  # (dst, k); unused slots weigh 0
    p, k = patch_size, index.shape[1]
    n = dst // p
    index, weight = index[:n * p].view(n, p, k), weight[:n * p].view(n, p, k)
    real = weight != 0
    start = torch.where(real, index, src).flatten(1).min(1).values  # (n,)
    span = int((torch.where(real, index, -1).flatten(1).max(1).values - start).max()) + 1
    if span < p * k:
        sources = (start[:, None] + torch.arange(span)).clamp(max=src - 1)
        offset = torch.where(real, index - start[:, None, None], 0)
        dense = torch.zeros(n, p, span).scatter_add_(2, offset, weight)
        return sources, dense
    sources = index.reshape(n, p * k)  # one column per (output, tap): a block-diagonal weight
    dense = torch.zeros(n, p, p, k)
    dense[:, torch.arange(p), torch.arange(p)] = weight
    return sources, dense.view(n, p, p * k)


@functools.lru_cache(maxsize=64)
def patch_taps_on(src: int, dst: int, patch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_taps`` already on ``device`` (copied once: no host-to-device copy in a forward pass)."""
    index, weight = patch_taps(src, dst, patch_size)
    return index.to(device), weight.to(device)


# Bytes of source pixels one chunk of ``resize_patches`` gathers, at most (~8 MB keeps each chunk
# in the allocator's reused memory rather than fresh pages).
PATCH_GATHER_BYTES = 8 * 2**20


def resize_patches(images: torch.Tensor, size: tuple[int, int], patch_size: int, batch: torch.Tensor,
                   rows: torch.Tensor, cols: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Patches of ``F.interpolate(images, size, mode="bicubic")`` at cells (rows, cols) of the
    resized image's patch grid, computed without resizing the whole image.

    images: (B, 3, H, W); batch/rows/cols: (N,) long. Returns (N, 3·p·p) in float32, laid out as
    (channel, row, col) like a conv weight. Each patch gathers its (L_y, L_x) source pixels
    (``patch_taps``) and mixes them with two small matmuls (the resize is separable). Cost and
    memory follow N, not the target size: one look at 4K costs what it costs at 1.5K. ``chunk``:
    patches per gather (default: ~8 MB of source pixels).
    """
    p = patch_size
    device = images.device
    iy, wy = patch_taps_on(images.shape[-2], size[0], p, device)
    ix, wx = patch_taps_on(images.shape[-1], size[1], p, device)
    ly, lx = iy.shape[1], ix.shape[1]
    chunk = chunk or max(1, PATCH_GATHER_BYTES // (ly * lx * 3 * 4))
    out = []
    for start in range(0, batch.numel(), chunk):
        b, r, c = batch[start:start + chunk], rows[start:start + chunk], cols[start:start + chunk]
        # (n, L_y, L_x, 3), gathered in the input's dtype and only then widened (exactly): no
        # float32 copy of the whole full-resolution image.
        pix = images[b[:, None, None], :, iy[r][:, :, None], ix[c][:, None, :]].float()
        n = pix.shape[0]
        by_rows = torch.bmm(wy[r], pix.view(n, ly, lx * 3)).view(n, p, lx, 3)  # (n, p, L_x, 3)
        by_rows = by_rows.permute(0, 3, 1, 2).reshape(n, 3 * p, lx)
        patch = torch.bmm(by_rows, wx[c].transpose(1, 2))  # (n, 3·p, p): (channel, row, col)
        out.append(patch.reshape(n, -1))
    return torch.cat(out) if out else images.new_zeros(0, 3 * p * p, dtype=torch.float32)


class VisionTransformer(nn.Module):
    """The trunk: patch embedding, absolute position table, pre-norm blocks, final norm, pooling.

    ``radio`` (a C-RADIO trunk, ``ps3.encoder.radio``): the position table is cropped, never
    resampled; the final norm is dropped unless the spec keeps it; pooling runs the adapter MLP
    ``siglip_proj`` and a MAP pool of the adapter's width."""

    def __init__(self, arch: ViTArch, crop_pos_embed: bool = False, radio: RadioSpec | None = None):
        super().__init__()
        self.arch = arch
        self.patch_size = arch.patch_size
        self.embed_dim = arch.embed_dim
        self.crop_pos_embed = crop_pos_embed or radio is not None
        self.patch_embed = PatchEmbed(arch.patch_size, arch.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.pos_grid * arch.pos_grid, arch.embed_dim))
        self.blocks = nn.ModuleList([Block(arch) for _ in range(arch.depth)])
        keep_norm = radio is None or radio.final_norm
        self.norm = nn.LayerNorm(arch.embed_dim, eps=arch.norm_eps) if keep_norm else nn.Identity()
        self.siglip_proj = radio.adapter() if radio is not None else None
        pool_arch = radio.pool_arch(arch) if radio is not None else arch
        #: Width of the pooled feature: the trunk's, or a RADIO adapter's output.
        self.pooled_dim = pool_arch.embed_dim
        if pool_arch.global_pool == "map":
            self.attn_pool = AttentionPoolLatent(pool_arch)
        elif pool_arch.global_pool == "avg":
            self.attn_pool = None
        else:
            raise ValueError(f"global_pool must be 'map' or 'avg', got {arch.global_pool!r}")
        self.grad_checkpointing = False
        # timm's starting values, for training from scratch (loading a checkpoint overwrites them).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=pool_arch.embed_dim ** -0.5)

    @property
    def pos_table(self) -> torch.Tensor:
        g = self.arch.pos_grid
        return self.pos_embed.view(g, g, self.embed_dim)

    def pos_embed_grid(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w) grid, (h·w, C)."""
        return resample_grid(self.pos_table, h, w, self.crop_pos_embed).reshape(h * w, self.embed_dim)

    def pos_embed_at(self, h: int, w: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Position embeddings of an (h, w) grid read at cells (rows, cols), any index shape → (..., C).

        Same values as ``pos_embed_grid(h, w)[rows * w + cols]`` but only the needed cells are
        evaluated, so a 270×270 grid at 4K never materialises its 300 MB table.
        """
        table = self.pos_table
        g = table.shape[0]
        if (h == w == g) or self.crop_pos_embed:
            return table[rows, cols]
        index, weight = interpolation_taps_on(g, max(h, w), True, table.device)
        # Resample along rows for the whole table once (n, g, C), then mix each cell's column taps.
        dense = torch.zeros(index.shape[0], g, device=table.device).scatter_add_(1, index, weight)
        by_row = (dense @ table.float().reshape(g, -1)).view(-1, g, table.shape[-1])
        taps = by_row[rows.unsqueeze(-1), index[cols]]  # (..., k, C)
        return torch.einsum("...k,...kc->...c", weight[cols], taps).to(table.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Full-image tokens with position embeddings: (B, 3, H, W) → (B, h·w, C)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.patch_embed(x) + self.pos_embed_grid(h, w).to(x.dtype)

    def forward_blocks(self, x: torch.Tensor, kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       return_kv: bool = False, keep_hidden: int = 0, prefix_rows: torch.Tensor | None = None,
                       key_mask: torch.Tensor | None = None):
        """Run all blocks. Returns (final tokens, kept hidden states, per-layer own (k, v)).

        ``keep_hidden`` = how many of the last block outputs to keep (0 keeps none).
        ``kv_cache`` gives each layer a (k, v) prefix to attend over in addition to ``x``; with
        ``prefix_rows`` (B,) row r takes prefix row ``prefix_rows[r]``. ``key_mask`` (B, prefix + N)
        bool limits which keys each row attends to (padding of packed rows).
        """
        hidden: list[torch.Tensor] = []
        kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        first_kept = len(self.blocks) - keep_hidden
        for i, block in enumerate(self.blocks):
            prefix = kv_cache[i] if kv_cache is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, x, prefix, return_kv, prefix_rows, key_mask, use_reentrant=False)
            else:
                out = block(x, prefix, return_kv, prefix_rows, key_mask)
            if return_kv:
                x, kv = out
                kvs.append(kv)
            else:
                x = out
            if i >= first_kept:
                hidden.append(x)
        return x, hidden, kvs

    def pool(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm (and a RADIO adapter) then MAP (or masked mean) pooling: (B, N, C) → (B, C')."""
        x = self.norm(x)
        if self.siglip_proj is not None:
            x = self.siglip_proj(x)
        if self.attn_pool is not None:
            return self.attn_pool(x, key_mask)
        if key_mask is None:
            return x.mean(1)
        keep = (key_mask | ~key_mask.any(1, keepdim=True)).to(x.dtype).unsqueeze(-1)
        return (x * keep).sum(1) / keep.sum(1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (activation checkpointing) when ``enable``."""
        self.grad_checkpointing = bool(enable)


def trunk_from_config(config: PS3VisionConfig) -> VisionTransformer:
    """The trunk a config describes; ``img_size`` (upstream passes it to timm) sizes the position
    table. A C-RADIO trunk crops that table, so it must cover the largest scale's grid."""
    arch = arch_from_config(config.model_name, config.vit, getattr(config, "img_size", None))
    radio = RadioSpec.from_config(config, arch.embed_dim)
    if radio is not None and max(config.ps3_scales) // arch.patch_size > arch.pos_grid:
        raise ValueError(f"a C-RADIO trunk crops its {arch.pos_grid}x{arch.pos_grid} position table, which is smaller "
                         f"than the {max(config.ps3_scales)} px scale's grid: set img_size to at least "
                         f"{max(config.ps3_scales)}")
    return VisionTransformer(arch, radio=radio)
