"""Training run → published model directory (design §1, §5.7).

The training model is a :class:`ps3.PS3Model` whose state dict already uses the published key
names (``vision_model.*``, ``text_model.*`` with the prompt projection under
``text_model.prompt_proj.*``, ``logit_scale``, ``logit_bias``), so export writes the checkpoint's
weights as they are, next to the run's config, preprocessor and tokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import PS3Config
from ..hub import check_and_load
from ..model import PS3Model
from ..processor import PS3ImageProcessor
from ..runtime import UserError, user_input
from ..tokenizer import PS3Tokenizer
from .checkpoint import TOKENIZER_DIR, load_latest_checkpoint, read_checkpoint

__all__ = ["export", "load_run_model"]


def load_run_model(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   warn=None) -> tuple[PS3Model, dict[str, Any], Path]:
    """The run's model with the weights of ``checkpoint`` (default: the latest readable one),
    in eval mode; also returns the checkpoint state and its path."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a training run directory (no config.json): pass the --output-dir of a run")
    if checkpoint is not None:
        path = Path(checkpoint)
        with user_input("--checkpoint"):
            state = read_checkpoint(path)
    else:
        found = load_latest_checkpoint(run, warn)
        if found is None:
            raise UserError(f"{run} holds no readable checkpoint to export")
        path, state = found
    config = PS3Config.from_pretrained(run)
    with torch.device("meta"):
        model = PS3Model(config)
    check_and_load(model, state["model"], where=f"checkpoint {path}")
    return model.eval(), state, path


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
           checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and the tokenizer
    files (``tokenizer_config.json``, ``tokenizer.json``) of ``run_dir``'s latest checkpoint (or
    ``checkpoint``) into ``out_dir``. Returns ``{"checkpoint": path, "step": step}``.

    The result loads with ``PS3Model`` / ``PS3VisionModel`` / ``PS3TextModel.from_pretrained``
    and ``PS3Tokenizer`` / ``PS3ImageProcessor.from_pretrained``.
    """
    run = Path(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.resolve():
        raise UserError("out_dir must differ from run_dir (the run directory holds the training config)")
    model, state, path = load_run_model(run, checkpoint,
                                        warn=lambda message: print(f"warning: {message}"))
    with user_input("OUT_DIR", errors=(OSError,)):
        out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    preprocessor_file = run / "preprocessor_config.json"
    if preprocessor_file.is_file():
        PS3ImageProcessor(**json.loads(preprocessor_file.read_text())).save_pretrained(out)
    tokenizer_dir = run / TOKENIZER_DIR
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        PS3Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return {"checkpoint": str(path), "step": int(state["progress"]["step"])}
