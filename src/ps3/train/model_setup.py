"""The model side of pre-training: named training configs, initialisation, the tokenizer, and
the module the training loop runs (design §1, §3.14, §5).

* :func:`get_model_spec` turns a config name (``tiny-synthetic``, the published ``PS3-*`` names)
  or a ``config.json`` path into a :class:`ps3.PS3Config` plus a preprocessor dict.
* :func:`initialise` fills a fresh :class:`ps3.PS3Model` from random init, a PS3 checkpoint
  directory, or SigLIP backbone weights in timm / open_clip naming (:func:`load_siglip_weights`
  reports what was loaded and what stayed random).
* :func:`build_caption_tokenizer` makes a small word-level tokenizer from training captions
  (for ``tiny-synthetic``, which has no pretrained tokenizer).
* :class:`PS3PretrainModule` is the training forward: text tower → prompt → PS3 vision tower
  in pre-training mode. It holds the :class:`ps3.PS3Model` as ``.model``, whose state dict is
  the published layout, so checkpoints and exports need no key renaming.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..config import PS3Config
from ..model import PS3Model
from ..tokenizer import PS3Tokenizer, clean_text
from ..registry import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, TRAINING_CONFIGS, preprocessor_dict, training_config

__all__ = [
    "TRAINING_CONFIGS",
    "ModelSpec",
    "get_model_spec",
    "InitReport",
    "initialise",
    "load_siglip_weights",
    "build_caption_tokenizer",
    "read_captions",
    "PS3PretrainModule",
]

_PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass
class ModelSpec:
    """What a training run is built from.

    config: the joint config; ``text_config.vocab_size`` is ``None`` when it must come from a
        tokenizer built from the training captions.
    preprocessor: ``PS3ImageProcessor`` keyword arguments (``preprocessor_config.json``).
    tokenizer_name: hub id or directory of the tokenizer, or ``None`` to build one from captions.
    """

    config: PS3Config
    preprocessor: dict[str, Any]
    tokenizer_name: str | None


def get_model_spec(name_or_path: str | os.PathLike) -> ModelSpec:
    """A registry name (see :data:`TRAINING_CONFIGS`) or the path of a ``config.json`` in the
    published layout (or of the directory holding it). A ``preprocessor_config.json`` beside the
    file is used when present; otherwise images are squashed to the largest PS3 scale."""
    if isinstance(name_or_path, str) and name_or_path in TRAINING_CONFIGS:
        joint, preprocessor = training_config(name_or_path)
        config = PS3Config(**joint)
        tokenizer = config.text_config.hf_tokenizer_name
        return ModelSpec(config, preprocessor, tokenizer)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a config name or a config.json path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {str(name_or_path)!r} is neither a known config ({', '.join(TRAINING_CONFIGS)}) "
                         "nor an existing config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read the model config {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("vision_config"), dict) \
            or not isinstance(data.get("text_config"), dict):
        raise ValueError(f"{path} is not a joint PS3 config (it needs 'vision_config' and 'text_config' dicts)")
    config = PS3Config.from_dict(data)
    preprocessor_file = path.parent / _PREPROCESSOR_NAME
    if preprocessor_file.is_file():
        preprocessor = json.loads(preprocessor_file.read_text())
    else:
        preprocessor = preprocessor_dict(int(config.vision_config.ps3_scales[-1]))
    return ModelSpec(config, preprocessor, config.text_config.hf_tokenizer_name)


# --------------------------------------------------------------------------------------------
# Tokenizer from captions


def read_captions(text_box_shards: Sequence[str], limit: int) -> list[str]:
    """Up to ``limit`` samples' captions (local and global) from text-box tar shards, in order.

    Shards are read by :func:`ps3.data.shards.iter_shard`; damaged shards and records that do
    not parse are ignored here (the data pipeline counts them).
    """
    from ..data.shards import iter_shard

    captions: list[str] = []
    samples = 0
    for shard in text_box_shards:
        for sample in iter_shard(shard):
            if samples >= limit:
                return captions
            try:
                record = json.loads(sample["json"]) if "json" in sample else None
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            samples += 1
            texts = record.get("text")
            if isinstance(texts, list):
                captions += [t for t in texts if isinstance(t, str)]
            if isinstance(record.get("global_text"), str):
                captions.append(record["global_text"])
    return captions


def build_caption_tokenizer(captions: Iterable[str], context_length: int, clean: str = "canonicalize",
                            min_frequency: int = 1) -> PS3Tokenizer:
    """A word-level tokenizer over the words of ``captions`` (cleaned like the tokenizer cleans
    its input), with ``[PAD]`` = 0 and ``[UNK]`` = 1, wrapped in a :class:`ps3.PS3Tokenizer`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    cleaned = [clean_text(c, clean) for c in captions]
    if not any(cleaned):
        raise ValueError("no captions to build a tokenizer from: the text-box shards hold no readable captions")
    backend = Tokenizer(WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"], min_frequency=min_frequency, show_progress=False)
    backend.train_from_iterator(cleaned, trainer=trainer)
    return PS3Tokenizer(backend, context_length, clean, pad_token="[PAD]")


# --------------------------------------------------------------------------------------------
# Initialisation


@dataclass
class InitReport:
    """What an initialisation loaded. Keys are in the published layout (``vision_model.*``, ...).

    loaded: model keys filled from the source.
    random: model keys that kept their fresh initialisation.
    ignored: source keys with no place in the model (as named in the source).
    mismatched: ``"key: source shape vs model shape"`` for keys whose shapes differ (kept random).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self, show: int = 6) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:show]) + (f", … (+{len(keys) - show})" if len(keys) > show else "")

        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.random)} kept random"]
        if self.random:
            lines.append(f"  random: {head(_group_keys(self.random))}")
        if self.mismatched:
            lines.append(f"  shape mismatch (kept random): {head(self.mismatched)}")
        if self.ignored:
            lines.append(f"  ignored from the file: {head(self.ignored)}")
        return "\n".join(lines)


def _group_keys(keys: list[str]) -> list[str]:
    """Collapse per-block keys (``...blocks.3.mlp.fc1.weight``) to their module (``...blocks.*``)."""
    out: list[str] = []
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                parts = parts[:i] + ["*"]
                break
        else:
            parts = parts[:-1] + ["*"] if len(parts) > 2 else parts
        grouped = ".".join(parts)
        if grouped not in out:
            out.append(grouped)
    return out


@torch.no_grad()
def reset_logit_parameters(model: PS3Model) -> None:
    """The SigLIP starting values: scale log 10, bias −10 (design §5)."""
    model.logit_scale.fill_(LOGIT_SCALE_INIT)
    model.logit_bias.fill_(LOGIT_BIAS_INIT)


# The first matching rule wins: (source prefix, model prefix).
_SIGLIP_PREFIXES = (
    ("visual.trunk.", "vision_model.trunk."),
    ("vision_model.trunk.", "vision_model.trunk."),
    ("trunk.", "vision_model.trunk."),
    ("text.", "text_model."),
    ("text_model.", "text_model."),
)
# A timm checkpoint of the bare backbone has unprefixed keys.
_TIMM_BARE = ("patch_embed.", "pos_embed", "blocks.", "norm.", "attn_pool.")


def _map_siglip_key(key: str) -> str | None:
    if key in ("logit_scale", "logit_bias"):
        return key
    for source, target in _SIGLIP_PREFIXES:
        if key.startswith(source):
            return target + key[len(source):]
    if key.startswith(_TIMM_BARE):
        return "vision_model.trunk." + key
    return None


def load_siglip_weights(model: PS3Model, path: str | os.PathLike) -> InitReport:
    """Load SigLIP backbone weights from a safetensors file in timm or open_clip naming.

    ``visual.trunk.*`` / ``trunk.*`` / bare timm keys go to ``vision_model.trunk.*``; the text
    tower's ``text.*`` to ``text_model.*`` where the names match; ``logit_scale``/``logit_bias``
    as they are. Tensors whose shapes differ (e.g. another context length) stay random. The
    PS3 parts (selection modules, residual position tables, prompt projections) stay random.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"init: SigLIP weights file {file} does not exist")
    try:
        source = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"init: could not read {file} as safetensors: {exc}") from exc
    own = model.state_dict()
    report = InitReport(source=str(file))
    to_load: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        target = _map_siglip_key(key)
        if target is None or target not in own:
            report.ignored.append(key)
            continue
        expected = own[target].shape
        if value.shape != expected:
            # Scalars stored as (1,) in some exports are the same numbers.
            if value.numel() == own[target].numel() == 1:
                value = value.reshape(expected)
            else:
                report.mismatched.append(f"{target}: {tuple(value.shape)} vs {tuple(expected)}")
                continue
        to_load[target] = value.to(own[target].dtype)
    if not to_load:
        raise ValueError(f"init: no tensor of {file} fits the model (expected timm/open_clip SigLIP names such as "
                         "'visual.trunk.blocks.0.attn.qkv.weight' or 'text.token_embedding.weight')")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.random = [k for k in own if k not in to_load]
    return report


