"""The PS3 text tower (design §4): a CLIP/SigLIP-style text transformer whose pooled output is
turned into the ``prompt`` that steers PS3's top-down selection.

Module names mirror the published checkpoints (``text_model.token_embedding``,
``positional_embedding``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``, ``prompt_proj.{fc1, norm, fc2}``) so
they load unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import PS3TextConfig
from .hub import PretrainedMixin
from .encoder.precision import float32_fallback

POOL_TYPES = ("last", "first", "argmax")


@dataclass
class PS3TextOutput:
    """What a text-tower call returns.

    pooled_output: (B, output_dim) the projected pooled token (the CLIP/SigLIP text embedding).
    prompt: (B, prompt_proj_dim) ``prompt_proj(normalize(pooled_output))``, the vision tower's
        top-down prompt.
    last_hidden_state: (B, N, width) every token after ``ln_final`` (pooling reads one of them).
    """

    pooled_output: torch.Tensor
    prompt: torch.Tensor
    last_hidden_state: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def _gelu_approximate(act_kwargs: Any) -> str:
    approximate = (act_kwargs or {}).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"text config act_kwargs.approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate


class TextMlp(nn.Module):
    """c_fc → GELU → c_proj."""

    def __init__(self, width: int, hidden: int, approximate: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with one packed (3W, W) in-projection, stored like
    ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        # (B, N, 3W) → (3, B, heads, N, head_dim): q, k, v in the packed order q|k|v.
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float, approximate: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = PackedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = TextMlp(width, mlp_hidden, approximate)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class TextTransformerStack(nn.Module):
    """The block list; its own module so the keys read ``transformer.resblocks.{i}``."""

    def __init__(self, layers: int, **block_kwargs: Any):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(**block_kwargs) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class PromptProjection(nn.Module):
    """Linear(out → P) → GELU (exact) → LayerNorm(P, eps 1e-5) → Linear(P → P)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def check_token_ids(token_ids: Any, context_length: int, vocab_size: int) -> None:
    """Raise TypeError/ValueError for anything the text tower cannot embed.

    The id-range check costs one device→host sync; it is worth it because an out-of-range id on
    CUDA is a device-side assert that poisons the whole process instead of a readable error.
    """
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor of token ids (B, N), e.g. from PS3Tokenizer; "
                        f"got {type(token_ids).__name__}")
    if token_ids.dtype == torch.bool or token_ids.is_floating_point() or token_ids.is_complex():
        raise TypeError(f"token_ids must hold integers (torch.long), got dtype {token_ids.dtype}")
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be 2-D (batch, tokens), got shape {tuple(token_ids.shape)}; "
                         "for a single text pass token_ids[None]")
    batch, length = token_ids.shape
    if batch == 0:
        raise ValueError("token_ids is an empty batch (shape[0] == 0): pass at least one tokenized text")
    if length == 0:
        raise ValueError("token_ids has no tokens (shape[1] == 0): pass at least one token per text")
    if length > context_length:
        raise ValueError(f"token_ids has {length} tokens, more than the text tower's context_length "
                         f"{context_length}: truncate to {context_length} (PS3Tokenizer does)")
    if token_ids.device.type != "meta":
        lo, hi = torch.aminmax(token_ids)
        if bool((lo < 0) | (hi >= vocab_size)):
            raise ValueError(f"token_ids must lie in [0, {vocab_size}) (the text vocab size); got values in "
                             f"[{int(lo)}, {int(hi)}]: use the tokenizer that belongs to this model")


