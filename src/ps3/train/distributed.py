"""Distributed setup of a training run: this process's place (:class:`DistInfo`), joining the
process group under ``torchrun`` (:func:`init_distributed`), running something on rank 0 and
sharing the result (:func:`on_main`), rank-0 logging (:class:`RankLog`), and wrapping the
training module in DDP or FSDP2 with the full state dicts a checkpoint holds.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import UserError

__all__ = ["DistInfo", "init_distributed", "broadcast", "on_main", "RankLog", "wrap", "full_state_dicts",
           "load_full_state_dicts"]


@dataclass
class DistInfo:
    """This process's place in the run; ``world_size == 1`` for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA,
    gloo on CPU. Single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, chosen)


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and share its result; an error there is raised on every rank (so
    no rank waits forever in a collective for a rank that stopped)."""
    result, failure = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            failure = exc
    shared = broadcast((result, None if failure is None else f"{type(failure).__name__}: {failure}"), info)
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 stopped the run ({shared[1]})")
    return shared[0]


class RankLog:
    """Log lines from rank 0 only (through tqdm, so they do not break a progress bar)."""

    def __init__(self, enabled: bool, quiet: bool):
        self.enabled = enabled
        self.quiet = quiet

    def info(self, message: str) -> None:
        if self.enabled and not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def warn(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(f"warning: {message}", file=sys.stderr)


def wrap(module: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp``, one shard unit per transformer block) across the ranks; the
    module itself in a single process."""
    if not info.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from ..text import ResidualAttentionBlock
        from ..encoder.vit import Block

        for sub in module.modules():
            if isinstance(sub, (Block, ResidualAttentionBlock)):
                fully_shard(sub)
        # The blocks return views (keys/values, pooled rows); nothing modifies them in place, which
        # is what FSDP2's warning about view outputs is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        # FSDP2 cannot shard 0-dim parameters: the logit scale and bias stay replicated.
        scalars = {p for p in module.parameters() if p.dim() == 0}
        fully_shard(module, ignored_params=scalars or None)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def full_state_dicts(module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool, *,
                     prefix: str = "model."):
    """Full (unsharded) model and optimizer state dicts; collective under FSDP, where only rank 0
    receives them (on the CPU) and the other ranks get empty dicts. ``module`` is the wrapped
    training module holding ``model`` under the attribute name ``prefix`` (without its dot)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}, optim_state


def load_full_state_dicts(module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                          fsdp: bool, *, prefix: str = "model.", strict: bool = True) -> None:
    """Load a checkpoint's full ``state["model"]`` and ``state["optimizer"]`` (the inverse of
    :func:`full_state_dicts`); under FSDP every rank passes the full tensors and keeps its shard.
    ``strict=False`` (FSDP only) accepts a model state holding only some tensors (the trained ones)."""
    if not fsdp:
        from ..hub import check_and_load

        check_and_load(model, state["model"], where="checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_state_dict(module, optimizer, model_state_dict={f"{prefix}{k}": v for k, v in state["model"].items()},
                   optim_state_dict=state["optimizer"], options=options)
