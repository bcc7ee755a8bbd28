"""The PS3 pre-training loop (SPEC §5): thin orchestration around the data pipeline
(:mod:`ps3.train.data`), the training forward (:class:`ps3.train.model.PS3PretrainModule`) and
the loss (:func:`ps3.train.loss.ps3_pretrain_loss`).

One command runs single-process or under ``torchrun`` (gloo on CPU, NCCL on GPUs; DDP, or FSDP
with ``--fsdp`` for the 400M towers)::

    python -m ps3.train --model tiny-synthetic --train-data-image DATA/images \\
        --train-data-text-box DATA/text_boxes --steps 1000 --batch-size 32 --lr 1e-3 \\
        --output-dir runs/tiny --resume latest

Run directory
-------------
``config.json`` / ``preprocessor_config.json`` / ``tokenizer/`` (written once, before the first
step, so a resumed run and :func:`ps3.train.export.export` use exactly the same), ``args.json``,
``metrics.jsonl`` (one line per logged step) and ``checkpoints/step_XXXXXXXX.pt``.

Checkpoints and exact resume
----------------------------
A checkpoint holds the model (published key layout), optimizer, scheduler, step, RNG states
(torch, CUDA, numpy, python) and the data position (epoch and batches consumed in it). It is
written to a temporary file, flushed to disk and renamed, so a run killed at any moment leaves
either the old or the new checkpoint, never a half-written one under a checkpoint name; the
last ``--keep-checkpoints`` are kept. ``--resume latest`` loads the newest readable checkpoint
(an unreadable newest one is reported, moved aside and skipped), re-creates the deterministic
data stream of the saved epoch and skips the batches already consumed. On a CPU the resumed
run then ends with bit-identical weights to an uninterrupted one (on GPUs, as far as the
kernels are deterministic). A failed write (full disk, read-only directory) stops the run with
the reason and leaves the previous checkpoint in place.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import PS3Config
from ..model import PS3Model
from ..tokenizer import PS3Tokenizer
from .loss import PS3PretrainLoss, ps3_pretrain_loss
from .model import (PS3PretrainModule, build_caption_tokenizer, get_model_spec, initialise, logit_scale_max,
                    read_captions, selection_parameter_names)

__all__ = [
    "add_arguments",
    "run",
    "DistInfo",
    "init_distributed",
    "Progress",
    "PretrainStep",
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "no_weight_decay",
    "list_checkpoints",
    "read_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
    "prepare_run_dir",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "ps3-train-checkpoint-v1"
TOKENIZER_DIR = "tokenizer"
_CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt")
# Arguments that must not change across a resume for the continuation to be exact.
_RESUME_SENSITIVE = ("train_data_image", "train_data_text_box", "batch_size", "seed", "workers",
                     "global_caption_prob", "sample_n_box_each_image", "sentence_masking", "steps", "lr", "warmup",
                     "selection_lr", "train_selection_only")


# --------------------------------------------------------------------------------------------
# Arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ps3 train`` / ``python -m ps3.train`` (upstream recipe names)."""
    data = parser.add_argument_group("data")
    data.add_argument("--train-data-image", required=True,
                      help="image shards: a directory of .tar files, a brace pattern or '::'-joined patterns")
    data.add_argument("--train-data-text-box", required=True, help="text-box shards, paired with the image shards")
    data.add_argument("--global-caption-prob", "--global_caption_prob", dest="global_caption_prob", type=float,
                      default=0.0, help="probability of the global caption when an image has both kinds (0.25 in "
                                        "the 4K recipe; default 0)")
    data.add_argument("--sample-n-box-each-image", type=int, default=1,
                      help="local caption/box pairs per image (each becomes its own image-text pair; default 1)")
    data.add_argument("--sentence-masking", action="store_true", help="keep a random run of caption sentences")
    data.add_argument("--workers", type=int, default=1, help="data loader worker processes per rank (default 1)")
    data.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="training config: tiny-synthetic, PS3-4K-SigLIP2, PS3-1.5K-SigLIP2, "
                                       "PS3-4K-SigLIP, PS3-1.5K-SigLIP, or a config.json path (default: the config "
                                       "of --init when it is a PS3 checkpoint directory)")
    model.add_argument("--init", default="random",
                       help="'random' (default), a PS3 checkpoint directory, or a SigLIP .safetensors file in "
                            "timm/open_clip naming")
    model.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's; for a model "
                                           "without one, a word-level tokenizer is built from the captions)")
    model.add_argument("--tokenizer-samples", type=int, default=10000,
                       help="samples whose captions build the word-level tokenizer (default 10000)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute trunk blocks in backward")
    model.add_argument("--train-selection-only", action="store_true",
                       help="freeze everything but the selection modules")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    optim.add_argument("--batch-size", type=int, default=32, help="images per rank and step (default 32)")
    optim.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (recipe: 5e-6 from SigLIP)")
    optim.add_argument("--selection-lr", type=float, help="learning rate of the selection modules (default --lr)")
    optim.add_argument("--wd", type=float, default=3e-4, help="AdamW weight decay (recipe: 3e-4)")
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.95)
    optim.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--warmup", type=int, default=1500, help="linear warmup steps, then cosine (recipe: 1500)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 turns it off)")
    optim.add_argument("--bottomup-loss-weight", type=float, default=1.0)
    optim.add_argument("--topdown-loss-weight", type=float, default=1.0)
    optim.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    optim.add_argument("--seed", type=int, default=0)

    system = parser.add_argument_group("run")
    system.add_argument("--output-dir", required=True, help="run directory (checkpoints, logs, tokenizer)")
    system.add_argument("--resume", help="'latest' (the newest readable checkpoint in --output-dir; start fresh "
                                         "when there is none) or a checkpoint file")
    system.add_argument("--save-every-steps", type=int, default=1000, help="checkpoint interval (default 1000)")
    system.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints (default 2)")
    system.add_argument("--log-every", type=int, default=10, help="log every N steps (default 10)")
    system.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard")
    system.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    system.add_argument("--deterministic", choices=["auto", "on", "off"], default="auto",
                        help="deterministic kernels (needed for bit-identical resumes; auto: on for CPU runs, off "
                             "on GPUs where they cost speed)")
    system.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (FSDP2) "
                                                            "instead of DDP")
    system.add_argument("--quiet", action="store_true", help="no progress bar or log lines (errors only)")


