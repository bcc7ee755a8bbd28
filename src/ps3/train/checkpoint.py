"""Checkpoints and the run directory of a training run (design §5).

Run directory::

    config.json  preprocessor_config.json  tokenizer/   (written once, before the first step)
    args.json    metrics.jsonl                          (the parameters; one line per logged step)
    checkpoints/step_XXXXXXXX.pt

A checkpoint (format ``ps3-train-checkpoint-v1``) holds the model (published key layout),
optimizer, scheduler, :class:`Progress`, RNG states (torch, CUDA, numpy, python), the run's
parameters, world size and whether FSDP wrote it. It is written to a temporary file, flushed to
disk and renamed, so a run killed at any moment leaves either the old or the new checkpoint,
never a half-written one under a checkpoint name; the last ``keep`` are kept. Reading loads
tensors only (``weights_only``), never arbitrary pickles.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import PS3Config
from ..runtime import UserError
from ..tokenizer import PS3Tokenizer
from .distributed import DistInfo, RankLog, on_main
from .model_setup import build_caption_tokenizer, get_model_spec, read_captions
from .params import TrainParams

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "TOKENIZER_DIR",
    "Progress",
    "checkpoint_path",
    "list_checkpoints",
    "read_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
    "write_atomic",
    "check_writable",
    "rng_state",
    "set_rng_state",
    "prepare_run_dir",
    "find_resume",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "ps3-train-checkpoint-v1"
TOKENIZER_DIR = "tokenizer"
_CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt")


@dataclass
class Progress:
    """Where the run is: optimizer steps done, and the data position (epoch, batches of it used)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


# --------------------------------------------------------------------------------------------
# Checkpoint files


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
    """Load a checkpoint (tensors only, no arbitrary pickles); ``UserError`` (a ``ValueError``) when it is
    incomplete, corrupt or not a ps3 training checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip raises RuntimeError, a missing file OSError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"checkpoint {path} is incomplete or unreadable ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a ps3 training checkpoint")
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
        raise UserError(f"could not write checkpoint {final} ({reason}); {intact}") from exc
    for _, old in list_checkpoints(run_dir)[:-keep]:
        try:
            old.unlink()
        except OSError:
            pass
    return final


def write_atomic(path: Path, text: str) -> None:
    """A run killed while writing leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale_temporaries(run_dir: Path, log: RankLog) -> None:
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
    """Create ``directory`` and write a probe file into it; ``UserError`` with a clear reason if not."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {directory} is not writable ({exc.strerror or exc}): choose a writable "
                        "--output-dir") from exc


# --------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states, as plain numbers and tensors (so checkpoints
    load with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------
# Run directory


def _resolve_spec(params: TrainParams):
    if params.model is not None:
        return get_model_spec(params.model)
    if params.init not in (None, "random") and Path(params.init).is_dir():
        return get_model_spec(params.init)
    raise UserError("--model is required (tiny-synthetic, PS3-4K-SigLIP2, …, or a config.json path) unless "
                     "--init is a PS3 checkpoint directory")


def _load_tokenizer(params: TrainParams, spec, log: RankLog) -> PS3Tokenizer:
    text = spec.config.text_config
    context = int(text.context_length)
    clean = (text.tokenizer_kwargs or {}).get("clean", "canonicalize")
    if params.tokenizer is not None:
        return PS3Tokenizer.from_pretrained(params.tokenizer, context_length=context)
    if params.init not in (None, "random") and (Path(params.init) / "tokenizer_config.json").is_file():
        return PS3Tokenizer.from_pretrained(params.init, context_length=context)
    if spec.tokenizer_name:
        return PS3Tokenizer.from_pretrained(spec.tokenizer_name, context_length=context, clean=clean)
    from ..data.shards import list_shards

    captions = read_captions(list_shards(params.train_data_text_box, argument="--train-data-text-box"),
                             params.tokenizer_samples)
    tokenizer = build_caption_tokenizer(captions, context, clean)
    log.info(f"built a word-level tokenizer ({tokenizer.vocab_size} tokens) from the captions of the first "
             f"{params.tokenizer_samples} samples")
    return tokenizer


def _run_tokenizer(params: TrainParams, spec, run_dir: Path, log: RankLog) -> PS3Tokenizer:
    """The tokenizer saved in the run directory, saving it first when this is a new run."""
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        return PS3Tokenizer.from_pretrained(tokenizer_dir)
    tokenizer = _load_tokenizer(params, spec, log)
    tmp = run_dir / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, tokenizer_dir)
    return tokenizer


def prepare_run_dir(params: TrainParams, log: RankLog) -> None:
    """Rank 0: check the output directory, and write the config, preprocessor and tokenizer the
    run trains with (kept from the first start, so a resumed run uses the same)."""
    from ..processor import PS3ImageProcessor

    run_dir = Path(params.output_dir)
    check_writable(run_dir)
    if not params.resume and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume latest to continue that run, or "
                         "choose another --output-dir")
    _remove_stale_temporaries(run_dir, log)
    spec = _resolve_spec(params)
    tokenizer = _run_tokenizer(params, spec, run_dir, log)
    config = spec.config
    if config.text_config.vocab_size is None:
        config.text_config.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > config.text_config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
                         f"{config.text_config.vocab_size}: use the model's tokenizer or a larger vocab_size")
    PS3ImageProcessor(**spec.preprocessor)  # validates it
    config_file, preprocessor_file = run_dir / "config.json", run_dir / "preprocessor_config.json"
    if config_file.is_file():
        existing = PS3Config.from_pretrained(run_dir)
        if existing.to_dict() != config.to_dict():
            raise UserError(f"{run_dir} belongs to a run with another model config ({config_file}): use a new "
                             "--output-dir or the same --model")
    else:
        write_atomic(config_file, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    if not preprocessor_file.is_file():
        write_atomic(preprocessor_file, json.dumps(spec.preprocessor, indent=2) + "\n")
    write_atomic(run_dir / "args.json", json.dumps(params.as_dict(), indent=2, sort_keys=True) + "\n")


def find_resume(params: TrainParams, info: DistInfo, run_dir: Path,
                log: RankLog) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint path, its state) to resume from as ``params.resume`` says, or (None, None).
    With ``latest``, rank 0 finds the newest readable checkpoint and every rank loads it."""
    if params.resume is None:
        return None, None
    if params.resume != "latest":
        return Path(params.resume), read_checkpoint(params.resume)
    cache: dict[str, Any] = {}

    def find() -> Path | None:
        found = load_latest_checkpoint(run_dir, log.warn, move_aside=True)
        if found is None:
            return None
        cache["state"] = found[1]  # rank 0 keeps what it already read
        return found[0]

    path = on_main(info, find)
    if path is None:
        log.info(f"--resume latest: no checkpoint in {run_dir / CHECKPOINT_DIR}, starting from step 0")
        return None, None
    return path, cache["state"] if "state" in cache else read_checkpoint(path)
