"""A trained MLLM run directory: what it holds, how it is written and loaded.

``RUN/``::

    mllm_config.json        format, the encoder's path or hub id, the LLM's source, image token,
                            k, budgets, looks, feature layer, prompt-head width, LoRA settings
    connector.safetensors   the projector (``projector.*``) and top-down prompt head (``prompt_head.*``)
    tokenizer/              the tokenizer, with the image token
    llm/                    the LLM (safetensors) when the run built it (``--llm tiny``) or trained it
                            fully; otherwise ``llm_source`` names it and it is loaded from there
    llm_adapter/            the LoRA adapter (peft's safetensors + JSON), on top of ``llm/`` or the source

The frozen PS3 encoder is never copied: ``vision`` names it. Every file is written to a
temporary name and renamed, so an interrupted save leaves the previous one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "mllm_config.json"
CONNECTOR_NAME = "connector.safetensors"
FORMAT = "ps3-mllm-v1"


@dataclass
class MLLMSettings:
    """What a run directory needs besides weights (``mllm_config.json``)."""

    vision: str
    llm_source: str
    image_token: str = "<image>"
    k: int = 2
    budgets: list[int] | None = None
    num_looks: int = 1
    feature_layer: int = -1
    prompt_head_hidden: int | None = None
    lora: int = 0
    llm_saved: bool = False
    stage: str = "align"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def read(cls, run: str | Path) -> "MLLMSettings":
        path = Path(run) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{run} is not an MLLM run directory (no {CONFIG_NAME}): pass the --out of "
                             "`ps3 mllm train`")
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _replace_dir(write, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fit_vocabulary(llm, tokenizer) -> None:
    """Give the LLM an embedding row for every token of ``tokenizer`` (the image token added to a
    pretrained tokenizer): new rows are the mean of the existing ones, so loading repeats it exactly."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for table in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            if table is not None and table.weight.shape[0] == len(tokenizer):
                table.weight[rows:] = table.weight[:rows].mean(0)


def save_llm(llm, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The LLM as safetensors + config; of a peft model, the base weights without the adapter.
    ``state`` (full tensors by the LLM's own names) replaces the module's: a sharded LLM's."""
    if state is None and hasattr(llm, "get_base_model"):
        llm = llm.get_base_model()
        state = {k.replace(".base_layer", ""): v for k, v in llm.state_dict().items() if "lora_" not in k}
    _replace_dir(lambda tmp: llm.save_pretrained(tmp, state_dict=state, safe_serialization=True), directory)


def save_run(helper, run: str | Path, settings: MLLMSettings, *, save_llm_weights: bool,
             state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trained parts of ``helper`` (a TwoPassPS3, its LLM maybe a peft model) to ``run``;
    ``state``, the helper's full state dict, replaces the modules' own tensors (those of a
    sharded helper, gathered for the write)."""
    from safetensors.torch import save_file

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    if state is None:
        tensors = {f"projector.{k}": v for k, v in helper.projector.state_dict().items()}
        tensors.update({f"prompt_head.{k}": v for k, v in helper.prompt_head.state_dict().items()})
    else:
        tensors = {k: v for k, v in state.items() if k.startswith(("projector.", "prompt_head."))}
    tmp = run / f".{CONNECTOR_NAME}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, run / CONNECTOR_NAME)
    if settings.lora:
        _replace_dir(lambda d: helper.llm.save_pretrained(d, safe_serialization=True), run / "llm_adapter")
    elif save_llm_weights:
        save_llm(helper.llm, run / "llm", None if state is None else
                 {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")})
        settings.llm_saved = True
    write_text(run / CONFIG_NAME, settings.to_json())


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_llm(settings: MLLMSettings, run: Path, tokenizer, *, trainable: bool = False):
    """The run's LLM: its saved weights or the source, the vocabulary fitted, the adapter applied."""
    from transformers import AutoModelForCausalLM

    source = str(run / "llm") if settings.llm_saved else settings.llm_source
    llm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    fit_vocabulary(llm, tokenizer)
    if settings.lora and (run / "llm_adapter").is_dir():
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(run / "llm_adapter"), is_trainable=trainable)
    return llm


def load_run(run: str | Path, *, device: str | torch.device | None = None, trainable: bool = False):
    """A TwoPassPS3 with the run's trained parts, its ``tokenizer``, ``processor`` (the encoder's image
    processor) and ``settings`` attached; in eval mode unless ``trainable``."""
    from safetensors.torch import load_file

    from ..runtime import load_model, parse_device

    run = Path(run)
    settings = MLLMSettings.read(run)
    tokenizer = load_tokenizer(run / "tokenizer")
    llm = load_llm(settings, run, tokenizer, trainable=trainable)
    loaded = load_model(settings.vision, device="cpu")
    helper = build_helper(loaded.vision, llm, tokenizer, settings)
    state = load_file(str(run / CONNECTOR_NAME))
    helper.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
    helper.prompt_head.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("prompt_head.")})
    helper.tokenizer, helper.processor, helper.settings = tokenizer, loaded.processor, settings
    helper.to(parse_device(device))
    return helper.train(trainable)


def build_helper(vision, llm, tokenizer, settings: MLLMSettings):
    """TwoPassPS3 around ``vision`` (frozen) and ``llm`` with the settings' options."""
    from .topdown import TwoPassPS3

    image_id = tokenizer.convert_tokens_to_ids(settings.image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {settings.image_token!r} token")
    vision.requires_grad_(False).eval()
    helper = TwoPassPS3(vision, llm, image_token_id=image_id, k=settings.k,
                        max_select_num_each_scale=settings.budgets, num_look_close=settings.num_looks,
                        feature_layer=settings.feature_layer, prompt_head_hidden=settings.prompt_head_hidden)
    helper.tokenizer, helper.settings = tokenizer, settings
    return helper


def save_pretrained(helper, run: str | Path, *, settings: MLLMSettings | None = None, tokenizer=None) -> None:
    """Write a complete run directory for ``helper`` (its ``settings`` and ``tokenizer`` unless
    given): the tokenizer, the connector, and the LLM weights unless the source alone rebuilds them."""
    settings = settings or getattr(helper, "settings", None)
    tokenizer = tokenizer or getattr(helper, "tokenizer", None)
    if settings is None or tokenizer is None:
        raise ValueError("pass settings= (an MLLMSettings naming the encoder and LLM) and tokenizer= for a helper "
                         "not built by ps3.mllm")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    _replace_dir(lambda d: tokenizer.save_pretrained(str(d)), run / "tokenizer")
    if settings.lora and (settings.llm_saved or settings.llm_source == "tiny") and not (run / "llm").is_dir():
        save_llm(helper.llm, run / "llm")
        settings.llm_saved = True
    trained_llm = any(p.requires_grad for p in helper.llm.parameters())
    save_run(helper, run, settings, save_llm_weights=not settings.lora and (
        settings.llm_saved or settings.llm_source == "tiny" or trained_llm))



def look_options(helper) -> dict:
    """The helper's look settings as :func:`ps3.mllm.encode_for_llm` keywords: k, cells per
    high-res scale per look, looks."""
    return {"k": helper.k, "max_select_num_each_scale": helper.max_select_num_each_scale,
            "num_look_close": helper.num_look_close}
