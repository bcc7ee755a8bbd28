"""``ps3 mllm train``: train PS3 + projector (+ prompt head + LLM) on LLaVA-format conversations.

Each step takes ``batch`` records per process in a seeded order (a new permutation each epoch),
encodes their images with the frozen PS3 encoder — the low-res pass once per image, reused by the
high-res looks (sft: the two-pass top-down helper; align: bottom-up looks) — splices the projected
image tokens into the conversation and takes the LM loss on answer tokens only; in sft, a turn
with boxes adds the selection loss of the look its question steered (``selection_weight``).

Checkpoints (``RUN/checkpoints/step_*.pt``, written as ``ps3 train`` writes them) hold the
connector, the trainable LLM weights, optimizer, schedule, progress and RNG states; Ctrl-C or
SIGTERM ends the step under way, writes a checkpoint and the run's inference files, and exits;
``--resume`` continues from the newest checkpoint and ends with the weights an uninterrupted run
has (on a CPU, bit for bit). Under ``torchrun`` the processes train with DDP (gloo on CPUs,
NCCL on GPUs), or with ``fsdp`` shard the LLM with FSDP2 (one unit per decoder layer, the frozen
encoder replicated; :mod:`ps3.mllm.sharding`) for an LLM too large for one device: checkpoints and
the run directory then gather full tensors (every rank takes part, rank 0 writes) and a resume
hands every rank the full tensors to keep its shard of.
"""
from __future__ import annotations