class PS3TextTransformer(nn.Module):
    """Token + position embedding, ``layers`` pre-norm blocks, ``ln_final``, pooling, projection,
    and the prompt projection (design §4). Built from a ``PS3TextConfig``."""

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        c = config
        if c.embed_cls:
            raise ValueError("text config embed_cls=True (a learned class token) is not supported; "
                             "PS3 checkpoints use embed_cls=false")
        if getattr(c, "ls_init_value", None) is not None:
            raise ValueError("text config ls_init_value (layer scale) is not supported; PS3 checkpoints use null")
        if c.pool_type not in POOL_TYPES:
            raise ValueError(f"text config pool_type must be one of {POOL_TYPES}, got {c.pool_type!r}")
        if c.width % c.heads:
            raise ValueError(f"text config width {c.width} is not divisible by heads {c.heads}")
        for key in ("width", "heads", "layers", "context_length", "vocab_size", "output_dim", "prompt_proj_dim"):
            value = getattr(c, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"text config {key} must be a positive integer, got {value!r}")
        eps = float((c.norm_kwargs or {}).get("eps", 1e-5))
        approximate = _gelu_approximate(c.act_kwargs)

        self.context_length = c.context_length
        self.vocab_size = c.vocab_size
        self.pool_type = c.pool_type
        self.causal = not c.no_causal_mask
        self.proj_bias = bool(c.proj_bias)

        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        self.transformer = TextTransformerStack(c.layers, width=c.width, heads=c.heads,
                                                mlp_hidden=int(c.width * c.mlp_ratio), eps=eps,
                                                approximate=approximate)
        self.ln_final = nn.LayerNorm(c.width, eps=eps)
        if self.proj_bias:
            self.text_projection = nn.Linear(c.width, c.output_dim)
        else:
            # Stored (W, out) and applied as x @ P, the CLIP layout.
            self.text_projection = nn.Parameter(torch.empty(c.width, c.output_dim))
        self.prompt_proj = PromptProjection(c.output_dim, c.prompt_proj_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP-style initialisation, for training from scratch (loading overwrites it)."""
        width, layers = self.positional_embedding.shape[1], len(self.transformer.resblocks)
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=attn_std)
            nn.init.zeros_(self.text_projection.bias)
        else:
            nn.init.normal_(self.text_projection, std=attn_std)
        for fc in (self.prompt_proj.fc1, self.prompt_proj.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=math.sqrt(5))
            nn.init.zeros_(fc.bias)

    def pool(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "first":
            return x[:, 0]
        # argmax: the position of the largest id (CLIP's end-of-text token has the largest id).
        index = token_ids.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), index]

    @float32_fallback
    def forward(self, token_ids: torch.Tensor) -> PS3TextOutput:
        check_token_ids(token_ids, self.context_length, self.vocab_size)
        n = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:n]
        x = self.transformer(x, self.causal)
        # LayerNorm acts per token, so normalising all tokens and then pooling one equals
        # pooling first (open_clip's final_ln_after_pool): both settings give this result.
        x = self.ln_final(x)
        pooled = self.pool(x, token_ids)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        else:
            pooled = pooled @ self.text_projection
        prompt = self.prompt_proj(F.normalize(pooled, dim=-1))
        return PS3TextOutput(pooled_output=pooled, prompt=prompt, last_hidden_state=x)


class PS3TextModel(PretrainedMixin, nn.Module):
    """The PS3 text tower as published: ``text_model.*`` keys, ``PS3TextConfig``.

    ``PS3TextModel.from_pretrained(dir_or_hub_id)`` reads a text-only repo or the ``text_config``
    and ``text_model.*`` weights of a joint PS3 repo.
    """

    config_class = PS3TextConfig
    checkpoint_prefixes = ("text_model.",)

    def __init__(self, config: PS3TextConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = PS3TextConfig()
        elif isinstance(config, dict):
            config = PS3TextConfig.from_dict(config)
        elif not isinstance(config, PS3TextConfig):
            raise TypeError(f"config must be a PS3TextConfig or a dict, got {type(config).__name__}")
        self.config = config
        self.text_model = PS3TextTransformer(config)

    def forward(self, token_ids: torch.Tensor) -> PS3TextOutput:
        """Encode (B, N) token ids, N <= context_length → pooled_output and prompt."""
        return self.text_model(token_ids)
