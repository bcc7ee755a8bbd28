"""The PS3 vision encoder (SPEC §2–3): a low-res pass over the whole image, selection of the
important high-res cells (bottom-up from a learned prior prompt, or top-down from a text/LLM
prompt), and encoding of only those cells at 756–3780 px, attending to the cached low-res keys
and values.

Module names mirror the published checkpoints (``vision_model.trunk``, ``selection_feature_proj``,
``prior_prompt``, ``pos_emb_residual``, ``highres_selection_feature_module``,
``prompt_proj_for_highres``) so they load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PS3VisionConfig
from .cuda_graphs import GraphedBlocks
from .hub import PretrainedMixin
from .selection import (LookPlan, TokenCount, default_budgets, plan_looks, scale_feature_sizes, scale_image_size,
                        select_cells)
from .vit import Mlp, VisionTransformer, arch_from_config, resize_patches

# The high-res selection module always sees the image at this size, whatever the scales (SPEC §3.4).
HIGHRES_SELECTION_SIZE = 1512


@dataclass
class PS3VisionOutput:
    """What a PS3 vision call returns. Lists run over the high-res scales unless noted.

    last_hidden_state: (B, h_0·w_0 + N_selected, C): low-res tokens then the selected high-res
        tokens (scales ascending, row-major); block outputs, before the trunk's final norm.
    hidden_states: those tokens for each returned layer (the last ``num_hidden_layers_to_return``).
    pooled_output: (B, C). Pre-training mode: pooled high-res look tokens (or low-res ones for
        global-text samples). Inference: the low-res pooled feature.
    selection_maps: (B, h_i, w_i) 0/1 maps of the encoded cells (None for a low-res-only call).
    selection_probs: (B, h_i, w_i) probabilities used for selection (after gt maps / smoothing).
    bottomup_selection_probs / topdown_selection_probs: from the prior prompt / the given prompt.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    pooled_output: torch.Tensor | None = None
    selection_maps: list[torch.Tensor] | None = None
    selection_probs: list[torch.Tensor] | None = None
    bottomup_selection_probs: list[torch.Tensor] | None = None
    topdown_selection_probs: list[torch.Tensor] | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass
class LowResPass:
    """Everything the low-res pass yields that does not depend on the prompt (SPEC §3.2–3.4):
    made by :meth:`PS3VisionEncoder.encode_low_res` and given back to ``forward(..., low_res=)`` so
    that a second call on the same images (e.g. with a prompt an LLM derived from the low-res
    tokens) skips the low-res trunk pass and the selection features.

    hidden_states: block outputs of every layer, each (B, h_0·w_0, C).
    kv_cache: per layer the low-res (k, v), each (B, heads, h_0·w_0, C/heads); None when the pass
        was run with ``keep_kv=False`` (enough for low-res-only calls and selection).
    pooled_output: (B, C) low-res pooled feature (final norm + MAP pooling).
    selection_features: (B, S-1, C, h_0, w_0) projected features scored against prompts.
    highres_selection_features: (B, o, 1512/k, 1512/k) from the 1512 px ConvNet, or None.
    image_sizes: (H, W) of each input image, to check the pass is reused on the same images.
    """

    hidden_states: list[torch.Tensor]
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    pooled_output: torch.Tensor
    selection_features: torch.Tensor
    highres_selection_features: torch.Tensor | None
    image_sizes: list[tuple[int, int]]

    @property
    def batch_size(self) -> int:
        return self.pooled_output.shape[0]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → MLP (4×) → layer scale (stored as ``weight``) → residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + y * self.weight.view(1, -1, 1, 1)


class HighresSelectionFeatures(nn.Module):
    """A shallow ConvNet on the 1512 px image: fine detail the low-res ViT tokens cannot see."""

    def __init__(self, hidden: int, out: int, depth: int, kernel: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, hidden, kernel_size=kernel, stride=kernel), LayerNorm2d(hidden, eps=1e-6))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden) for _ in range(depth)])
        self.out_proj = nn.Conv2d(hidden, out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.blocks(self.stem(x)))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize computed in float32, returned in the input's dtype (a no-op at the same size:
    bicubic weights at zero offset are exactly (0, 1, 0, 0))."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.dtype == torch.float32:
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    # One channel at a time: a float32 copy of a whole 3780 px bf16 image would be 171 MB, the
    # largest transient of a 4K call. Channels resample independently, so this is exact.
    return torch.cat([F.interpolate(x[:, c:c + 1].float(), size=size, mode="bicubic", align_corners=False)
                      .to(x.dtype) for c in range(x.shape[1])], dim=1)