import gc
import json
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..runtime import UserError
from ..train.checkpoint import (CHECKPOINT_FORMAT, Progress, load_latest_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from ..train.distributed import DistInfo, RankLog, init_distributed, on_main
from ..train.interrupt import StopRequests
from ..train.optim import build_scheduler
from .collate import MLLMBatch, collate
from .block_looks import encode_for_llm, encode_low_res, encoder_of
from .low_res_cache import LowResCache
from .saving import look_options, save_run
from .sharding import gather, local_share, scatter, shard
from .topdown import IGNORE_INDEX, selection_target_loss, splice_image_tokens
from .train_setup import RESUME_FREE, MLLMTrainParams, load_data, prepare_run

KIND = "ps3-mllm"


@dataclass
class MLLMTrainResult:
    step: int
    steps_run: int
    seconds: float
    samples: int
    interrupted: str | None  # "SIGINT" / "SIGTERM" when a signal ended the run
    last_loss: float | None
    helper: nn.Module | None = None  # the trained TwoPassPS3 (its LLM a peft model with LoRA)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over labelled positions, their count); IGNORE_INDEX
    positions (prompt, image, padding) contribute nothing."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


class MLLMLoss(nn.Module):
    """The training forward of a TwoPassPS3 (what DDP or FSDP wraps): batch → (loss, LM loss,
    selection loss).

    ``lockstep`` (FSDP): every step makes the same LLM calls on every process whatever its rows are
    — in sft one pass-1 call without gradients (a one-token stand-in where this process has no
    image rows), then one call over the image and text rows together — because each call of a
    sharded layer gathers its weights collectively, and processes making different calls would
    wait for each other forever. Otherwise image and text rows take separate calls."""

    def __init__(self, helper, stage: str, selection_weight: float = 1.0, cache: LowResCache | None = None,
                 lockstep: bool = False):
        super().__init__()
        self.helper, self.stage, self.selection_weight, self.cache = helper, stage, selection_weight, cache
        self.lockstep = lockstep

    def image_sequence(self, batch: MLLMBatch):
        """(inputs_embeds, attention_mask, labels, top-down probabilities or None) of the image rows."""
        h, rows = self.helper, batch.image
        low = None if self.cache is None else self.cache.get(h.vision_model, batch.image_keys, batch.pixel_values)
        if self.stage == "sft":
            out = h(batch.pixel_values, rows.input_ids, rows.attention_mask, labels=rows.labels,
                    prompt_end=batch.prompt_end, low_res=low)
            return out.inputs_embeds, out.attention_mask, out.labels, out.vision.topdown_selection_probs
        with torch.no_grad():
            low = low if low is not None else encode_low_res(h.vision_model, batch.pixel_values)
            vision = encode_for_llm(h.vision_model, batch.pixel_values, low_res=low, **look_options(h))
        image = h.projector(vision, feature_layer=h.feature_layer)
        text = h.llm.get_input_embeddings()(rows.input_ids)
        seq = splice_image_tokens(text, rows.attention_mask, batch.image_position, image.embeds, image.lengths,
                                  rows.labels)
        return seq.inputs_embeds, seq.attention_mask, seq.labels, None

    def _pass1_stand_in(self) -> None:
        """A no-gradient LLM call on one zero token: the pass 1 that processes with image rows make."""
        table = self.helper.llm.get_input_embeddings()
        with torch.no_grad():
            self.helper.llm(inputs_embeds=torch.zeros(1, 1, table.embedding_dim, dtype=table.weight.dtype,
                                                      device=table.weight.device), use_cache=False)

    def forward(self, batch: MLLMBatch):
        llm = self.helper.llm
        parts, selection = [], None  # (inputs_embeds, attention_mask, labels) per LLM call
        if batch.image is not None:
            embeds, mask, labels, probs = self.image_sequence(batch)
            parts.append((embeds, mask, labels))
            if probs is not None and batch.box_rows is not None:
                selection = selection_target_loss([p[batch.box_rows] for p in probs], batch.box_maps)
        elif self.lockstep and self.stage == "sft":
            self._pass1_stand_in()
        if batch.text is not None:
            t = batch.text
            embeds = llm.get_input_embeddings()(t.input_ids)
            if batch.image is None and not embeds.requires_grad and torch.is_grad_enabled():
                # align (frozen LLM), text rows only: nothing trained is used, so the loss would have no
                # gradient (backward fails, and DDP/FSDP peers would wait for this process). An exact
                # zero from the projector gives it one, all zeros.
                embeds = embeds + next(self.helper.projector.parameters()).reshape(-1)[0] * 0
            parts.append((embeds, t.attention_mask, t.labels))
        if self.lockstep and len(parts) > 1:
            parts = [_stack_rows(parts)]
        sums, counts = [], []
        for embeds, mask, labels in parts:
            total, count = lm_loss_sum(llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits, labels)
            sums.append(total)
            counts.append(count)
        lm = torch.stack(sums).sum() / torch.stack(counts).sum().clamp(min=1)
        loss = lm if selection is None else lm + self.selection_weight * selection
        return loss, lm.detach(), None if selection is None else selection.detach()


def _stack_rows(parts):
    """One right-padded batch of the rows of several (inputs_embeds, attention_mask, labels)."""
    length = max(e.shape[1] for e, _, _ in parts)
    dtype = parts[0][0].dtype
    embeds = torch.cat([F.pad(e.to(dtype), (0, 0, 0, length - e.shape[1])) for e, _, _ in parts])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m, _ in parts])
    labels = torch.cat([F.pad(y, (0, length - y.shape[1]), value=IGNORE_INDEX) for _, _, y in parts])
    return embeds, mask, labels