def _check_args(args: argparse.Namespace) -> None:
    positive = ("steps", "batch_size", "save_every_steps", "keep_checkpoints", "log_every", "sample_n_box_each_image",
                "tokenizer_samples")
    for name in positive:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("workers", "warmup", "seed"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "wd", "eps", "grad_clip", "bottomup_loss_weight", "topdown_loss_weight"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.selection_lr is not None and not (math.isfinite(args.selection_lr) and args.selection_lr > 0):
        raise ValueError(f"--selection-lr must be > 0, got {args.selection_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not 0 <= args.global_caption_prob <= 1:
        raise ValueError(f"--global-caption-prob must be in [0, 1], got {args.global_caption_prob}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.resume is not None and args.resume != "latest" and not Path(args.resume).is_file():
        raise ValueError(f"--resume must be 'latest' or an existing checkpoint file, got {args.resume!r}")


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as plain values (for args.json and checkpoints)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool))}


# --------------------------------------------------------------------------------------------
# Logging (rank 0 only)


class _Log:
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


# --------------------------------------------------------------------------------------------
# Distributed setup


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
            raise ValueError("--device cuda was given but CUDA is not available: use --device cpu")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
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


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and share its result; an error there is raised on every rank (so
    no rank waits forever in a collective for a rank that stopped)."""
    result, failure = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            failure = exc
    shared = _broadcast((result, None if failure is None else f"{type(failure).__name__}: {failure}"), info)
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 stopped the run ({shared[1]})")
    return shared[0]


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``run_dir``, oldest first."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (tensors only, no arbitrary pickles); ``ValueError`` when it is
    incomplete, corrupt or not a ps3 training checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip raises RuntimeError, a missing file OSError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"checkpoint {path} is incomplete or unreadable ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a ps3 training checkpoint")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, warn: Callable[[str], None] | None = None,
                           move_aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of ``run_dir`` as (path, state), or ``None``.

    Unreadable newer ones are reported through ``warn`` and skipped; with ``move_aside`` they are
    renamed to ``*.incomplete`` so the run's retention never counts them.
    """
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path)
        except ValueError as exc:
            note = ""
            if move_aside:
                try:
                    os.replace(path, path.with_name(path.name + ".incomplete"))
                    note = f" (moved aside to {path.name}.incomplete)"
                except OSError:
                    pass
            if warn is not None:
                warn(f"{exc}: skipping it{note} and trying an older one")
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then keep only the last ``keep``.

    On failure (disk full, read-only directory) the temporary file is removed and ``OSError``
    says which checkpoint is still intact.
    """
    final = checkpoint_path(run_dir, step)
    directory = final.parent
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except (OSError, RuntimeError) as exc:  # torch.save reports failed writes as RuntimeError
        try:
            tmp.unlink()
        except OSError:
            pass
        previous = [p for s, p in list_checkpoints(run_dir) if s != step]
        intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        code = getattr(exc, "errno", None) or errno.EIO
        raise OSError(code, f"could not write checkpoint {final} ({reason}); {intact}") from exc
    for _, old in list_checkpoints(run_dir)[:-keep]:
        try:
            old.unlink()
        except OSError:
            pass
    return final


def _remove_stale_temporaries(run_dir: Path, log: _Log) -> None:
    """Delete the temporary files (and tokenizer directories) of a run killed while writing them."""
    stale = list((run_dir / CHECKPOINT_DIR).glob(".step_*.tmp-*")) + list(run_dir.glob(".*.tmp-*"))
    for path in stale:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            log.info(f"removed {path.name}, left by a run stopped while writing it")
        except OSError:
            pass


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file into it; ``OSError`` with a clear reason if not."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno or errno.EACCES,
                      f"output directory {directory} is not writable ({exc.strerror or exc}): choose a writable "
                      "--output-dir") from exc


# --------------------------------------------------------------------------------------------
# RNG state


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # Stored as plain numbers/tensors so checkpoints load with weights_only=True.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------
# Optimizer and schedule


_NO_DECAY_NAMES = ("pos_embed", "positional_embedding", "token_embedding", "pos_emb_residual", "latent",
                   "prior_prompt", "logit_scale", "logit_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, embedding and position tables, the pooling latent, the prior prompt and
    the logit scale/bias are not decayed."""
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES)


