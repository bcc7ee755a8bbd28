"""What ``ps3 mllm train`` builds before its first step: the parameters, the data, the tokenizer,
the LLM (``tiny``, a Hugging Face directory or id, or an earlier run's with ``--init``), the
TwoPassPS3 helper with the stage's trainable parts, and the run directory's fixed files.

Stages: ``align`` trains the projector only (encoder, LLM and prompt head frozen); ``sft`` trains
the projector, the top-down prompt head and the LLM (all of it, or LoRA adapters via peft with
``lora`` > 0).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..runtime import UserError, user_input
from ..train.checkpoint import check_writable, list_checkpoints
from ..train.distributed import DistInfo, RankLog, on_main
from .conversations import IMAGE_TAG, Dataset, load_conversations
from .saving import (CONFIG_NAME, MLLMSettings, build_helper, fit_vocabulary, load_run, load_tokenizer, save_llm,
                     write_text)

STAGES = ("align", "sft")
DEFAULT_LR = {"align": 1e-3, "sft": 2e-4}
# Parameters whose change does not make a resumed run differ from the original (the rest warn).
RESUME_FREE = {"steps", "resume", "quiet", "save_every", "log_every", "keep", "device"}


@dataclass
class MLLMTrainParams:
    """The flags of ``ps3 mllm train`` (see ``ps3 mllm train --help``)."""

    data: str
    out: str
    vision: str | None = None
    llm: str | None = None
    images: str | None = None
    init: str | None = None
    stage: str = "align"
    steps: int = 100
    batch: int = 8
    lr: float | None = None
    warmup: int = 0
    precision: str = "fp32"
    lora: int = 0
    fsdp: bool = False
    budgets: list[int] | None = None
    looks: int = 1
    k: int = 2
    selection_weight: float = 1.0
    cache_low_res: bool = False
    seed: int = 0
    resume: bool = False
    save_every: int = 50
    log_every: int = 10
    keep: int = 2
    device: str = "cpu"
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MLLMTrainParams":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    def check(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("steps", "batch", "save_every", "log_every", "keep", "looks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "looks" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lora < 0 or self.warmup < 0:
            raise UserError("--lora and --warmup must be >= 0")
        if self.lora and self.stage != "sft":
            raise UserError("--lora trains LoRA adapters of the LLM: it needs --stage sft (align freezes the LLM)")
        if self.fsdp and self.lora:
            raise UserError("--fsdp and --lora cannot be combined: LoRA adapters are small, train them without "
                            "--fsdp (DDP), or train the whole LLM with --fsdp")
        if self.learning_rate <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.init is None and not self.resume and (self.vision is None or self.llm is None):
            raise UserError("pass --vision (a PS3 model directory or hub id) and --llm (a Hugging Face causal LM, "
                            "or tiny), or --init RUN to start from an earlier run")


def load_data(params: MLLMTrainParams, log: RankLog) -> Dataset:
    with user_input("--data"):
        data = load_conversations(params.data, params.images)
    log.info(f"data: {data.summary()}")
    if not data.records:
        raise UserError(f"--data {params.data}: no usable record (see the skip counts above)")
    return data


def _pretrained_tokenizer(source: str):
    tokenizer = load_tokenizer(source)
    if IMAGE_TAG not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TAG]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _new_parts(params: MLLMTrainParams, data: Dataset, log: RankLog):
    """(settings, tokenizer, llm, vision source, init helper or None) of a run that starts now."""
    from .tiny_llm import build_tiny_llm, build_tokenizer, conversation_text

    if params.init is not None:
        with user_input("--init"):
            init = load_run(params.init, trainable=True)
        llm = init.llm.merge_and_unload() if hasattr(init.llm, "merge_and_unload") else init.llm
        settings = MLLMSettings(**{**asdict(init.settings), "lora": 0})
        return settings, init.tokenizer, llm, init
    settings = MLLMSettings(vision=_source(params.vision), llm_source=params.llm)
    if params.llm == "tiny":
        tokenizer = build_tokenizer(conversation_text(data.records))
        log.info(f"--llm tiny: a byte-level BPE tokenizer of {len(tokenizer)} tokens from the training text")
        return settings, tokenizer, build_tiny_llm(len(tokenizer), params.seed), None
    from transformers import AutoModelForCausalLM

    settings.llm_source = _source(params.llm)
    with user_input("--llm"):
        tokenizer = _pretrained_tokenizer(settings.llm_source)
        llm = AutoModelForCausalLM.from_pretrained(settings.llm_source, dtype=torch.float32)
    fit_vocabulary(llm, tokenizer)
    return settings, tokenizer, llm, None


def _source(name: str) -> str:
    """A local directory as an absolute path (the run is loadable from anywhere), a hub id as given."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def _apply_flags(settings: MLLMSettings, params: MLLMTrainParams) -> None:
    settings.stage, settings.lora, settings.k, settings.num_looks = params.stage, params.lora, params.k, params.looks
    if params.budgets is not None:
        settings.budgets = list(params.budgets)


def prepare_run(params: MLLMTrainParams, info: DistInfo, data: Dataset, log: RankLog):
    """The helper of this run (new, from ``--init``, or as saved for ``--resume``) and its settings;
    rank 0 writes the run's fixed files (tokenizer, base LLM, config) before anything trains."""
    run = Path(params.out)
    on_main(info, lambda: _check_out(params, run))
    existing = params.resume and (run / CONFIG_NAME).is_file()
    if existing:
        settings = MLLMSettings.read(run)
        tokenizer = load_tokenizer(run / "tokenizer")
        from .saving import load_llm

        llm = load_llm(MLLMSettings(**{**asdict(settings), "lora": 0}), run, tokenizer)
        init = None
    else:
        settings, tokenizer, llm, init = _new_parts(params, data, log)
        settings.llm_saved = settings.llm_source == "tiny" or (init is not None and init.settings.llm_saved)
    _apply_flags(settings, params)

    def write_fixed() -> None:
        if existing:
            return
        tokenizer.save_pretrained(str(run / "tokenizer"))
        if settings.llm_saved:
            save_llm(llm, run / "llm")
        write_text(run / CONFIG_NAME, settings.to_json())

    from ..runtime import load_model

    with user_input("--vision"):  # before anything is written: a wrong --vision leaves --out empty
        loaded = load_model(settings.vision, device="cpu")
    on_main(info, write_fixed)
    torch.manual_seed(params.seed)
    helper = build_helper(loaded.vision, llm, tokenizer, settings)
    helper.processor = loaded.processor
    if init is not None:
        helper.projector.load_state_dict(init.projector.state_dict())
        helper.prompt_head.load_state_dict(init.prompt_head.state_dict())
    set_trainable(helper, params)
    return helper.to(info.device), settings


def _check_out(params: MLLMTrainParams, run: Path) -> None:
    check_writable(run)
    if not params.resume and (list_checkpoints(run) or (run / CONFIG_NAME).is_file()):
        raise UserError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")


def set_trainable(helper, params: MLLMTrainParams) -> None:
    """The stage's trainable parts (module docstring); LoRA wraps the LLM in a peft model."""
    helper.vision_model.requires_grad_(False)
    helper.projector.requires_grad_(True)
    helper.prompt_head.requires_grad_(params.stage == "sft")
    helper.llm.requires_grad_(params.stage == "sft" and not params.lora)
    if params.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=params.lora, lora_alpha=2 * params.lora, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        helper.llm = get_peft_model(helper.llm, config)