def batch_order(count: int, seed: int, epoch: int, info: DistInfo, batch: int) -> list[list[int]]:
    """This process's full batches of epoch ``epoch`` (record indices), the same on every start."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    mine = order[info.rank::info.world_size]
    per_rank = count // info.world_size  # every rank takes the same number of batches
    return [mine[i:i + batch] for i in range(0, per_rank - batch + 1, batch)]


def _optimizer(helper, lr: float) -> torch.optim.AdamW:
    decay, plain = [], []
    for _, p in helper.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": plain, "weight_decay": 0.0}],
                             lr=lr)


def _saved_names(helper) -> set[str]:
    """The connector and every trainable LLM tensor: what a checkpoint must restore."""
    return {n for n, p in helper.named_parameters() if p.requires_grad or n.startswith(("projector.", "prompt_head."))}


def _saved_tensors(helper) -> dict[str, torch.Tensor]:
    names = _saved_names(helper)
    return {n: p.detach().cpu().clone() for n, p in helper.named_parameters() if n in names}


class _Run:
    def __init__(self, params: MLLMTrainParams, info: DistInfo, log: RankLog):
        self.params, self.info, self.log = params, info, log
        self.data = load_data(params, log)
        self.helper, self.settings = prepare_run(params, info, self.data, log)
        self.encoder = encoder_of(self.helper.vision_model)
        self.progress, self.skipped = Progress(), Counter()
        self.saved_names = _saved_names(self.helper)
        cache = LowResCache() if params.cache_low_res else None
        self.module: nn.Module = MLLMLoss(self.helper, params.stage, params.selection_weight, cache,
                                          lockstep=params.fsdp)
        if params.fsdp:  # before the optimizer: it must hold the sharded parameters
            layers = shard(self.module, self.helper)
            log.info(f"--fsdp: {layers} decoder layers of {type(self.helper.llm).__name__} sharded over "
                     f"{info.world_size} processes (this one stores {local_share(self.helper.llm):.0%} of the LLM), "
                     "the encoder replicated")
        elif info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)
        self.optimizer = _optimizer(self.helper, params.learning_rate)
        self.scheduler = build_scheduler(self.optimizer, params.warmup, params.steps)
        self.trainable = [p for p in self.helper.parameters() if p.requires_grad]

    def restore(self) -> dict | None:
        found = on_main(self.info, lambda: load_latest_checkpoint(self.params.out, self.log.warn, move_aside=True))
        if found is None:
            self.log.info(f"--resume: no checkpoint in {self.params.out}, starting from step 0")
            return None
        path, state = found
        if state.get("kind") != KIND:
            raise UserError(f"{path} is not a ps3 mllm checkpoint")
        if state["args"].get("fsdp", False) != self.params.fsdp:
            raise UserError(f"{path} was written {'with' if not self.params.fsdp else 'without'} --fsdp: resume "
                            "with the same --fsdp setting (the optimizer states differ in layout)")
        if self.params.fsdp:
            scatter(self.module, self.helper, self.optimizer, state["model"], state["optimizer"])
        else:
            current = dict(self.helper.named_parameters())
            with torch.no_grad():
                for name, tensor in state["model"].items():
                    current[name].copy_(tensor)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        self.skipped = Counter(state.get("skipped", {}))
        changed = [k for k, v in state["args"].items() if k not in RESUME_FREE and v != getattr(self.params, k)]
        if changed or state.get("world_size", 1) != self.info.world_size:
            self.log.warn(f"resuming with a different {', '.join(changed) or 'world size'}: the run continues, "
                          "but not exactly as the original would have")
        self.log.info(f"resumed from {path} at step {self.progress.step}")
        return state["rng"]

    def save(self) -> None:
        full = None
        if self.params.fsdp:  # collective: every rank gathers, rank 0 receives the full tensors
            full, optimizer = gather(self.module, self.helper, self.optimizer)
            model = {k: v for k, v in full.items() if k in self.saved_names}
        else:
            model, optimizer = _saved_tensors(self.helper), self.optimizer.state_dict()
        state = {"format": CHECKPOINT_FORMAT, "kind": KIND, "progress": asdict(self.progress),
                 "model": model, "optimizer": optimizer,
                 "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "args": self.params.as_dict(),
                 "world_size": self.info.world_size, "skipped": dict(self.skipped)}

        def write():
            path = save_checkpoint(self.params.out, self.progress.step, state, self.params.keep)
            save_run(self.helper, self.params.out, self.settings,
                     save_llm_weights=self.params.stage == "sft" and not self.params.lora, state=full)
            return path

        self.log.info(f"saved {on_main(self.info, write)}")

    def step(self, batch: MLLMBatch) -> torch.Tensor:
        autocast = (torch.autocast(self.info.device.type, dtype=torch.bfloat16) if self.params.precision == "bf16"
                    else nullcontext())
        with autocast:
            loss, lm, selection = self.module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return torch.stack([loss.detach(), lm, torch.zeros_like(lm) if selection is None else selection])


def _batches(run: _Run):
    """(epoch, index in epoch, batch) from the current progress on, forever."""
    p, info = run.params, run.info
    records, helper = run.data.records, run.helper
    epoch, skip = run.progress.epoch, run.progress.batches_in_epoch
    while True:
        order = batch_order(len(records), p.seed, epoch, info, p.batch)
        if not order:
            raise UserError(f"{len(records)} usable records make no full --batch {p.batch} on each of "
                            f"{info.world_size} processes: lower --batch")
        for i, indices in enumerate(order[skip:], start=skip):
            batch = collate([records[j] for j in indices], helper.tokenizer, helper.image_token_id,
                            helper.processor, run.encoder)
            yield epoch, i + 1, batch
        epoch, skip = epoch + 1, 0


def train(params: MLLMTrainParams, *, on_step: Callable[[int], None] | None = None) -> MLLMTrainResult:
    """Train (or resume) the run ``params`` describes; ``on_step(step)`` is called after each step."""
    params.check()
    info = init_distributed(params.device)
    if params.fsdp and not info.distributed:
        raise UserError("--fsdp shards the LLM across processes: launch with torchrun --nproc_per_node N (N >= 2) "
                        "-m ps3.cli mllm train ..., or drop --fsdp")
    log = RankLog(info.is_main, params.quiet)
    run = None
    try:
        run = _Run(params, info, log)
        rng = run.restore() if params.resume else None
        if rng is not None:
            set_rng_state(rng)
        with StopRequests() as stop:
            return _loop(run, stop, on_step)
    finally:
        if info.distributed and dist.is_initialized():
            # DDP's reducer holds the process group: freed after the group is destroyed, gloo's
            # destructor waits for its own thread, which waits for the interpreter lock (a hang).
            if run is not None:
                run.module = None
            gc.collect()
            dist.destroy_process_group()


def _stop_requested(run: _Run, stop: StopRequests) -> bool:
    flag = torch.tensor([0 if stop.signal is None else 1])
    if run.info.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _loop(run: _Run, stop: StopRequests, on_step) -> MLLMTrainResult:
    from tqdm import tqdm

    p, progress, log = run.params, run.progress, run.log
    first, samples, last = progress.step, 0, None
    metrics = open(Path(p.out) / "metrics.jsonl", "a") if run.info.is_main else None
    bar = tqdm(total=p.steps, initial=progress.step, unit="step", desc=f"mllm {p.stage}", mininterval=1.0,
               disable=p.quiet or not run.info.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
    start = window = time.perf_counter()
    window_samples, stopped = 0, None
    batches = _batches(run) if progress.step < p.steps else iter(())
    try:
        while progress.step < p.steps:
            progress.epoch, progress.batches_in_epoch, batch = next(batches)
            run.skipped.update(batch.skipped)
            losses = run.step(batch)
            progress.step += 1
            samples += batch.size
            window_samples += batch.size * run.info.world_size
            bar.update(1)
            if on_step is not None:
                on_step(progress.step)
            if progress.step % p.log_every == 0 or progress.step == p.steps:
                now = time.perf_counter()
                last = [float(v) for v in losses]  # host sync: log steps only
                rate = window_samples / max(now - window, 1e-9)
                window, window_samples = now, 0
                log.info(f"step {progress.step}/{p.steps}  loss {last[0]:.4f} (lm {last[1]:.4f}, selection "
                         f"{last[2]:.4f})  lr {run.scheduler.get_last_lr()[0]:.3g}  {rate:.1f} samples/s  "
                         f"epoch {progress.epoch}  data skipped: {dict(run.skipped) or 'none'}")
                if metrics is not None:
                    metrics.write(json.dumps({"step": progress.step, "loss": last[0], "lm": last[1],
                                              "selection": last[2], "samples_per_s": rate}) + "\n")
                    metrics.flush()
            if _stop_requested(run, stop):
                stopped = "signal on another rank" if stop.signal is None else signal.Signals(stop.signal).name
                break
            if progress.step % p.save_every == 0 or progress.step == p.steps:
                run.save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if stopped:
        run.save()
        log.info(f"stopped by {stopped} at step {progress.step}: continue with the same command and --resume")
    elif progress.step == first:
        log.info(f"already at step {progress.step} of {p.steps}: nothing to do")
    else:
        log.info(f"done: {progress.step} steps; chat with: ps3 mllm chat {p.out} IMAGE")
    return MLLMTrainResult(progress.step, progress.step - first, time.perf_counter() - start, samples, stopped,
                           None if last is None else last[0], run.helper)