def build_optimizer(model: PS3Model, lr: float, wd: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, selection_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, in up to four groups: (selection or not) ×
    (decayed or not). The selection modules get ``selection_lr`` when given."""
    selection = set(selection_parameter_names(model))
    groups: dict[tuple[bool, bool, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # FSDP-sharded (DTensor) and replicated parameters never share a group: the fused
        # multi-tensor update cannot mix the two kinds.
        key = (selection_lr is not None and name in selection, no_weight_decay(name, param), _is_sharded(param))
        groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("no trainable parameters")
    param_groups = []
    for (is_selection, no_decay, _), params in sorted(groups.items()):
        param_groups.append({"params": params, "weight_decay": 0.0 if no_decay else wd,
                             "lr": selection_lr if is_selection else lr})
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)


def _is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of ``params``, which may mix FSDP-sharded (DTensor) and
    replicated parameters; returns the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if _is_sharded(p)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    plain = [p for p in with_grad if not _is_sharded(p)]
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
    warmup = min(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total))


# --------------------------------------------------------------------------------------------
# One step


def prepare_batch(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(pixel_values, text_ids, gt_selection_maps, is_global_text) on ``device``; an image with
    ``n`` texts is repeated ``n`` times so every text has its own image (prompt) row."""
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    ids = batch["text_ids"].to(device, non_blocking=True)
    gt = batch["gt_selection_maps"].to(device, non_blocking=True)
    is_global = batch["is_global_text"].to(device, non_blocking=True).view(-1, 1).bool()
    if ids.shape[0] != pixels.shape[0]:
        n, rest = divmod(ids.shape[0], pixels.shape[0])
        if rest:
            raise ValueError(f"batch has {pixels.shape[0]} images but {ids.shape[0]} texts (not a multiple)")
        pixels = pixels.repeat_interleave(n, dim=0)
    return pixels, ids, gt, is_global


class PretrainStep:
    """One optimisation step: forward, loss, backward, clipping, AdamW, schedule, logit clamp.

    ``module`` is the (possibly DDP/FSDP-wrapped) :class:`PS3PretrainModule`, ``model`` the
    PS3Model inside it. Gradients stay in ``.grad`` after the call (cleared at the next one).
    Returns the detached loss parts.
    """

    def __init__(self, module: nn.Module, model: PS3Model, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, precision: str = "fp32",
                 bottomup_weight: float = 1.0, topdown_weight: float = 1.0, grad_clip: float = 0.0,
                 distributed: bool = False, fsdp: bool = False):
        self.module = module
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.precision = precision
        self.bottomup_weight = bottomup_weight
        self.topdown_weight = topdown_weight
        self.grad_clip = grad_clip
        self.distributed = distributed
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # Under FSDP the parameters it does not shard (the logit scale and bias) are replicated:
        # their gradients are averaged here, as DDP would.
        self.replicated = [p for p in self.trainable if not _is_sharded(p)] if fsdp else []

    def __call__(self, batch: dict[str, Any]) -> PS3PretrainLoss:
        pixels, ids, gt, is_global = prepare_batch(batch, self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            image, text, scale, bias, bottomup, topdown = self.module(pixels, ids, gt, is_global)
        # Both box terms always enter the graph (a zero weight gives zero gradients) so that every
        # parameter is used in every step, as DDP requires.
        loss = ps3_pretrain_loss(image.float(), text.float(), scale.float(), bias.float(), bottomup, topdown, gt,
                                 is_global, self.bottomup_weight, self.topdown_weight, distributed=self.distributed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        for param in self.replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(dist.get_world_size())
        if self.grad_clip > 0:
            clip_grad_norm(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.model.logit_scale.requires_grad:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, logit_scale_max())
        return PS3PretrainLoss(*(t.detach() for t in (loss.total, loss.contrastive, loss.bottomup, loss.topdown)))


# --------------------------------------------------------------------------------------------
# Run directory


@dataclass
class Progress:
    """Where the run is: optimizer steps done, and the data position (epoch, batches of it used)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _resolve_spec(args: argparse.Namespace):
    if args.model is not None:
        return get_model_spec(args.model)
    if args.init not in (None, "random") and Path(args.init).is_dir():
        return get_model_spec(args.init)
    raise ValueError("--model is required (tiny-synthetic, PS3-4K-SigLIP2, …, or a config.json path) unless "
                     "--init is a PS3 checkpoint directory")


def _load_tokenizer(args: argparse.Namespace, spec, log: _Log) -> PS3Tokenizer:
    text = spec.config.text_config
    context = int(text.context_length)
    clean = (text.tokenizer_kwargs or {}).get("clean", "canonicalize")
    if args.tokenizer is not None:
        return PS3Tokenizer.from_pretrained(args.tokenizer, context_length=context)
    if args.init not in (None, "random") and (Path(args.init) / "tokenizer_config.json").is_file():
        return PS3Tokenizer.from_pretrained(args.init, context_length=context)
    if spec.tokenizer_name:
        return PS3Tokenizer.from_pretrained(spec.tokenizer_name, context_length=context, clean=clean)
    from .data import list_shards

    captions = read_captions(list_shards(args.train_data_text_box, argument="--train-data-text-box"),
                             args.tokenizer_samples)
    tokenizer = build_caption_tokenizer(captions, context, clean)
    log.info(f"built a word-level tokenizer ({tokenizer.vocab_size} tokens) from the captions of the first "
             f"{args.tokenizer_samples} samples")
    return tokenizer


def prepare_run_dir(args: argparse.Namespace, log: _Log) -> None:
    """Rank 0: check the output directory, and write the config, preprocessor and tokenizer the
    run trains with (kept from the first start, so a resumed run uses the same)."""
    from ..processor import PS3ImageProcessor

    run_dir = Path(args.output_dir)
    check_writable(run_dir)
    if not args.resume and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume latest to continue that run, or "
                         "choose another --output-dir")
    _remove_stale_temporaries(run_dir, log)
    spec = _resolve_spec(args)
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer = PS3Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = _load_tokenizer(args, spec, log)
        tmp = run_dir / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, tokenizer_dir)
    config = spec.config
    if config.text_config.vocab_size is None:
        config.text_config.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
                         f"{config.text_config.vocab_size}: use the model's tokenizer or a larger vocab_size")
    PS3ImageProcessor(**spec.preprocessor)  # validates it
    config_file, preprocessor_file = run_dir / "config.json", run_dir / "preprocessor_config.json"
    if config_file.is_file():
        existing = PS3Config.from_pretrained(run_dir)
        if existing.to_dict() != config.to_dict():
            raise ValueError(f"{run_dir} belongs to a run with another model config ({config_file}): use a new "
                             "--output-dir or the same --model")
    else:
        _write_atomic(config_file, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    if not preprocessor_file.is_file():
        _write_atomic(preprocessor_file, json.dumps(spec.preprocessor, indent=2) + "\n")
    _write_atomic(run_dir / "args.json", json.dumps(_args_dict(args), indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """A run killed while writing leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Wrapping


def _wrap(module: PS3PretrainModule, info: DistInfo, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp``) across the ranks; the module itself in a single process."""
    if not info.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from ..text import ResidualAttentionBlock
        from ..vit import Block

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


def _state_dicts(module: nn.Module, model: PS3Model, optimizer: torch.optim.Optimizer, fsdp: bool):
    """Full (unsharded) model and optimizer state dicts; collective under FSDP, where only rank 0
    receives them (on the CPU) and the other ranks get empty dicts."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    return {k[len("model."):]: v for k, v in model_state.items()}, optim_state


def _load_state_dicts(module: nn.Module, model: PS3Model, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool):
    if not fsdp:
        from ..hub import check_and_load

        check_and_load(model, state["model"], where="checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # Every rank passes the full tensors (each read the checkpoint) and keeps its shard.
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(module, optimizer, model_state_dict={f"model.{k}": v for k, v in state["model"].items()},
                   optim_state_dict=state["optimizer"], options=options)


# --------------------------------------------------------------------------------------------
# The run


def _skip_totals(counter, info: DistInfo) -> dict[str, int]:
    """Bad-data counts summed over ranks (a collective: called at the same step everywhere)."""
    from .data import SKIP_REASONS

    reasons = list(SKIP_REASONS)
    counts = torch.tensor([counter[r] for r in reasons], dtype=torch.float64)
    if info.distributed:
        dist.all_reduce(counts)
    return {r: int(c) for r, c in zip(reasons, counts.tolist()) if c}


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` says (see :func:`add_arguments`); returns the exit code."""
    _check_args(args)
    info = init_distributed(args.device)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if args.deterministic == "on" or (args.deterministic == "auto" and info.device.type == "cpu"):
        # The backward of the position-table gathers accumulates in parallel on the CPU, in an
        # order that varies between runs; the deterministic kernels fix it (and are no slower
        # here). cuBLAS needs a fixed workspace for the same (set before its first use).
        if info.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(args, info)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _find_resume(args: argparse.Namespace, info: DistInfo, run_dir: Path, log: _Log):
    """(checkpoint path, its state) to resume from, or (None, None)."""
    if args.resume is None:
        return None, None
    if args.resume != "latest":
        return Path(args.resume), read_checkpoint(args.resume)
    cache: dict[str, Any] = {}

    def find() -> Path | None:
        found = load_latest_checkpoint(run_dir, log.warn, move_aside=True)
        if found is None:
            return None
        cache["state"] = found[1]  # rank 0 keeps what it already read
        return found[0]

    path = _on_main(info, find)
    if path is None:
        log.info(f"--resume latest: no checkpoint in {run_dir / CHECKPOINT_DIR}, starting from step 0")
        return None, None
    return path, cache["state"] if "state" in cache else read_checkpoint(path)


def _build_model(args: argparse.Namespace, info: DistInfo, config: PS3Config, resume_state: dict | None,
                 fsdp: bool, log: _Log) -> tuple[PS3Model, nn.Module]:
    """The PS3Model (initialised, or with the checkpoint's weights) and the wrapped training module."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model = PS3Model(config)
    if resume_state is None:
        report = initialise(model, args.init)
        if args.init not in (None, "random"):
            log.info(report.summary())
    if args.train_selection_only:
        trainable = set(selection_parameter_names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    model.vision_model.trunk.grad_checkpointing = bool(args.grad_checkpointing)
    model.to(info.device).train()
    if resume_state is not None and not fsdp:  # FSDP loads after sharding (_restore)
        from ..hub import check_and_load

        check_and_load(model, {k: v.to(info.device) for k, v in resume_state["model"].items()}, where="checkpoint")
    return model, _wrap(PS3PretrainModule(model), info, fsdp)


def _restore(args: argparse.Namespace, info: DistInfo, module: nn.Module, model: PS3Model,
             optimizer: torch.optim.Optimizer, scheduler, state: dict, path: Path, fsdp: bool, log: _Log) -> Progress:
    """Load the optimizer and schedule (and, under FSDP, the weights) of a checkpoint."""
    if bool(state.get("fsdp", False)) != fsdp:
        raise ValueError(f"{path} was written by a run {'with' if state.get('fsdp') else 'without'} FSDP: resume it "
                         f"{'with' if state.get('fsdp') else 'without'} --fsdp under torchrun")
    if fsdp:
        _load_state_dicts(module, model, optimizer, state, True)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress(**state["progress"])
    saved = state.get("args", {})
    changed = [k for k in _RESUME_SENSITIVE if k in saved and saved[k] != getattr(args, k)]
    if state.get("world_size", 1) != info.world_size:
        changed.append("world size")
    if changed:
        log.warn(f"resuming with a different {', '.join(changed)} than the checkpoint: the run continues, but not "
                 "exactly as the original would have")
    log.info(f"resumed from {path} at step {progress.step} (epoch {progress.epoch}, "
             f"{progress.batches_in_epoch} batches into it)")
    return progress


def _build_loader(args: argparse.Namespace, info: DistInfo, preprocessor: dict, tokenizer: PS3Tokenizer,
                  progress: Progress):
    """This rank's deterministic batch stream, positioned after the batches already consumed."""
    from .data import DataOptions, build_dataloader

    options = DataOptions(
        image_size=int(preprocessor["image_size"]), mean=preprocessor.get("mean", [0.5] * 3),
        std=preprocessor.get("std", [0.5] * 3), batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        epoch=progress.epoch, skip_batches=progress.batches_in_epoch, global_caption_prob=args.global_caption_prob,
        sample_n_box_each_image=args.sample_n_box_each_image, sentence_masking=args.sentence_masking,
        rank=info.rank, world_size=info.world_size, strict=args.strict, tokenize=tokenizer, drop_last=True,
        pin_memory=info.device.type == "cuda")
    return build_dataloader(args.train_data_image, args.train_data_text_box, options)


class _Reporter:
    """Rank 0's log lines, ``metrics.jsonl`` and (optionally) TensorBoard at the log steps."""

    def __init__(self, args: argparse.Namespace, info: DistInfo, run_dir: Path, log: _Log):
        self.log = log
        self.info = info
        self.steps = args.steps
        self.samples_per_step = args.batch_size * args.sample_n_box_each_image * info.world_size
        self.metrics = None
        if info.is_main:
            self.metrics = open(run_dir / "metrics.jsonl", "a+")
            # A run killed mid-line left a partial line: start on a fresh one.
            if self.metrics.tell() > 0:
                self.metrics.seek(self.metrics.tell() - 1)
                if self.metrics.read(1) != "\n":
                    self.metrics.write("\n")
        self.writer = None
        if args.tensorboard and info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.window_start, self.window_steps = time.perf_counter(), 0

    def report(self, progress: Progress, loss: PS3PretrainLoss, lr: float, counter) -> None:
        """Called on every rank at the same steps (the skip counts are summed over ranks)."""
        parts = {k: float(v) for k, v in loss.as_dict().items()}  # host sync: log steps only
        if not math.isfinite(parts["total"]):
            raise ValueError(f"the loss became {parts['total']} at step {progress.step}: lower --lr or "
                                     "--selection-lr, or keep --grad-clip on")
        skipped = _skip_totals(counter, self.info)
        now = time.perf_counter()
        rate = self.window_steps * self.samples_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        self.log.info(f"step {progress.step}/{self.steps}  loss {parts['total']:.4f} (siglip {parts['contrastive']:.4f}, "
                      f"bottom-up {parts['bottomup']:.4f}, top-down {parts['topdown']:.4f})  lr {lr:.3g}  "
                      f"{rate:.1f} samples/s  epoch {progress.epoch}  data skipped: {skipped or 'none'}")
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": progress.step, **parts, "lr": lr, "samples_per_s": rate,
                                           "epoch": progress.epoch, "skipped": skipped}) + "\n")
            self.metrics.flush()
        if self.writer is not None:
            for key, value in parts.items():
                self.writer.add_scalar(f"loss/{key}", value, progress.step)
            self.writer.add_scalar("lr", lr, progress.step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def _train(args: argparse.Namespace, info: DistInfo) -> int:
    from tqdm import tqdm

    log = _Log(info.is_main, args.quiet)
    run_dir = Path(args.output_dir)
    _on_main(info, lambda: prepare_run_dir(args, log))
    # Everything below reads the run directory, so every rank trains the same model.
    config = PS3Config.from_pretrained(run_dir)
    preprocessor = json.loads((run_dir / "preprocessor_config.json").read_text())
    tokenizer = PS3Tokenizer.from_pretrained(run_dir / TOKENIZER_DIR)
    resume, resume_state = _find_resume(args, info, run_dir, log)

    fsdp = args.fsdp and info.distributed
    if args.fsdp and not fsdp:
        log.info("--fsdp has no effect in a single process: training unsharded")
    model, module = _build_model(args, info, config, resume_state, fsdp, log)
    optimizer = build_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps, args.selection_lr)
    scheduler = build_scheduler(optimizer, args.warmup, args.steps)
    progress = Progress()
    if resume_state is not None:
        progress = _restore(args, info, module, model, optimizer, scheduler, resume_state, resume, fsdp, log)
    if progress.step >= args.steps:
        log.info(f"already at step {progress.step} of {args.steps}: nothing to do")
        return 0
    loader = _build_loader(args, info, preprocessor, tokenizer, progress)
    if resume_state is not None:
        _set_rng_state(resume_state["rng"])
    del resume_state  # the optimizer and model hold their own copies now

    step_fn = PretrainStep(module, model, optimizer, scheduler, device=info.device, precision=args.precision,
                           bottomup_weight=args.bottomup_loss_weight, topdown_weight=args.topdown_loss_weight,
                           grad_clip=args.grad_clip, distributed=info.distributed, fsdp=fsdp)

    def save() -> None:
        model_state, optim_state = _state_dicts(module, model, optimizer, fsdp)
        state = {"format": CHECKPOINT_FORMAT, "progress": asdict(progress), "model": model_state,
                 "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                 "args": _args_dict(args), "world_size": info.world_size, "fsdp": fsdp}
        path = _on_main(info, lambda: save_checkpoint(run_dir, progress.step, state, args.keep_checkpoints))
        log.info(f"saved {path}")

    reporter = _Reporter(args, info, run_dir, log)
    bar = tqdm(total=args.steps, initial=progress.step, unit="step", desc="train", mininterval=1.0,
               disable=args.quiet or not info.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
    iterator = iter(loader)
    try:
        while progress.step < args.steps:
            batch = next(iterator, None)
            have = torch.tensor([0 if batch is None else 1])
            if info.distributed:  # an epoch ends for everybody when one rank runs out
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if int(have) == 0:
                if progress.batches_in_epoch == 0:
                    raise ValueError(f"epoch {progress.epoch} gave no full batch of --batch-size {args.batch_size} "
                                     "on some rank: lower --batch-size or add data")
                progress.epoch += 1
                progress.batches_in_epoch = 0
                loader.set_epoch(progress.epoch)
                iterator = iter(loader)
                continue
            loss = step_fn(batch)
            progress.step += 1
            progress.batches_in_epoch += 1
            reporter.window_steps += 1
            bar.update(1)
            last = progress.step == args.steps
            if progress.step % args.log_every == 0 or last:
                reporter.report(progress, loss, optimizer.param_groups[0]["lr"], loader.counter)
            if progress.step % args.save_every_steps == 0 or last:
                save()
    finally:
        bar.close()
        reporter.close()
    log.info(f"done: {progress.step} steps; export with: ps3 export {run_dir} OUT_DIR")
    return 0
