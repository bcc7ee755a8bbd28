"""Typed configuration classes for the PS3 vision tower, text tower and the joint model.

Configs read and write the published ``config.json`` layout (design §1). Each class is a
dataclass whose fields are the keys this library knows, with their types and the defaults used
when a file lacks them. Every other key a file holds is kept too — as an attribute and on save —
so a config loaded and saved again is the same file (``config.extra_keys()`` lists them).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "config.json"

# What transformers passes along to a config's ``from_dict`` (``AutoConfig.from_pretrained``,
# ``PreTrainedModel.from_pretrained``) that says where the file came from or how to load weights,
# not what the model is: accepted and dropped, so the saved file stays the published layout.
HF_LOADING_KWARGS = frozenset({
    "_from_auto", "_from_pipeline", "_commit_hash", "name_or_path", "revision", "cache_dir", "token",
    "local_files_only", "force_download", "proxies", "subfolder", "trust_remote_code", "code_revision",
    "user_agent", "dtype", "torch_dtype", "attn_implementation"})
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")  # what resolve_model_dir takes


class ConfigBase:
    """Keyword arguments set the dataclass fields (unset ones take their defaults); unknown keys
    are kept as attributes. ``to_dict`` gives ``model_type``, the fields, then the unknown keys."""

    model_type: ClassVar[str] = ""

    def __init__(self, **kwargs: Any):
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, copy.deepcopy(default))
        for key, value in kwargs.items():
            if key != "model_type":  # fixed by the class
                setattr(self, key, copy.deepcopy(value))

    def extra_keys(self) -> list[str]:
        """Keys this config carries that are not fields of its class (kept on save, unread here)."""
        known = {f.name for f in dataclasses.fields(self)}
        return [k for k in self.__dict__ if k not in known]

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **copy.deepcopy(self.__dict__)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any):
        """A config from a ``config.json`` dict. Keyword arguments follow transformers'
        ``PretrainedConfig.from_dict``: a key the config has (a field or a key of ``data``)
        overrides it; loading bookkeeping (``name_or_path``, ``_from_auto``, ``revision``, ``dtype``,
        …) is dropped; other keys are unused — returned as ``(config, unused)`` with
        ``return_unused_kwargs=True``, else ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return_unused = kwargs.pop("return_unused_kwargs", False)
        config = cls(**cls._select(data))
        unused = {}
        for key, value in kwargs.items():
            if key in HF_LOADING_KWARGS:
                continue
            if not hasattr(config, key) or key == "model_type":
                unused[key] = value
                continue
            current = getattr(config, key)
            if isinstance(current, ConfigBase) and isinstance(value, dict):  # a sub-config, updated key by key
                value = type(current).from_dict({**current.to_dict(), **value})
            setattr(config, key, copy.deepcopy(value))
        return (config, unused) if return_unused else config

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The part of a (possibly joint) config dict that belongs to this class."""
        return {k: v for k, v in data.items() if k != "model_type"}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **kwargs: Any):
        """Read ``config.json`` from a directory or a hub id. ``revision``, ``cache_dir``,
        ``local_files_only`` and ``token`` locate it; other keyword arguments go to :meth:`from_dict`."""
        from .hub import resolve_model_dir

        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        directory = resolve_model_dir(path_or_hub_id, **hub_kwargs)
        file = directory / CONFIG_NAME
        if not file.is_file():
            raise ValueError(f"no {CONFIG_NAME} in {directory}: pass a directory written by save_pretrained")
        try:
            data = json.loads(file.read_text())
        except ValueError as exc:
            raise ValueError(f"{file} is not valid JSON ({exc}): fix it or download the model again") from exc
        return cls.from_dict(data, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]


def _sub_config(data: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """``data[key]`` of a joint config; a stand-alone tower config as is."""
    if data.get("model_type") == "ps3" or key in data:
        if not isinstance(data.get(key), dict):
            raise ValueError(f"joint PS3 config has no '{key}' dict{what}")
        return data[key]
    return data


@dataclass(init=False, eq=False, repr=False)
class PS3VisionConfig(ConfigBase):
    """The vision tower (``model_type: ps3_vision_model``).

    Read by this library:
        model_name: timm backbone name (see ``ps3.registry.VIT_REGISTRY``), or any name when
            ``vit`` describes the backbone.
        vit: the backbone's architecture as a dict (patch_size, embed_dim, depth, num_heads,
            mlp_ratio, img_size, global_pool, act), for backbones outside the registry.
        hidden_size: trunk width C (must equal the backbone's).
        ps3_scales: s_0 < s_1 < … in pixels, multiples of the patch size.
        select_based_on_layer: blocks whose outputs make the selection features.
        max_select_num: high-res tokens of one look, split over the scales by pixel count
            (unless ``max_select_num_each_scale`` gives them).
        separate_pos_emb: add a learned per-scale residual position table.
        highres_selection_feature, highres_selection_module_*: the ConvNeXt selection branch
            on a 1512 px view.
        radio: a C-RADIO trunk (design §1.6), with ``radio_adapter_mlp_version`` / ``_input_dim`` /
            ``_hidden_dim`` / ``_output_dim`` / ``_num_inner``, ``final_norm`` and
            ``class_token`` (upstream's keys; carried as keys of the file and checked by
            ``ps3.encoder.radio.RadioSpec``).
        img_size: when set, the position table is img_size / patch cells a side (upstream passes
            it to timm; the C-RADIOv2 models set 4096).

    Carried only (kept on save, not read): ``pool`` (the trunk's pooling comes from the
    backbone: MAP for every supported one), ``dynamic_img_size`` (inputs of any size are always
    accepted), ``min_select_num`` (a look selects exactly its budget), and any unknown key such
    as ``ps3``.
    """

    model_type: ClassVar[str] = "ps3_vision_model"

    model_name: str = "vit_so400m_patch14_siglip_378"
    hidden_size: int = 1152
    pool: str = "avg"
    dynamic_img_size: bool = True
    ps3_scales: list[int] = field(default_factory=lambda: [378, 756, 1512, 3780])
    select_based_on_layer: list[int] = field(default_factory=lambda: [0, 9, 18, 26])
    min_select_num: int = 1
    max_select_num: int = 1280
    max_select_num_each_scale: list[int] | None = None
    separate_pos_emb: bool = True
    highres_selection_feature: bool = True
    highres_selection_module_hidden_dim: int = 512
    highres_selection_module_out_dim: int = 512
    highres_selection_module_depth: int = 3
    highres_selection_module_kernel_size: int = 28
    radio: bool = False
    vit: dict[str, Any] | None = None

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        return super()._select(_sub_config(data, "vision_config", ""))


@dataclass(init=False, eq=False, repr=False)
class PS3TextConfig(ConfigBase):
    """The text tower (``model_type: ps3_text_model``), open_clip's text-tower keys.

    Read by the text tower: ``width``, ``heads``, ``layers``, ``mlp_ratio``, ``context_length``,
    ``vocab_size`` (None in a training config whose tokenizer is built from captions),
    ``output_dim``, ``prompt_proj_dim`` (= the vision width), ``no_causal_mask``, ``pool_type``
    (``argmax``/``first``/``last``), ``proj_bias``, ``norm_kwargs`` (``eps``), ``act_kwargs``
    (``approximate``), ``embed_cls`` (must be false). Read by the tokenizer and the trainer:
    ``hf_tokenizer_name``, ``tokenizer_kwargs`` (``clean``), ``pad_id``.

    Carried only: any unknown key (a non-null ``ls_init_value`` is refused by the tower).
    """

    model_type: ClassVar[str] = "ps3_text_model"

    output_dim: int = 1152
    prompt_proj_dim: int = 1152
    context_length: int = 77
    vocab_size: int | None = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    embed_cls: bool = False
    pad_id: int = 0
    no_causal_mask: bool = False
    pool_type: str = "argmax"
    proj_bias: bool = False
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    act_kwargs: dict[str, Any] = field(default_factory=dict)
    hf_tokenizer_name: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        return super()._select(_sub_config(data, "text_config", ": this repo holds no text tower"))


@dataclass(init=False, eq=False, repr=False)
class PS3Config(ConfigBase):
    """Joint config (``model_type: ps3``): ``vision_config`` and ``text_config`` are config
    objects (dicts are converted). ``architectures`` is carried for the hub's benefit."""

    model_type: ClassVar[str] = "ps3"

    architectures: list[str] = field(default_factory=lambda: ["PS3Model"])
    vision_config: PS3VisionConfig = field(default_factory=PS3VisionConfig)
    text_config: PS3TextConfig = field(default_factory=PS3TextConfig)

    def __init__(self, vision_config: PS3VisionConfig | dict | None = None,
                 text_config: PS3TextConfig | dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(vision_config, dict):
            vision_config = PS3VisionConfig(**PS3VisionConfig._select(vision_config))
        if isinstance(text_config, dict):
            text_config = PS3TextConfig(**PS3TextConfig._select(text_config))
        if vision_config is not None:
            self.vision_config = vision_config
        if text_config is not None:
            self.text_config = text_config

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "vision_config" not in data:
            raise ValueError("not a joint PS3 config (no 'vision_config'): load it with PS3VisionConfig")
        return super()._select(data)
