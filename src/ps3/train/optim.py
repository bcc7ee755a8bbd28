"""The optimizer side of pre-training: AdamW parameter groups (weight-decay exemptions and the
selection modules' own learning rate, both as the model states them), gradient clipping that
also works on FSDP-sharded parameters, and the warmup + cosine learning-rate schedule.
"""
from __future__ import annotations

import math

import torch

from ..model import PS3Model

__all__ = ["decay_exempt", "build_optimizer", "is_sharded", "clip_grad_norm", "lr_multiplier", "build_scheduler"]


def decay_exempt(model: PS3Model) -> set[str]:
    """Names of the parameters AdamW does not decay: every parameter of fewer than two
    dimensions (norms, biases, the logit scale/bias) and those the model names in
    :meth:`ps3.PS3Model.no_weight_decay` (embedding and position tables, the pooling latent,
    the prior prompt)."""
    named = model.no_weight_decay()
    return {name for name, param in model.named_parameters() if param.ndim < 2 or name in named}


def build_optimizer(model: PS3Model, lr: float, wd: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, selection_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, in up to four groups: (selection or not) ×
    (decayed or not). The selection modules (:meth:`ps3.PS3Model.selection_parameter_names`) get
    ``selection_lr`` when given."""
    selection = set(model.selection_parameter_names())
    exempt = decay_exempt(model)
    groups: dict[tuple[bool, bool, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # FSDP-sharded (DTensor) and replicated parameters never share a group: the fused
        # multi-tensor update cannot mix the two kinds.
        key = (selection_lr is not None and name in selection, name in exempt, is_sharded(param))
        groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("no trainable parameters")
    param_groups = []
    for (is_selection, no_decay, _), params in sorted(groups.items()):
        param_groups.append({"params": params, "weight_decay": 0.0 if no_decay else wd,
                             "lr": selection_lr if is_selection else lr})
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of ``params``, which may mix FSDP-sharded (DTensor) and
    replicated parameters; returns the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if is_sharded(p)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    plain = [p for p in with_grad if not is_sharded(p)]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps ((step+1)/warmup), then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_multiplier` as a scheduler stepped once per optimizer step."""
    warmup = min(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total))