def initialise(model: PS3Model, init: str | None) -> InitReport:
    """Initialise ``model`` in place.

    ``None``/``"random"``: the modules' own initialisation (timm-style trunk, CLIP-style text
    tower) with SigLIP's logit scale log 10 and bias −10. A directory: a PS3 checkpoint
    (``model.safetensors`` in the published layout; must fit the config exactly). A
    ``.safetensors`` file: SigLIP backbone weights (:func:`load_siglip_weights`).
    """
    reset_logit_parameters(model)
    if init is None or init == "random":
        return InitReport(source="random", random=list(model.state_dict()))
    path = Path(init)
    if path.is_dir():
        from ..hub import check_and_load, load_state_dict

        state = load_state_dict(path)
        own = model.state_dict()
        # A vision-only or text-only repo initialises its tower; a tower it lacks entirely (and
        # the logit scale/bias) stays random. Within a tower it has, every key must fit.
        towers = {k.split(".", 1)[0] for k in state}
        fill = {k: v for k, v in own.items()
                if k not in state and (k.split(".", 1)[0] not in towers or k in ("logit_scale", "logit_bias"))}
        check_and_load(model, {**fill, **state}, where=f"PS3 checkpoint in {path}")
        return InitReport(source=str(path), loaded=sorted(state), random=sorted(fill))
    if path.suffix == ".safetensors":
        return load_siglip_weights(model, path)
    raise ValueError(f"init must be 'random', a PS3 checkpoint directory or a SigLIP .safetensors file, got {init!r}")


