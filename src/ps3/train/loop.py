"""The PS3 pre-training loop (design §5): build the run, take steps, report, save.

One command runs single-process or under ``torchrun`` (gloo on CPU, NCCL on GPUs; DDP, or FSDP
with ``--fsdp`` for the 400M towers)::

    python -m ps3.train --model tiny-synthetic --train-data-image DATA/images \\
        --train-data-text-box DATA/text_boxes --steps 1000 --batch-size 32 --lr 1e-3 \\
        --output-dir runs/tiny --resume latest

From Python, :func:`train` takes a :class:`~ps3.train.params.TrainParams` (the same fields as the
flags). The pieces around the loop each live in their own module: the flags and their checks in
:mod:`ps3.train.params`, process groups and DDP/FSDP wrapping in :mod:`ps3.train.distributed`,
checkpoint files, RNG state and the run directory in :mod:`ps3.train.checkpoint`, parameter
groups and the schedule in :mod:`ps3.train.optim`.

Exact resume
------------
Ctrl-C or SIGTERM ends the run after the current step, with that step saved
(:mod:`ps3.train.interrupt`).
``--resume latest`` loads the newest readable checkpoint (an unreadable newest one is reported,
moved aside and skipped), re-creates the deterministic data stream of the saved epoch and skips
the batches already consumed. On a CPU the resumed run then ends with bit-identical weights to
an uninterrupted one (on GPUs, as far as the kernels are deterministic). A failed write (full
disk, read-only directory) stops the run with the reason and leaves the previous checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
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
from ..runtime import UserError, user_input
from ..tokenizer import PS3Tokenizer
from .checkpoint import (CHECKPOINT_FORMAT, TOKENIZER_DIR, Progress, find_resume, prepare_run_dir, rng_state,
                         save_checkpoint, set_rng_state)
from .interrupt import StopRequests, exit_code, next_batch
from .distributed import (DistInfo, RankLog, full_state_dicts, init_distributed, load_full_state_dicts, on_main,
                          wrap)
from .loss import PS3PretrainLoss, ps3_pretrain_loss
from .model_setup import PS3PretrainModule, initialise, logit_scale_max
from .optim import build_optimizer, build_scheduler, clip_grad_norm, is_sharded
from .params import RESUME_SENSITIVE, TrainParams, add_arguments

__all__ = ["TrainParams", "add_arguments", "run", "train", "TrainResult", "StopCheck", "PretrainStep",
           "prepare_batch"]

#: Called after each checkpoint with (step, model in eval mode, under ``torch.no_grad``); returning
#: True ends the run at that checkpoint.
StopCheck = Callable[[int, PS3Model], bool]


@dataclass
class TrainResult:
    """What :func:`train` did: the step it ended at, whether ``stop_check`` ended it early, and
    the steps and wall-clock seconds of its step loop (excluding setup), and the signal that
    stopped it, if one did (:mod:`ps3.train.interrupt`)."""

    step: int
    stopped_early: bool
    steps_run: int
    seconds: float
    interrupted_by: int | None = None  # the signal (SIGINT, SIGTERM) that ended the run after a save


def run(args: TrainParams | argparse.Namespace) -> int:
    """Train as ``args`` (parsed ``ps3 train`` flags, or :class:`TrainParams`) says; returns the exit
    code (130 / 143 when Ctrl-C / SIGTERM stopped it, after saving its last step)."""
    result = train(args if isinstance(args, TrainParams) else TrainParams.from_args(args))
    return 0 if result.interrupted_by is None else exit_code(result.interrupted_by)


def train(params: TrainParams, *, stop_check: StopCheck | None = None) -> TrainResult:
    """Train (or resume) the run ``params`` describes; see the module docstring.

    ``stop_check`` (single process or DDP, not FSDP) is called on every rank after each
    checkpoint with the step and the model, in eval mode and without changing any RNG stream;
    returning True ends the run there (its last checkpoint is that step's).
    """
    if not isinstance(params, TrainParams):
        raise TypeError(f"params must be a TrainParams, got {type(params).__name__}")
    params.check()
    if stop_check is not None and params.fsdp:
        raise ValueError("stop_check needs the whole model in every process: it does not work with fsdp")
    info = init_distributed(params.device)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if params.deterministic == "on" or (params.deterministic == "auto" and info.device.type == "cpu"):
        # The backward of the position-table gathers accumulates in parallel on the CPU, in an
        # order that varies between runs; the deterministic kernels fix it (and are no slower
        # here). cuBLAS needs a fixed workspace for the same (set before its first use).
        if info.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(params, info, stop_check)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Build


def _build_model(params: TrainParams, info: DistInfo, config: PS3Config, resume_state: dict | None,
                 fsdp: bool, log: RankLog) -> tuple[PS3Model, nn.Module]:
    """The PS3Model (initialised, or with the checkpoint's weights) and the wrapped training module."""
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    random.seed(params.seed)
    model = PS3Model(config)
    if resume_state is None:
        with user_input("--init"):
            report = initialise(model, params.init)
        if params.init not in (None, "random"):
            log.info(report.summary())
    if params.train_selection_only:
        model.lock_all_but_selection()
    model.set_grad_checkpointing(params.grad_checkpointing)
    model.to(info.device).train()
    if resume_state is not None and not fsdp:  # FSDP loads after sharding (_restore)
        from ..hub import check_and_load

        check_and_load(model, {k: v.to(info.device) for k, v in resume_state["model"].items()}, where="checkpoint")
    return model, wrap(PS3PretrainModule(model), info, fsdp)


def _restore(params: TrainParams, info: DistInfo, module: nn.Module, model: PS3Model,
             optimizer: torch.optim.Optimizer, scheduler, state: dict, path: Path, fsdp: bool,
             log: RankLog) -> Progress:
    """Load the optimizer and schedule (and, under FSDP, the weights) of a checkpoint."""
    if bool(state.get("fsdp", False)) != fsdp:
        raise UserError(f"{path} was written by a run {'with' if state.get('fsdp') else 'without'} FSDP: resume it "
                         f"{'with' if state.get('fsdp') else 'without'} --fsdp under torchrun")
    if fsdp:
        load_full_state_dicts(module, model, optimizer, state, True)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress(**state["progress"])
    saved = state.get("args", {})
    changed = [k for k in RESUME_SENSITIVE if k in saved and saved[k] != getattr(params, k)]
    if state.get("world_size", 1) != info.world_size:
        changed.append("world size")
    if changed:
        log.warn(f"resuming with a different {', '.join(changed)} than the checkpoint: the run continues, but not "
                 "exactly as the original would have")
    log.info(f"resumed from {path} at step {progress.step} (epoch {progress.epoch}, "
             f"{progress.batches_in_epoch} batches into it)")
    return progress


def _build_loader(args: TrainParams, info: DistInfo, preprocessor: dict, tokenizer: PS3Tokenizer,
                  progress: Progress):
    """This rank's deterministic batch stream, positioned after the batches already consumed."""
    from .loader import DataOptions, build_dataloader

    options = DataOptions(
        image_size=preprocessor["image_size"], mean=preprocessor.get("mean", [0.5] * 3),
        std=preprocessor.get("std", [0.5] * 3), batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        epoch=progress.epoch, skip_batches=progress.batches_in_epoch, global_caption_prob=args.global_caption_prob,
        sample_n_box_each_image=args.sample_n_box_each_image, sentence_masking=args.sentence_masking,
        rank=info.rank, world_size=info.world_size, strict=args.strict, tokenize=tokenizer, drop_last=True,
        pin_memory=info.device.type == "cuda")
    return build_dataloader(args.train_data_image, args.train_data_text_box, options)


# --------------------------------------------------------------------------------------------
# Step


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
        self.replicated = [p for p in self.trainable if not is_sharded(p)] if fsdp else []
        self.lr_used = optimizer.param_groups[0]["lr"]  # the rate the last step trained at (first group)

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
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # the scheduler moves it on below
        self.optimizer.step()
        self.scheduler.step()
        if self.model.logit_scale.requires_grad:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, logit_scale_max())
        return PS3PretrainLoss(*(t.detach() for t in (loss.total, loss.contrastive, loss.bottomup, loss.topdown)))


# --------------------------------------------------------------------------------------------
# Report


def _skip_totals(counter, info: DistInfo) -> dict[str, int]:
    """Bad-data counts summed over ranks (a collective: called at the same step everywhere)."""
    from ..data.shards import SKIP_REASONS

    reasons = list(SKIP_REASONS)
    counts = torch.tensor([counter[r] for r in reasons], dtype=torch.float64)
    if info.distributed:
        dist.all_reduce(counts)
    return {r: int(c) for r, c in zip(reasons, counts.tolist()) if c}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


class _Reporter:
    """Rank 0's log lines, ``metrics.jsonl`` and (optionally) TensorBoard at the log steps."""

    def __init__(self, params: TrainParams, info: DistInfo, run_dir: Path, log: RankLog, first_step: int):
        self.log = log
        self.info = info
        self.steps = params.steps
        self.samples_per_step = params.batch_size * params.sample_n_box_each_image * info.world_size
        self.metrics = None
        if info.is_main:
            self.metrics = open(run_dir / "metrics.jsonl", "a+")
            # A run killed mid-line left a partial line: start on a fresh one.
            if self.metrics.tell() > 0:
                self.metrics.seek(self.metrics.tell() - 1)
                if self.metrics.read(1) != "\n":
                    self.metrics.write("\n")
        self.writer = None
        if params.tensorboard and info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.start, self.first_step = time.perf_counter(), first_step
        self.window_start, self.window_steps = self.start, 0

    def report(self, progress: Progress, loss: PS3PretrainLoss, lr: float, counter) -> None:
        """Called on every rank at the same steps (the skip counts are summed over ranks)."""
        parts = {k: float(v) for k, v in loss.as_dict().items()}  # host sync: log steps only
        if not math.isfinite(parts["total"]):
            raise UserError(f"the loss became {parts['total']} at step {progress.step}: lower --lr or "
                             "--selection-lr, or keep --grad-clip on")
        skipped = _skip_totals(counter, self.info)
        now = time.perf_counter()
        rate = self.window_steps * self.samples_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        eta = (now - self.start) / max(progress.step - self.first_step, 1) * (self.steps - progress.step)
        self.log.info(f"step {progress.step}/{self.steps}  loss {parts['total']:.4f} "
                      f"(siglip {parts['contrastive']:.4f}, bottom-up {parts['bottomup']:.4f}, "
                      f"top-down {parts['topdown']:.4f})  lr {lr:.3g}  "
                      f"{rate:.1f} samples/s  eta {_duration(eta)}  epoch {progress.epoch}  "
                      f"data skipped: {skipped or 'none'}")
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


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What the step loop works with."""

    params: TrainParams
    info: DistInfo
    run_dir: Path
    log: RankLog
    model: PS3Model
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress
    fsdp: bool

    def save(self) -> None:
        """Write the checkpoint of the current step (rank 0 writes; a collective under FSDP)."""
        model_state, optim_state = full_state_dicts(self.module, self.model, self.optimizer, self.fsdp)
        state = {"format": CHECKPOINT_FORMAT, "progress": asdict(self.progress), "model": model_state,
                 "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                 "args": self.params.as_dict(), "world_size": self.info.world_size, "fsdp": self.fsdp}
        path = on_main(self.info, lambda: save_checkpoint(self.run_dir, self.progress.step, state,
                                                          self.params.keep_checkpoints))
        self.log.info(f"saved {path}")

    def check(self, stop_check: StopCheck) -> bool:
        """Run ``stop_check`` on the model in eval mode, leaving every RNG stream as it was."""
        saved = rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                return bool(stop_check(self.progress.step, self.model))
        finally:
            self.model.train()
            set_rng_state(saved)


def _train(params: TrainParams, info: DistInfo, stop_check: StopCheck | None) -> TrainResult:
    log = RankLog(info.is_main, params.quiet)
    run_dir = Path(params.output_dir)
    on_main(info, lambda: prepare_run_dir(params, log))
    # Everything below reads the run directory, so every rank trains the same model.
    config = PS3Config.from_pretrained(run_dir)
    preprocessor = json.loads((run_dir / "preprocessor_config.json").read_text())
    tokenizer = PS3Tokenizer.from_pretrained(run_dir / TOKENIZER_DIR)
    resume, resume_state = find_resume(params, info, run_dir, log)

    fsdp = params.fsdp and info.distributed
    if params.fsdp and not fsdp:
        log.info("--fsdp has no effect in a single process: training unsharded")
    model, module = _build_model(params, info, config, resume_state, fsdp, log)
    optimizer = build_optimizer(model, params.lr, params.wd, (params.beta1, params.beta2), params.eps,
                                params.selection_lr)
    scheduler = build_scheduler(optimizer, params.warmup, params.steps)
    if params.warmup > params.steps:
        log.info(f"--warmup {params.warmup} is more than --steps {params.steps}: warming up over all "
                 f"{params.steps} steps (the rate reaches --lr only at the last step)")
    log.info(params.summary(model, info.device, info.world_size))
    progress = Progress()
    if resume_state is not None:
        progress = _restore(params, info, module, model, optimizer, scheduler, resume_state, resume, fsdp, log)
    if progress.step >= params.steps:
        log.info(f"already at step {progress.step} of {params.steps}: nothing to do")
        return TrainResult(progress.step, False, 0, 0.0)
    loader = _build_loader(params, info, preprocessor, tokenizer, progress)
    if resume_state is not None:
        set_rng_state(resume_state["rng"])
    del resume_state  # the optimizer and model hold their own copies now
    state = _Run(params, info, run_dir, log, model, module, optimizer, scheduler, progress, fsdp)
    return _run_steps(state, loader, stop_check)


def _run_steps(run: _Run, loader, stop_check: StopCheck | None) -> TrainResult:
    from tqdm import tqdm

    params, progress, info = run.params, run.progress, run.info
    step_fn = PretrainStep(run.module, run.model, run.optimizer, run.scheduler, device=info.device,
                           precision=params.precision, bottomup_weight=params.bottomup_loss_weight,
                           topdown_weight=params.topdown_loss_weight, grad_clip=params.grad_clip,
                           distributed=info.distributed, fsdp=run.fsdp)
    first_step, stopped = progress.step, False
    reporter = _Reporter(params, info, run.run_dir, run.log, first_step)
    bar = tqdm(total=params.steps, initial=progress.step, unit="step", desc="train", mininterval=1.0,
               disable=params.quiet or not info.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
    iterator, interrupted = iter(loader), False
    with StopRequests() as stop:
        try:
            while progress.step < params.steps and not stopped:
                batch = next_batch(iterator, stop)
                have = torch.tensor([0 if batch is None else 1, 0 if stop.signal is not None else 1])
                if info.distributed:  # an epoch ends for everybody when one rank runs out; a signal stops all
                    dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if int(have[1]) == 0:
                    interrupted = True
                    break
                if int(have[0]) == 0:
                    if progress.batches_in_epoch == 0:
                        raise UserError(f"epoch {progress.epoch} gave no full batch of --batch-size "
                                         f"{params.batch_size} on some rank: lower --batch-size or add data")
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
                last = progress.step == params.steps
                if progress.step % params.log_every == 0 or last:
                    reporter.report(progress, loss, step_fn.lr_used, loader.counter)
                if progress.step % params.save_every_steps == 0 or last:
                    run.save()
                    stopped = stop_check is not None and not last and run.check(stop_check)
            if interrupted and progress.step > first_step and progress.step % params.save_every_steps:
                run.save()  # the finished step (a multiple of --save-every-steps is saved already)
        finally:
            bar.close()
            reporter.close()
    seconds = time.perf_counter() - reporter.start
    if interrupted:
        signum = stop.signal if stop.signal is not None else int(signal.SIGTERM)  # another rank's signal
        saved = "saved" if progress.step > first_step else "nothing new to save"
        run.log.info(f"interrupted ({signal.Signals(signum).name}) at step {progress.step}, {saved}: continue with "
                     f"--resume latest, or export with: ps3 export {run.run_dir} OUT_DIR")
        return TrainResult(progress.step, False, progress.step - first_step, seconds, signum)
    if stopped:
        run.log.info(f"stopped at step {progress.step}: the stop check was met")
    run.log.info(f"done: {progress.step} steps; export with: ps3 export {run.run_dir} OUT_DIR")
    return TrainResult(progress.step, stopped, progress.step - first_step, seconds)
