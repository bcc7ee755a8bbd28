"""``ps3 mllm train --fsdp``: the LLM sharded across ``torchrun`` processes with FSDP2.

Each decoder layer of the Hugging Face LLM is its own shard unit (its weights are gathered only
while it runs), then the whole training module is one more unit holding the rest of the LLM
(embeddings, final norm, LM head) and the connector (projector, prompt head). The frozen PS3
encoder is left out of every unit: each process keeps a full copy, as under DDP, because it is
small next to the LLM and never trained.

Checkpoints and the run directory need full tensors: :func:`gather` is collective (every rank
must call it) and hands rank 0 the full state; :func:`scatter` loads a full state on every rank,
which keeps its shard. Both reuse :mod:`ps3.train.distributed`'s state-dict helpers.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..runtime import UserError
from ..train.distributed import full_state_dicts, load_full_state_dicts

PREFIX = "helper."  # MLLMLoss holds the TwoPassPS3 as ``.helper``


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM: modules of the classes its
    ``_no_split_modules`` names (what transformers itself keeps whole when it splits a model over
    devices), else the ``nn.ModuleList`` at ``model.layers`` (Llama, Qwen, Mistral, …)."""
    names = set(getattr(llm, "_no_split_modules", None) or ())
    found = [m for m in llm.modules() if type(m).__name__ in names and m is not llm]
    if found:
        return found
    layers = getattr(getattr(llm, "model", None), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def shard(module: nn.Module, helper: nn.Module) -> int:
    """Apply FSDP2 to the training ``module`` (holding ``helper``, a TwoPassPS3) in place: one unit
    per LLM decoder layer, then ``module`` itself with the encoder's parameters left replicated.
    Returns the number of decoder layers sharded."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(helper.llm)
    if not layers:
        raise UserError(f"--fsdp: cannot find the decoder layers of {type(helper.llm).__name__} (no "
                        "_no_split_modules and no model.layers list): train it without --fsdp")
    for layer in layers:
        fully_shard(layer)
    # A decoder layer may return a view of its output; nothing modifies it in place, which is
    # what FSDP2's warning about view outputs is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    frozen = set(helper.vision_model.parameters()) | {p for p in module.parameters() if p.dim() == 0}
    root = fully_shard(module, ignored_params=frozen)
    # A step may leave a trained part unused on one rank only (the prompt head on a text-only
    # batch): reduce zeros for it so that every rank takes part in the same reductions.
    root.set_reduce_scatter_unused_params(True)
    return len(layers)


def local_share(module: nn.Module) -> float:
    """The fraction of ``module``'s parameter elements this process stores (1.0 unsharded)."""
    total = local = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)


def gather(module: nn.Module, helper: nn.Module, optimizer: torch.optim.Optimizer):
    """(full helper state, full optimizer state) on rank 0 (empty dicts elsewhere); collective."""
    return full_state_dicts(module, helper, optimizer, True, prefix=PREFIX)


def scatter(module: nn.Module, helper: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
            optim_state: dict) -> None:
    """Load full states (every rank passes the same ones; ``model_state`` may hold only the trained
    tensors) into the sharded ``module`` and ``optimizer``."""
    load_full_state_dicts(module, helper, optimizer, {"model": model_state, "optimizer": optim_state}, True,
                          prefix=PREFIX, strict=False)
