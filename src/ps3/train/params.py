"""What a training run is asked to do: :class:`TrainParams`, the ``ps3 train`` flags that fill it
(:func:`add_arguments`) and its checks (:meth:`TrainParams.check`).

Python callers build a :class:`TrainParams` directly (``TrainParams(train_data_image=...,
train_data_text_box=..., steps=..., output_dir=...)``); the command line builds the same object
from its flags (:meth:`TrainParams.from_args`). The field names are the flags' ``dest`` names.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..runtime import UserError

__all__ = ["TrainParams", "add_arguments", "RESUME_SENSITIVE"]

# Parameters that must not change across a resume for the continuation to be exact.
RESUME_SENSITIVE = ("train_data_image", "train_data_text_box", "batch_size", "seed", "workers",
                    "global_caption_prob", "sample_n_box_each_image", "sentence_masking", "steps", "lr", "warmup",
                    "selection_lr", "train_selection_only")


@dataclass
class TrainParams:
    """The parameters of one training run (defaults as the flags'; see :func:`add_arguments`)."""

    # data
    train_data_image: str
    train_data_text_box: str
    steps: int
    output_dir: str
    global_caption_prob: float = 0.0
    sample_n_box_each_image: int = 1
    sentence_masking: bool = False
    workers: int = 1
    strict: bool = False
    # model
    model: str | None = None
    init: str = "random"
    tokenizer: str | None = None
    tokenizer_samples: int = 10000
    grad_checkpointing: bool = False
    train_selection_only: bool = False
    # optimisation
    batch_size: int = 32
    lr: float = 5e-6
    selection_lr: float | None = None
    wd: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup: int = 1500
    grad_clip: float = 1.0
    bottomup_loss_weight: float = 1.0
    topdown_loss_weight: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    # run
    resume: str | None = None
    save_every_steps: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = False
    device: str = "auto"
    deterministic: str = "auto"
    fsdp: bool = False
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainParams:
        """The parameters among the attributes of parsed flags (others, e.g. ``func``, are ignored)."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})

    def summary(self, model: torch.nn.Module, device, world_size: int = 1) -> str:
        """The one line a run prints before step 1: what trains on what, where, in which
        precision, for how many steps."""
        count = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weights = f"{count / 1e6:.1f}M parameters" + (f", {trainable / 1e6:.1f}M trained" if trainable != count else "")
        ranks = f" x {world_size} processes" if world_size > 1 else ""
        name = self.model or f"the config of {self.init}"
        return (f"training {name} ({weights}) on {self.train_data_image}: {self.steps} steps of "
                f"{self.batch_size}{ranks}, {device}, {self.precision}")

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for ``args.json`` and the checkpoints' record of the run."""
        return {k: v for k, v in asdict(self).items() if v is None or isinstance(v, (str, int, float, bool))}

    def check(self) -> None:
        """``ValueError`` naming the flag when a parameter is out of range."""
        _check_counts(self)
        _check_rates(self)
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.deterministic not in ("auto", "on", "off"):
            raise UserError(f"--deterministic must be auto, on or off, got {self.deterministic!r}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
        if self.resume is not None and self.resume != "latest" and not Path(self.resume).is_file():
            raise UserError(f"--resume must be 'latest' or an existing checkpoint file, got {self.resume!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_counts(params: TrainParams) -> None:
    positive = ("steps", "batch_size", "save_every_steps", "keep_checkpoints", "log_every", "sample_n_box_each_image",
                "tokenizer_samples")
    for name in positive:
        value = getattr(params, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{_flag(name)} must be a positive integer, got {value!r}")
    for name in ("workers", "warmup", "seed"):
        if getattr(params, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(params, name)}")


def _check_rates(params: TrainParams) -> None:
    for name in ("lr", "wd", "eps", "grad_clip", "bottomup_loss_weight", "topdown_loss_weight"):
        value = getattr(params, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    if params.lr <= 0:
        raise UserError(f"--lr must be > 0, got {params.lr}")
    if params.selection_lr is not None and not (math.isfinite(params.selection_lr) and params.selection_lr > 0):
        raise UserError(f"--selection-lr must be > 0, got {params.selection_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(params, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(params, name)}")
    if not 0 <= params.global_caption_prob <= 1:
        raise UserError(f"--global-caption-prob must be in [0, 1], got {params.global_caption_prob}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ps3 train`` / ``python -m ps3.train`` (upstream recipe names); each ``dest``
    is a :class:`TrainParams` field."""
    _add_data_arguments(parser.add_argument_group("data"))
    _add_model_arguments(parser.add_argument_group("model"))
    _add_optim_arguments(parser.add_argument_group("optimisation"))
    _add_run_arguments(parser.add_argument_group("run"))


def _add_data_arguments(data) -> None:
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


def _add_model_arguments(model) -> None:
    model.add_argument("--model", help="training config: tiny-synthetic, tiny-synthetic-128, hrqa-synthetic, "
                                       "PS3-4K-SigLIP2, PS3-1.5K-SigLIP2, PS3-4K-SigLIP, PS3-1.5K-SigLIP, "
                                       "or a config.json path "
                                       "(default: the config of --init when it is a PS3 checkpoint directory)")
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


def _add_optim_arguments(optim) -> None:
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


def _add_run_arguments(system) -> None:
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
