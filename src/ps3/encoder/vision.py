"""The PS3 vision encoder (design §2–3): a low-res pass over the whole image, selection of the
important high-res cells (bottom-up from a learned prior prompt, or top-down from a text/LLM
prompt), and encoding of only those cells at 756–3780 px, attending to the cached low-res keys
and values.

Every entry point builds one :class:`~ps3.encoder.request.EncodeRequest` from its arguments and
runs the one selection pipeline (``ps3.encoder.selection_pipeline``) with a cell rule: two modes
share it, :meth:`~PS3VisionEncoder.encode_looks` (inference: hidden states of the selected
tokens) and :meth:`~PS3VisionEncoder.encode_pooled` (pre-training: one look, pooled);
:meth:`~PS3VisionEncoder.encode_request` takes another rule (``ps3.mllm`` plugs in block-aligned
selection). ``forward`` keeps the upstream spelling (``output_hidden_states=False`` means
pre-training) and dispatches to the modes. Any batch goes in one call: a tensor, or a list of
images of different sizes with per-sample budgets (``ps3.encoder.batching``, ``ps3.encoder.looks``).

Module names mirror the published checkpoints (``vision_model.trunk``, ``selection_feature_proj``,
``prior_prompt``, ``pos_emb_residual``, ``highres_selection_feature_module``,
``prompt_proj_for_highres``) so they load unchanged, and upstream's attribute names
(``s3_scales``, ``s3_image_size``, ``gradient_checkpointing``) answer as VILA-HD reads them.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from .batching import check_images, image_sizes, per_sample
from ..config import PS3VisionConfig
from .cuda_graphs import GraphedBlocks
from ..hub import PretrainedMixin
from .looks import GroupLooks, LookParts, pool_looks, run_looks
from .outputs import LowResPass, PS3VisionOutput, feature_maps
from .precision import float32_fallback
from .request import EncodeRequest
from .selection import LookPlan, TokenCount, default_budgets, plan_looks, scale_feature_sizes
from .selection_features import (HIGHRES_SELECTION_SIZE, HighresSelectionFeatures, bicubic_resize_all,
                                 gt_area_at_cells, highres_features)
from .selection_pipeline import CellRule, TopKCells, select_looks
from .vit import Mlp, arch_from_config, trunk_from_config

__all__ = ["PS3VisionEncoder", "PS3VisionModel", "PS3VisionOutput", "LowResPass", "HIGHRES_SELECTION_SIZE"]


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


class PS3VisionEncoder(nn.Module):
    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        self.config = config
        arch = arch_from_config(config.model_name, config.vit)
        _check_vision_config(config, arch.patch_size)
        if arch.embed_dim != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} does not match the backbone width {arch.embed_dim}")
        self.trunk = trunk_from_config(config)
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
        # Replay the trunk from CUDA graphs in GPU inference (see ps3.encoder.cuda_graphs): far fewer
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

    # ----------------------------------------------------------------- upstream's attribute names
    # VILA-HD reads ``s3_scales`` for its dynamic-aspect-ratio rule and sets ``gradient_checkpointing``.
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

    # ----------------------------------------------------------------- sizes and token counts
    @property
    def low_res_token_num(self) -> int:
        return (self.ps3_scales[0] // self.patch_size) ** 2

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return scale_feature_sizes(height, width, self.ps3_scales, self.patch_size)

    def plan(self, height: int, width: int, batch_size: int = 1, num_look_close=None, num_token_look_close=None,
             only_select_first_n_scale=None, pretraining: bool = False, encoded=None) -> LookPlan:
        return plan_looks(self.feature_sizes(height, width)[1:], self.max_select_num_each_scale, batch_size,
                          num_look_close, num_token_look_close, only_select_first_n_scale, pretraining, encoded)

    def count_tokens(self, height, width: int | None = None, num_look_close=None, num_token_look_close=None,
                     only_select_first_n_scale=None):
        """Tokens per scale a call returns, without running the model: ``count_tokens(H, W, ...)`` →
        a TokenCount; ``count_tokens([(H_1, W_1), …] or [image, …], ...)`` with scalar or per-sample
        arguments → one TokenCount per image."""
        if width is None:
            sizes = [tuple(s.shape[-2:]) if isinstance(s, torch.Tensor) else tuple(s) for s in height]
            args = [per_sample(name, value, len(sizes)) for name, value in (
                ("num_look_close", num_look_close), ("num_token_look_close", num_token_look_close),
                ("only_select_first_n_scale", only_select_first_n_scale))]
            return [self.count_tokens(h, w, *values) for (h, w), *values in zip(sizes, *args)]
        plan = self.plan(height, width, 1, num_look_close, num_token_look_close, only_select_first_n_scale)
        per_scale = plan.tokens_per_scale(0) if plan.num_looks else [0] * (len(self.ps3_scales) - 1)
        return TokenCount(self.low_res_token_num, per_scale, plan.num_looks)

    # ----------------------------------------------------------------- low-res pass
    def _blocks(self, x: torch.Tensor, kv_cache=None, return_kv: bool = False, keep_hidden: int = 0):
        """The trunk's blocks: replayed from CUDA graphs when ``use_cuda_graphs`` is on and the
        call is no-grad inference on a GPU, eager otherwise."""
        if self.use_cuda_graphs and x.is_cuda and not torch.is_grad_enabled() and not self.training:
            if self._graphed_blocks is None:
                self._graphed_blocks = GraphedBlocks(self.trunk)
            return self._graphed_blocks(x, kv_cache=kv_cache, return_kv=return_kv, keep_hidden=keep_hidden)
        return self.trunk.forward_blocks(x, kv_cache=kv_cache, return_kv=return_kv, keep_hidden=keep_hidden)

    def look_parts(self) -> LookParts:
        """The parts encoding looks uses (``ps3.encoder.looks``): patch embedding, position tables,
        the trunk's blocks (graphed or eager) and its pooling."""
        return LookParts(self.trunk.patch_embed, self.trunk.pos_embed_at, self.pos_emb_residual,
                         tuple(self.ps3_scales), self.patch_size, self._blocks, self.trunk.forward_blocks,
                         self.trunk.pool)

    def forward_low_res(self, pixel_values, keep_kv: bool = True):
        """Low-res pass over every image resized to the square s_0 (a tensor or a list of images
        of any sizes): (block outputs of every layer, per-layer (k, v), pooled feature)."""
        s0 = self.ps3_scales[0]
        tokens = self.trunk.embed(bicubic_resize_all(pixel_values, (s0, s0)))
        x, hidden, kvs = self._blocks(tokens, return_kv=keep_kv, keep_hidden=self.layers)
        return hidden, kvs, self.trunk.pool(x)

    def selection_features(self, pixel_values, low_res_hidden: Sequence[torch.Tensor], highres=None):
        """Prompt-independent selection features: (F (B, S-1, C, h_0, w_0), G or None) (design §3.3–3.4).
        ``highres``: G if already computed (``ps3.encoder.selection_features.highres_features``)."""
        B = low_res_hidden[0].shape[0]
        h0 = w0 = self.ps3_scales[0] // self.patch_size
        n_high = len(self.ps3_scales) - 1
        feats = torch.cat([low_res_hidden[i] for i in self.config.select_based_on_layer], dim=-1)
        feats = self.selection_feature_proj(feats).view(B, h0, w0, n_high, self.width).permute(0, 3, 4, 1, 2)
        if highres is None:
            highres = highres_features(self.highres_selection_feature_module, pixel_values)
        return feats, highres

    @float32_fallback
    def encode_low_res(self, pixel_values, keep_kv: bool = True) -> LowResPass:
        """The low-res pass and the prompt-independent selection features, to reuse across calls
        on the same images: ``forward(pixel_values, ..., low_res=encoder.encode_low_res(pixel_values))``
        equals ``forward(pixel_values, ...)``. ``keep_kv=False`` drops the key/value cache (enough
        for low-res-only calls; a call with looks then raises)."""
        check_images(pixel_values)
        # The ConvNet first, image by image, while little else is held (measured faster on a CPU
        # than after the batch's low-res pass, whose caches it would otherwise run beside).
        highres = highres_features(self.highres_selection_feature_module, pixel_values)
        hidden, kvs, pooled = self.forward_low_res(pixel_values, keep_kv=keep_kv)
        feats, highres = self.selection_features(pixel_values, hidden, highres)
        return LowResPass(hidden, kvs if keep_kv else None, pooled, feats, highres, image_sizes(pixel_values))

    def check_low_res(self, low_res, pixel_values, needs_kv: bool) -> None:
        """Raise unless ``low_res`` is a LowResPass of these ``pixel_values`` (with its key/value
        cache when ``needs_kv``: a call that encodes looks attends to it)."""
        if not isinstance(low_res, LowResPass):
            raise TypeError(f"low_res must be a LowResPass from encode_low_res, got {type(low_res).__name__}")
        sizes = image_sizes(pixel_values)
        if low_res.image_sizes != sizes:
            raise ValueError(f"low_res was computed for images of sizes {low_res.image_sizes}, not for these "
                             f"pixel_values {sizes}: pass the LowResPass of the same images")
        if needs_kv and low_res.kv_cache is None:
            raise ValueError("low_res has no key/value cache (encode_low_res(..., keep_kv=False)) but this call "
                             "encodes looks: compute it with keep_kv=True")

    # ----------------------------------------------------------------- the two modes
    def encode_looks(self, pixel_values, *, num_look_close=None, num_token_look_close=None,
                     prompt: torch.Tensor | None = None, gt_selection_maps=None, smooth_selection_prob: bool = False,
                     only_select_first_n_scale=None, num_hidden_layers_to_return: int | None = None,
                     max_tokens_per_pass: int | None = None, check_finite: bool = False,
                     low_res: LowResPass | None = None,
                     old_selection_maps: Sequence[torch.Tensor] | None = None) -> PS3VisionOutput:
        """Inference (design §3.12): the low-res tokens and every selected high-res token, per layer.

        ``pixel_values``: a (B, 3, H, W) tensor or a list of (3, H_i, W_i) images of any sizes.
        ``num_look_close`` / ``num_token_look_close`` / ``only_select_first_n_scale``: a value for
        all images or a list with one per image. ``gt_selection_maps``: (B, H, W) or a list of
        (H, W) maps (or None entries). A mixed call (a list, or samples returning different token
        counts) sets ``lengths`` and zero-pads; ``per_sample()`` splits it into single-image outputs.
        Like upstream's, the output has no pooled feature (see :meth:`encode_looks_with_pooled`).

        Look closer: ``old_selection_maps`` (one (B, h_i, w_i) 0/1 map per high-res scale, e.g. an
        earlier call's ``selection_maps``; larger maps are read at their top-left) marks cells
        encoded before; this call plans and encodes only the other cells, and its
        ``selection_maps`` and tokens cover only the new ones. Pass the earlier ``low_res`` too so
        the low-res trunk does not run again.
        """
        return self.encode_looks_with_pooled(
            pixel_values, num_look_close=num_look_close, num_token_look_close=num_token_look_close, prompt=prompt,
            gt_selection_maps=gt_selection_maps, smooth_selection_prob=smooth_selection_prob,
            only_select_first_n_scale=only_select_first_n_scale,
            num_hidden_layers_to_return=num_hidden_layers_to_return, max_tokens_per_pass=max_tokens_per_pass,
            check_finite=check_finite, low_res=low_res, old_selection_maps=old_selection_maps)[0]

    @float32_fallback
    def encode_looks_with_pooled(self, pixel_values, *, num_look_close=None, num_token_look_close=None,
                                 prompt: torch.Tensor | None = None, gt_selection_maps=None,
                                 smooth_selection_prob: bool = False, only_select_first_n_scale=None,
                                 num_hidden_layers_to_return: int | None = None,
                                 max_tokens_per_pass: int | None = None, check_finite: bool = False,
                                 low_res: LowResPass | None = None,
                                 old_selection_maps: Sequence[torch.Tensor] | None = None,
                                 ) -> tuple[PS3VisionOutput, torch.Tensor]:
        """:meth:`encode_looks`, and the low-res pooled feature (B, C) (final norm + MAP pooling)
        that the upstream-shaped output leaves None, without a second low-res pass."""
        request = EncodeRequest.build(
            pixel_values, width=self.width, check_finite=check_finite, num_look_close=num_look_close,
            num_token_look_close=num_token_look_close, only_select_first_n_scale=only_select_first_n_scale,
            prompt=prompt, gt_selection_maps=gt_selection_maps, smooth_selection_prob=smooth_selection_prob,
            num_hidden_layers_to_return=num_hidden_layers_to_return, max_tokens_per_pass=max_tokens_per_pass,
            low_res=low_res, old_selection_maps=old_selection_maps)
        return self.encode_request(request)

    def encode_request(self, request: EncodeRequest, rule: CellRule | None = None, *,
                       scores: bool = False) -> tuple[PS3VisionOutput, torch.Tensor]:
        """Encode the looks of a built request, their cells chosen by ``rule`` (default: the
        encoder's top-k, :class:`~ps3.encoder.selection_pipeline.TopKCells`; ``ps3.mllm`` plugs in
        its block-aligned rule). Returns (the output, the low-res pooled feature). ``scores``: the
        output keeps the pooled feature and the separate bottom-up/top-down maps (upstream's
        inference output leaves them None)."""
        rule = rule if rule is not None else TopKCells(tuple(self.max_select_num_each_scale))
        selection, low_res = select_looks(self, request, rule)
        if request.low_res is None:  # nobody else holds this pass: free what the looks do not read
            low_res = low_res.for_looks(self._kept_layers(request.num_hidden_layers_to_return))
        hidden, totals = self._run_group_looks(selection.looks, low_res, request.num_hidden_layers_to_return,
                                               request.max_tokens_per_pass)
        pooled = low_res.pooled_output
        return selection.output(request, hidden=hidden, totals=totals, pooled=pooled if scores else None,
                                scores=scores), pooled

    def _kept_layers(self, num_layers: int | None) -> int:
        return min(num_layers or self.num_hidden_layers_to_return or self.layers, self.layers)

    def _run_group_looks(self, looks: Sequence[GroupLooks], low_res: LowResPass, num_layers: int | None,
                         max_tokens: int | None) -> tuple[list[torch.Tensor], list[int]]:
        keep = self._kept_layers(num_layers)
        if not any(gl.plan.num_looks for gl in looks):
            return list(low_res.hidden_states[-keep:]), [self.low_res_token_num] * low_res.batch_size
        # Looks only see the low-res cache and themselves, so several go through the trunk as one
        # batch, up to max_tokens tokens per pass (None: several looks per pass on a GPU, one per
        # pass on a CPU, where batching measured slower: there a mixed batch's looks of other
        # lengths run unpadded, one image's look per pass, `python benchmarks/ragged.py`).
        budget = max_tokens or self.max_tokens_per_pass or (16384 if low_res.pooled_output.is_cuda else 1)
        mixed = len(looks) > 1
        return run_looks(self.look_parts(), looks, low_res, low_res.batch_size, keep, budget,
                         1 if mixed and budget == 1 else None)

    @float32_fallback
    def encode_pooled(self, pixel_values, *, prompt: torch.Tensor | None = None, gt_selection_maps=None,
                      is_global_text: torch.Tensor | None = None, pool_gt_token_only: bool = False,
                      num_token_look_close=None, smooth_selection_prob: bool = False, check_finite: bool = False,
                      low_res: LowResPass | None = None) -> PS3VisionOutput:
        """Pre-training (design §3.14): one look with the full budget (gt maps if given), pooled over
        its high-res tokens after the final norm; ``pool_gt_token_only`` pools over the gt cells
        only; ``is_global_text`` (B, 1) samples take the low-res pooled feature instead."""
        request = EncodeRequest.build(
            pixel_values, width=self.width, check_finite=check_finite, pretraining=True, prompt=prompt,
            gt_selection_maps=gt_selection_maps, is_global_text=is_global_text, pool_gt_token_only=pool_gt_token_only,
            num_token_look_close=num_token_look_close, smooth_selection_prob=smooth_selection_prob, low_res=low_res)
        selection, low_res = select_looks(self, request, TopKCells(tuple(self.max_select_num_each_scale), True))
        looks = selection.looks
        gt_cells = None
        if request.pool_gt_token_only:
            gt_cells = [gt_area_at_cells(gl.group.gt_selection_maps, gl.sizes[1:]).gather(1, gl.order[0]) > 0
                        if gl.group.gt_selection_maps is not None else torch.ones_like(gl.order[0], dtype=torch.bool)
                        for gl in looks]
        B = low_res.batch_size
        pooled = pool_looks(self.look_parts(), looks, low_res, B, gt_cells)
        if request.is_global_text is not None:
            pooled = torch.where(request.is_global_text.view(B, 1).bool(), low_res.pooled_output, pooled)
        return selection.output(request, pooled=pooled)

    def forward(self, pixel_values, num_look_close=None, num_token_look_close=None,
                prompt: torch.Tensor | None = None, gt_selection_maps=None, smooth_selection_prob: bool = False,
                only_select_first_n_scale=None, is_global_text: torch.Tensor | None = None,
                pool_gt_token_only: bool = False, output_hidden_states: bool = True,
                num_hidden_layers_to_return: int | None = None, max_tokens_per_pass: int | None = None,
                check_finite: bool = False, low_res: LowResPass | None = None,
                old_selection_maps: Sequence[torch.Tensor] | None = None) -> PS3VisionOutput:
        """The upstream call (argument order of upstream's ``PS3VisionModel.forward``):
        ``output_hidden_states=True`` is :meth:`encode_looks`, ``False`` is the pre-training mode
        :meth:`encode_pooled`. Arguments a mode does not use are ignored, as upstream does."""
        if not output_hidden_states:
            if old_selection_maps is not None:
                raise ValueError("old_selection_maps is for encoding looks (output_hidden_states=True), "
                                 "not for pre-training pooling")
            return self.encode_pooled(pixel_values, prompt=prompt, gt_selection_maps=gt_selection_maps,
                                      is_global_text=is_global_text, pool_gt_token_only=pool_gt_token_only,
                                      num_token_look_close=num_token_look_close,
                                      smooth_selection_prob=smooth_selection_prob, check_finite=check_finite,
                                      low_res=low_res)
        return self.encode_looks(pixel_values, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
                                 prompt=prompt, gt_selection_maps=gt_selection_maps,
                                 smooth_selection_prob=smooth_selection_prob,
                                 only_select_first_n_scale=only_select_first_n_scale,
                                 num_hidden_layers_to_return=num_hidden_layers_to_return,
                                 max_tokens_per_pass=max_tokens_per_pass, check_finite=check_finite, low_res=low_res,
                                 old_selection_maps=old_selection_maps)

    # ----------------------------------------------------------------- feature maps
    def format_features_into_feature_maps(self, features: torch.Tensor,
                                          selection_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens (B, N, C) → one (B, C, h_i, w_i) map per scale (low-res first), zero where a cell
        was not selected (design §3.13)."""
        return feature_maps(features, selection_maps, self.ps3_scales[0] // self.patch_size)

    def release_cuda_graphs(self) -> None:
        """Turn CUDA-graph replay off and drop the captured graphs, so their memory pool can be freed."""
        self.use_cuda_graphs = False
        self._graphed_blocks = None


def delegate_to_encoder(name: str, as_name: str | None = None):
    """A method calling ``self.vision_model.<name>`` with the same arguments; ``help()`` and
    ``inspect.signature`` show the encoder method's documentation and signature (one signature,
    stated once)."""
    target = getattr(PS3VisionEncoder, name)

    def method(self, *args, **kwargs):
        return getattr(self.vision_model, name)(*args, **kwargs)

    functools.update_wrapper(method, target, assigned=("__doc__",), updated=())
    method.__name__ = method.__qualname__ = as_name or name
    return method


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

    forward = delegate_to_encoder("forward")
    encode_looks = delegate_to_encoder("encode_looks")
    encode_looks_with_pooled = delegate_to_encoder("encode_looks_with_pooled")
    encode_pooled = delegate_to_encoder("encode_pooled")
    encode_low_res = delegate_to_encoder("encode_low_res")
    count_tokens = delegate_to_encoder("count_tokens")

    # ----------------------------------------------------------------- upstream names (VILA-HD calls these)
    @property
    def width(self) -> int:
        """The trunk width C (VILA-HD reads it as the vision hidden size)."""
        return self.vision_model.width