def _check_vision_config(config: PS3VisionConfig, patch: int) -> None:
    scales = list(config.ps3_scales)
    if len(scales) < 2:
        raise ValueError(f"ps3_scales needs a low-res and at least one high-res scale, got {scales}")
    if scales != sorted(scales):
        raise ValueError(f"ps3_scales must be ascending, got {scales}")
    bad = [s for s in scales if s % patch]
    if bad:
        raise ValueError(f"ps3_scales {bad} are not multiples of the patch size {patch}")
    depth = arch_from_config(config.model_name, config.vit).depth
    if any(not 0 <= i < depth for i in config.select_based_on_layer):
        raise ValueError(f"select_based_on_layer {config.select_based_on_layer} must index the {depth} blocks")
    if config.radio:
        raise ValueError("radio=True (C-RADIO backbones) is not supported by this release")


class PS3VisionEncoder(nn.Module):
    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        self.config = config
        arch = arch_from_config(config.model_name, config.vit)
        _check_vision_config(config, arch.patch_size)
        if arch.embed_dim != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} does not match the backbone width {arch.embed_dim}")
        self.trunk = VisionTransformer(arch, crop_pos_embed=bool(config.radio))
        self.width = arch.embed_dim
        self.layers = arch.depth
        self.patch_size = arch.patch_size
        self.ps3_scales = list(config.ps3_scales)
        n_high = len(self.ps3_scales) - 1
        self.max_select_num_each_scale = default_budgets(config.max_select_num, self.ps3_scales,
                                                         config.max_select_num_each_scale)
        # How many of the last layers' hidden states a call returns (None: all). A 4K "all" call
        # keeping every layer holds 27 × 88,209 × 1,152 floats (~11 GB in float32).
        self.num_hidden_layers_to_return: int | None = None
        # At most this many high-res tokens go through the trunk in one batched pass of looks.
        # None: several looks per pass on a GPU (fuller kernels), one look per pass on a CPU
        # (measured slower batched there: larger working sets, no idle compute to fill).
        self.max_tokens_per_pass: int | None = None
        # Replay the trunk from CUDA graphs in GPU inference (see ps3.cuda_graphs): far fewer
        # kernel launches, at the cost of one capture per new input shape and its memory.
        self.use_cuda_graphs = False
        self._graphed_blocks: GraphedBlocks | None = None
        n_sel = len(config.select_based_on_layer)
        self.selection_feature_proj = Mlp(self.width * n_sel, self.width * n_sel, self.width * n_high,
                                          hidden_norm_eps=1e-5)
        self.prior_prompt = nn.Parameter(torch.randn(self.width))
        if config.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                [nn.Parameter(torch.zeros(1, (s // self.patch_size) ** 2, self.width)) for s in self.ps3_scales[1:]])
        else:
            self.pos_emb_residual = None
        if config.highres_selection_feature:
            out_dim = config.highres_selection_module_out_dim
            self.highres_selection_feature_module = HighresSelectionFeatures(
                config.highres_selection_module_hidden_dim, out_dim, config.highres_selection_module_depth,
                config.highres_selection_module_kernel_size)
            self.prompt_proj_for_highres = nn.Linear(self.width, out_dim * n_high)
        else:
            self.highres_selection_feature_module = None
            self.prompt_proj_for_highres = None

    # ----------------------------------------------------------------- sizes and token counts
    @property
    def low_res_token_num(self) -> int:
        return (self.ps3_scales[0] // self.patch_size) ** 2

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return scale_feature_sizes(height, width, self.ps3_scales, self.patch_size)

    def plan(self, height: int, width: int, batch_size: int = 1, num_look_close=None, num_token_look_close=None,
             only_select_first_n_scale=None, pretraining: bool = False) -> LookPlan:
        return plan_looks(self.feature_sizes(height, width)[1:], self.max_select_num_each_scale, batch_size,
                          num_look_close, num_token_look_close, only_select_first_n_scale, pretraining)

    def count_tokens(self, height: int, width: int, num_look_close=None, num_token_look_close=None,
                     only_select_first_n_scale: int | None = None) -> TokenCount:
        """Tokens per scale a call returns for a height × width image, without running the model."""
        plan = self.plan(height, width, 1, num_look_close, num_token_look_close, only_select_first_n_scale)
        per_scale = plan.tokens_per_scale(0) if plan.num_looks else [0] * (len(self.ps3_scales) - 1)
        return TokenCount(self.low_res_token_num, per_scale, plan.num_looks)

    # ----------------------------------------------------------------- selection probabilities
    def _prompt_probs(self, feats: torch.Tensor, highres: torch.Tensor | None, prompt: torch.Tensor,
                      sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Cosine score of every cell against ``prompt`` → per high-res scale probability map."""
        logits = (F.normalize(feats, dim=2) * F.normalize(prompt, dim=-1)[:, None, :, None, None]).sum(2)
        if highres is not None:
            q = self.prompt_proj_for_highres(prompt).view(prompt.shape[0], len(self.ps3_scales) - 1, -1)
            fine = (F.normalize(highres, dim=1).unsqueeze(1) * F.normalize(q, dim=-1)[..., None, None]).sum(2)
            logits = (logits + F.adaptive_max_pool2d(fine, logits.shape[-2:])) / 2
        probs = torch.sigmoid((logits * 5.0).clamp(-10, 10))
        # Every scale reads the first high-res slot (as the published models were trained).
        first = probs[:, :1].float()
        return [F.interpolate(first, size=size, mode="nearest").squeeze(1).to(probs.dtype) for size in sizes]

    def selection_features(self, pixel_values: torch.Tensor, low_res_hidden: Sequence[torch.Tensor]):
        """Prompt-independent selection features: (F (B, S-1, C, h_0, w_0), G or None) (SPEC §3.3–3.4)."""
        B = pixel_values.shape[0]
        h0 = w0 = self.ps3_scales[0] // self.patch_size
        n_high = len(self.ps3_scales) - 1
        feats = torch.cat([low_res_hidden[i] for i in self.config.select_based_on_layer], dim=-1)
        feats = self.selection_feature_proj(feats).view(B, h0, w0, n_high, self.width).permute(0, 3, 4, 1, 2)
        highres = None
        if self.highres_selection_feature_module is not None:
            image = _resize(pixel_values, (HIGHRES_SELECTION_SIZE, HIGHRES_SELECTION_SIZE))
            highres = self.highres_selection_feature_module(image)
        return feats, highres

    def selection_probs(self, pixel_values: torch.Tensor, low_res_hidden: Sequence[torch.Tensor],
                        prompt: torch.Tensor | None = None, gt_selection_maps: torch.Tensor | None = None,
                        smooth_selection_prob: bool = False):
        """(selection probs, bottom-up probs, top-down probs or None), each a list over high-res scales."""
        feats, highres = self.selection_features(pixel_values, low_res_hidden)
        return self._probs(feats, highres, self.feature_sizes(*pixel_values.shape[-2:]), prompt, gt_selection_maps,
                           smooth_selection_prob)

    def _probs(self, feats, highres, sizes, prompt, gt_selection_maps, smooth_selection_prob):
        B = feats.shape[0]
        bottomup = self._prompt_probs(feats, highres, self.prior_prompt.expand(B, -1), sizes[1:])
        topdown = self._prompt_probs(feats, highres, prompt, sizes[1:]) if prompt is not None else None
        probs = topdown if topdown is not None else bottomup
        if gt_selection_maps is not None:
            # Resized values go back to the caller's dtype (as upstream does): an integer map keeps
            # only the cells it fully covers at scale 1, a float map keeps partial ones too.
            dtype = gt_selection_maps.dtype
            gt = F.interpolate(gt_selection_maps.unsqueeze(1).float(), size=sizes[1], mode="area").to(dtype)
            gt = [F.interpolate(gt.float(), size=size, mode="nearest").squeeze(1).to(dtype) for size in sizes[1:]]
            probs = [torch.where(g > 0, torch.ones_like(p), p) for g, p in zip(gt, probs)]
        if smooth_selection_prob:
            probs = [F.interpolate(F.interpolate(p.unsqueeze(1), size=(6, 6), mode="area"), size=p.shape[-2:],
                                   mode="nearest").squeeze(1) for p in probs]
        return probs, bottomup, topdown

    # ----------------------------------------------------------------- tokenising selected cells
    def _embed_cells(self, pixel_values: torch.Tensor, sizes: Sequence[tuple[int, int]],
                     counts: Sequence[Sequence[int]], canvas_index: torch.Tensor) -> torch.Tensor:
        """Tokens (R, T, C) for the cells at ``canvas_index`` (R, T) of the canvas of all high-res
        cells (scales ascending, row-major): patch embedding of the cell's pixels at its scale +
        trunk position embedding resampled to the scale's grid + the scale's residual embedding.

        Rows may hold several looks stacked look-major (row r is image r % B). ``counts[s][r]`` is
        how many of row r's cells lie at scale s (known from the look plan): canvas order puts
        them in one run per scale, so each scale embeds only its own cells. Only the selected
        patches are resized (``resize_patches``), so no full-resolution copy is ever made.
        """
        R, T = canvas_index.shape
        B, _, H, W = pixel_values.shape
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
                batch = (torch.arange(R, device=device) % B).unsqueeze(1).expand(R, k)
                image_size = scale_image_size(H, W, self.ps3_scales, self.patch_size, s + 1)
                pix = resize_patches(pixel_values, image_size, self.patch_size, batch.reshape(-1), rows.reshape(-1),
                                     cols_in_grid.reshape(-1)).to(pixel_values.dtype).view(R, k, -1)
                tok = self.trunk.patch_embed.embed_patches(pix)
                tok = tok + self.trunk.pos_embed_at(h, w, rows, cols_in_grid)
                if self.pos_emb_residual is not None:
                    side = self.ps3_scales[s + 1] // self.patch_size
                    tok = tok + self.pos_emb_residual[s].view(side, side, self.width)[rows, cols_in_grid]
                if out is None:
                    out = tok.new_zeros(R, T + 1, tok.shape[-1])
                out = out.scatter(1, cols.unsqueeze(-1).expand(-1, -1, tok.shape[-1]), tok)
            first = [f + n for f, n in zip(first, ks)]
            cell_start += h * w
        return out[:, :T]

    # ----------------------------------------------------------------- forward
    def _blocks(self, x: torch.Tensor, kv_cache=None, return_kv: bool = False, keep_hidden: int = 0):
        """The trunk's blocks: replayed from CUDA graphs when ``use_cuda_graphs`` is on and the
        call is no-grad inference on a GPU, eager otherwise."""
        if self.use_cuda_graphs and x.is_cuda and not torch.is_grad_enabled() and not self.training:
            if self._graphed_blocks is None:
                self._graphed_blocks = GraphedBlocks(self.trunk)
            return self._graphed_blocks(x, kv_cache=kv_cache, return_kv=return_kv, keep_hidden=keep_hidden)
        return self.trunk.forward_blocks(x, kv_cache=kv_cache, return_kv=return_kv, keep_hidden=keep_hidden)

    def forward_low_res(self, pixel_values: torch.Tensor, keep_kv: bool = True):
        """Low-res pass: (block outputs of every layer, per-layer (k, v), pooled feature)."""
        s0 = self.ps3_scales[0]
        tokens = self.trunk.embed(_resize(pixel_values, (s0, s0)))
        x, hidden, kvs = self._blocks(tokens, return_kv=keep_kv, keep_hidden=self.layers)
        return hidden, kvs, self.trunk.pool(x)

    def encode_low_res(self, pixel_values: torch.Tensor, keep_kv: bool = True) -> LowResPass:
        """The low-res pass and the prompt-independent selection features, to reuse across calls
        on the same images: ``forward(pixel_values, ..., low_res=encoder.encode_low_res(pixel_values))``
        equals ``forward(pixel_values, ...)``. ``keep_kv=False`` drops the key/value cache (enough
        for low-res-only calls; a call with looks then raises)."""
        self._check_pixels(pixel_values)
        hidden, kvs, pooled = self.forward_low_res(pixel_values, keep_kv=keep_kv)
        feats, highres = self.selection_features(pixel_values, hidden)
        return LowResPass(hidden, kvs if keep_kv else None, pooled, feats, highres,
                          [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0])

    def _check_low_res(self, low_res, pixel_values: torch.Tensor, needs_kv: bool) -> None:
        if not isinstance(low_res, LowResPass):
            raise TypeError(f"low_res must be a LowResPass from encode_low_res, got {type(low_res).__name__}")
        sizes = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        if low_res.image_sizes != sizes:
            raise ValueError(f"low_res was computed for images of sizes {low_res.image_sizes}, not for these "
                             f"pixel_values {sizes}: pass the LowResPass of the same images")
        if needs_kv and low_res.kv_cache is None:
            raise ValueError("low_res has no key/value cache (encode_low_res(..., keep_kv=False)) but this call "
                             "encodes looks: compute it with keep_kv=True")

    def format_features_into_feature_maps(self, features: torch.Tensor,
                                          selection_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens (B, N, C) → one (B, C, h_i, w_i) map per scale (low-res first), zero where a cell
        was not selected."""
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, C), got shape {tuple(features.shape)}")
        B, N, C = features.shape
        side = self.ps3_scales[0] // self.patch_size
        maps = [torch.ones(B, side, side, dtype=torch.bool, device=features.device)]
        maps += [m.to(features.device).bool() for m in selection_maps]
        flat = torch.cat([m.flatten(1) for m in maps], dim=1)
        expected = flat.sum(1)
        if not torch.equal(expected, torch.full_like(expected, N)):
            raise ValueError(f"features hold {N} tokens per sample but the selection maps mark "
                             f"{expected.tolist()} cells (incl. {side * side} low-res)")
        # Selected cells, in canvas order, receive the tokens in order.
        order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :N]
        canvas = features.new_zeros(B, flat.shape[1], C)
        canvas.scatter_(1, order.unsqueeze(-1).expand(B, N, C), features)
        out, start = [], 0
        for m in maps:
            h, w = m.shape[-2:]
            out.append(canvas[:, start:start + h * w].reshape(B, h, w, C).permute(0, 3, 1, 2))
            start += h * w
        return out

    def _check_pixels(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor (B, 3, H, W), got {type(pixel_values).__name__}; "
                            "use PS3ImageProcessor to turn images into pixel values")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor (normalised pixels), got {pixel_values.dtype}")
        B, _, H, W = pixel_values.shape
        if B == 0 or min(H, W) < self.patch_size:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} is empty or smaller than one patch")

    def _check_inputs(self, pixel_values, prompt, gt_selection_maps, is_global_text, num_layers, max_tokens,
                      check_finite) -> None:
        self._check_pixels(pixel_values)
        B = pixel_values.shape[0]
        if prompt is not None:
            if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != B:
                raise ValueError(f"prompt must be a (B={B}, {self.width}) tensor, got "
                                 f"{tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}")
            if prompt.shape[1] != self.width:
                raise ValueError(f"prompt has width {prompt.shape[1]} but the vision tower expects {self.width}: "
                                 "use the prompt of a text tower trained with this vision tower")
        if gt_selection_maps is not None:
            if not isinstance(gt_selection_maps, torch.Tensor) or gt_selection_maps.dim() != 3 \
                    or gt_selection_maps.shape[0] != B:
                raise ValueError(f"gt_selection_maps must be a (B={B}, H, W) tensor of 0/1, got "
                                 f"{tuple(gt_selection_maps.shape) if isinstance(gt_selection_maps, torch.Tensor) else type(gt_selection_maps).__name__}")
        if is_global_text is not None:
            if not isinstance(is_global_text, torch.Tensor) or is_global_text.numel() != B:
                raise ValueError(f"is_global_text must be a (B={B}, 1) bool tensor")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"num_hidden_layers_to_return must be a positive int, got {num_layers!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens_per_pass must be a positive int, got {max_tokens!r}")
        if check_finite:
            for name, t in (("pixel_values", pixel_values), ("prompt", prompt)):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains NaN or Inf")

    def forward(self, pixel_values: torch.Tensor, prompt: torch.Tensor | None = None,
                gt_selection_maps: torch.Tensor | None = None, is_global_text: torch.Tensor | None = None,
                output_hidden_states: bool = True, pool_gt_token_only: bool = False, num_look_close=None,
                num_token_look_close=None, smooth_selection_prob: bool = False, only_select_first_n_scale=None,
                num_hidden_layers_to_return: int | None = None, max_tokens_per_pass: int | None = None,
                check_finite: bool = False, low_res: LowResPass | None = None) -> PS3VisionOutput:
        self._check_inputs(pixel_values, prompt, gt_selection_maps, is_global_text, num_hidden_layers_to_return,
                           max_tokens_per_pass, check_finite)
        x = pixel_values
        B, _, H, W = x.shape
        sizes = self.feature_sizes(H, W)
        pretraining = not output_hidden_states
        plan = plan_looks(sizes[1:], self.max_select_num_each_scale, B, num_look_close, num_token_look_close,
                          only_select_first_n_scale, pretraining)
        if low_res is None:
            low_res = self.encode_low_res(x, keep_kv=plan.num_looks > 0)
        else:
            self._check_low_res(low_res, x, needs_kv=plan.num_looks > 0)
        low_hidden, low_kv, low_pooled = low_res.hidden_states, low_res.kv_cache, low_res.pooled_output
        probs, bottomup, topdown = self._probs(low_res.selection_features, low_res.highres_selection_features,
                                               sizes, prompt, gt_selection_maps, smooth_selection_prob)
        keep = num_hidden_layers_to_return or self.num_hidden_layers_to_return or self.layers
        keep = min(keep, self.layers)
        out = PS3VisionOutput(selection_probs=probs, bottomup_selection_probs=bottomup,
                              topdown_selection_probs=topdown, pooled_output=low_pooled)
        if plan.num_looks == 0:
            out.hidden_states = tuple(low_hidden[-keep:])
            out.last_hidden_state = low_hidden[-1]
            return out

        # Which cells each look takes: cheap, so all looks are planned before any is encoded.
        with torch.no_grad():
            taken = [torch.zeros(B, h, w, dtype=torch.bool, device=x.device) for h, w in sizes[1:]]
            looks = []
            for budgets in plan.budgets:
                new = select_cells(probs, taken if looks else None, budgets)
                taken = [t | n for t, n in zip(taken, new)]
                looks.append(new)
        out.selection_maps = [t.long() for t in taken]
        tokens_per_look = plan.tokens_per_look()
        for j, counts in enumerate(tokens_per_look):
            if len(set(counts)) > 1:
                raise ValueError(f"look {j} selects {counts} tokens for the samples of this batch; samples with "
                                 "different only_select_first_n_scale must select equal totals: encode them separately")
        canvas = [torch.cat([m.flatten(1) for m in look], 1) for look in looks]
        order = [torch.argsort((~c).to(torch.int8), dim=1, stable=True)[:, :tokens_per_look[j][0]]
                 for j, c in enumerate(canvas)]

        if pretraining:
            tokens = self._embed_cells(x, sizes[1:], plan.budgets[0], order[0])
            y, _, _ = self.trunk.forward_blocks(tokens, kv_cache=low_kv)
            mask = None
            if pool_gt_token_only:
                if gt_selection_maps is None:
                    raise ValueError("pool_gt_token_only=True needs gt_selection_maps")
                gt = torch.cat([F.interpolate(gt_selection_maps.unsqueeze(1).float(), size=s, mode="area")
                                .to(gt_selection_maps.dtype).flatten(1) for s in sizes[1:]], dim=1)
                mask = gt.gather(1, order[0]) > 0
            pooled = self.trunk.pool(y, mask)
            if is_global_text is not None:
                pooled = torch.where(is_global_text.view(B, 1).bool(), low_pooled, pooled)
            out.pooled_output = pooled
            return out

        # Looks only see the low-res cache and themselves, so several go through the trunk as one
        # batch (looks stacked on the batch dimension), up to max_tokens_per_pass tokens per pass.
        budget = max_tokens_per_pass or self.max_tokens_per_pass or (16384 if x.device.type == "cuda" else 1)
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(keep)]
        j = 0
        while j < len(order):
            T = order[j].shape[1]
            n = 1
            while j + n < len(order) and order[j + n].shape[1] == T and (n + 1) * T * B <= budget:
                n += 1
            index = torch.cat(order[j:j + n], dim=0)
            counts = [[k for look in plan.budgets[j:j + n] for k in look[i]] for i in range(len(sizes) - 1)]
            tokens = self._embed_cells(x, sizes[1:], counts, index)
            # Row r of the pass is image r % B: each layer broadcasts the low-res cache to the rows.
            _, hidden, _ = self._blocks(tokens, kv_cache=low_kv, keep_hidden=keep)
            for layer, h in enumerate(hidden):
                per_layer[layer].extend(h.split(B, dim=0))
            j += n
        # Every look's tokens go back to canvas order: one stable sort of their canvas positions.
        positions = torch.cat(order, dim=1)
        back = positions.argsort(dim=1)
        hidden_states = []
        for layer, parts in enumerate(per_layer):
            h = torch.cat(parts, dim=1)
            h = h.gather(1, back.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            hidden_states.append(torch.cat([low_hidden[self.layers - keep + layer], h], dim=1))
        out.hidden_states = tuple(hidden_states)
        out.last_hidden_state = hidden_states[-1]
        return out

    # ----------------------------------------------------------------- upstream names (VILA-HD calls these)
    @property
    def s3_scales(self) -> list[int]:
        """Upstream's older name for ``ps3_scales``."""
        return self.ps3_scales

    @property
    def s3_image_size(self) -> int:
        """The largest scale (upstream's name)."""
        return self.ps3_scales[-1]

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the trunk recomputes block activations in the backward pass (upstream's name)."""
        return self.trunk.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.trunk.grad_checkpointing = bool(enable)


class PS3VisionModel(PretrainedMixin, nn.Module):
    """PS3 vision tower with ``from_pretrained`` / ``save_pretrained`` (keys ``vision_model.*``)."""

    config_class = PS3VisionConfig
    checkpoint_prefixes = ("vision_model.",)

    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        if not isinstance(config, PS3VisionConfig):
            raise TypeError(f"config must be a PS3VisionConfig, got {type(config).__name__}")
        self.config = config
        self.vision_model = PS3VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, num_look_close=None, num_token_look_close=None,
                prompt: torch.Tensor | None = None, gt_selection_maps: torch.Tensor | None = None,
                smooth_selection_prob: bool = False, only_select_first_n_scale=None,
                is_global_text: torch.Tensor | None = None, pool_gt_token_only: bool = False,
                output_hidden_states: bool = True, num_hidden_layers_to_return: int | None = None,
                max_tokens_per_pass: int | None = None, check_finite: bool = False,
                low_res: LowResPass | None = None) -> PS3VisionOutput:
        return self.vision_model(pixel_values, prompt=prompt, gt_selection_maps=gt_selection_maps,
                                 is_global_text=is_global_text, output_hidden_states=output_hidden_states,
                                 pool_gt_token_only=pool_gt_token_only, num_look_close=num_look_close,
                                 num_token_look_close=num_token_look_close,
                                 smooth_selection_prob=smooth_selection_prob,
                                 only_select_first_n_scale=only_select_first_n_scale,
                                 num_hidden_layers_to_return=num_hidden_layers_to_return,
                                 max_tokens_per_pass=max_tokens_per_pass, check_finite=check_finite,
                                 low_res=low_res)

    def encode_low_res(self, pixel_values: torch.Tensor, keep_kv: bool = True) -> LowResPass:
        return self.vision_model.encode_low_res(pixel_values, keep_kv)

    def count_tokens(self, height: int, width: int, num_look_close=None, num_token_look_close=None,
                     only_select_first_n_scale: int | None = None) -> TokenCount:
        return self.vision_model.count_tokens(height, width, num_look_close, num_token_look_close,
                                              only_select_first_n_scale)

    # ----------------------------------------------------------------- upstream names (VILA-HD calls these)
    @property
    def width(self) -> int:
        """The trunk width C (VILA-HD reads it as the vision hidden size)."""
        return self.vision_model.width