# --------------------------------------------------------------------------------------------
# The training module


class PS3PretrainModule(nn.Module):
    """The pre-training forward of a :class:`ps3.PS3Model` (design §3.14, §5).

    ``forward(pixel_values (B,3,S,S), text_ids (B,L), gt_selection_maps (B,S,S),
    is_global_text (B,1))`` → ``(image_features, text_features, logit_scale, logit_bias,
    bottomup_probs, topdown_probs)``: the text tower gives the pooled text feature and the
    prompt; the vision tower selects from the gt boxes (one look, full budget), pools the
    selected high-res tokens inside the box (``pool_gt_token_only``) or, for global captions,
    takes the low-res pooled feature. Wrap this module (not the PS3Model) in DDP/FSDP so every
    parameter's gradient is synchronised.
    """

    def __init__(self, model: PS3Model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, gt_selection_maps: torch.Tensor,
                is_global_text: torch.Tensor):
        text = self.model.text_model(text_ids)
        vision = self.model.vision_model(pixel_values, prompt=text.prompt, gt_selection_maps=gt_selection_maps,
                                         is_global_text=is_global_text, pool_gt_token_only=True,
                                         output_hidden_states=False)
        return (vision.pooled_output, text.pooled_output, self.model.logit_scale, self.model.logit_bias,
                vision.bottomup_selection_probs, vision.topdown_selection_probs)


def logit_scale_max() -> float:
    """open_clip clamps the stored logit scale to [0, log 100] after every step."""
    return math.log(100.0)
