"""Configuration classes for the PS3 vision tower, text tower and the joint model.

Configs read and write the published ``config.json`` layout (SPEC §1). Every key a file holds is
kept, known or not, so a config loaded and saved again is the same file.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


class ConfigBase:
    """A bag of keys with defaults. Attribute access reads keys; unknown keys are preserved."""

    model_type: str = ""
    defaults: dict[str, Any] = {}

    def __init__(self, **kwargs: Any):
        values = copy.deepcopy(self.defaults)
        values.update(copy.deepcopy(kwargs))
        values["model_type"] = self.model_type
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.__dict__))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConfigBase":
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return cls(**cls._select(data))

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The part of a (possibly joint) config dict that belongs to this class."""
        return {k: v for k, v in data.items() if k != "model_type"}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> "ConfigBase":
        from .hub import resolve_model_dir

        directory = resolve_model_dir(path_or_hub_id, **hub_kwargs)
        file = directory / CONFIG_NAME
        if not file.is_file():
            raise ValueError(f"no {CONFIG_NAME} in {directory}: pass a directory written by save_pretrained")
        return cls.from_dict(json.loads(file.read_text()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]


class PS3VisionConfig(ConfigBase):
    model_type = "ps3_vision_model"
    defaults = {
        "model_name": "vit_so400m_patch14_siglip_378",
        "hidden_size": 1152,
        "pool": "avg",
        "dynamic_img_size": True,
        "ps3_scales": [378, 756, 1512, 3780],
        "select_based_on_layer": [0, 9, 18, 26],
        "min_select_num": 1,
        "max_select_num": 1280,
        "max_select_num_each_scale": None,
        "separate_pos_emb": True,
        "highres_selection_feature": True,
        "highres_selection_module_hidden_dim": 512,
        "highres_selection_module_out_dim": 512,
        "highres_selection_module_depth": 3,
        "highres_selection_module_kernel_size": 28,
        "radio": False,
        "vit": None,
    }

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("model_type") == "ps3" or "vision_config" in data:
            if not isinstance(data.get("vision_config"), dict):
                raise ValueError("joint PS3 config has no 'vision_config' dict")
            data = data["vision_config"]
        return super()._select(data)


class PS3TextConfig(ConfigBase):
    model_type = "ps3_text_model"
    defaults = {
        "output_dim": 1152,
        "prompt_proj_dim": 1152,
        "context_length": 77,
        "vocab_size": 49408,
        "width": 512,
        "heads": 8,
        "layers": 12,
        "mlp_ratio": 4.0,
        "embed_cls": False,
        "pad_id": 0,
        "no_causal_mask": False,
        "pool_type": "argmax",
        "proj_bias": False,
        "norm_kwargs": {},
        "act_kwargs": {},
        "hf_tokenizer_name": None,
        "tokenizer_kwargs": None,
    }

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("model_type") == "ps3" or "text_config" in data:
            if not isinstance(data.get("text_config"), dict):
                raise ValueError("joint PS3 config has no 'text_config' dict: this repo holds no text tower")
            data = data["text_config"]
        return super()._select(data)


class PS3Config(ConfigBase):
    """Joint config: ``vision_config`` and ``text_config`` are kept as config objects."""

    model_type = "ps3"
    defaults = {"architectures": ["PS3Model"]}

    def __init__(self, vision_config: PS3VisionConfig | dict | None = None,
                 text_config: PS3TextConfig | dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(vision_config, dict):
            vision_config = PS3VisionConfig(**PS3VisionConfig._select(vision_config))
        if isinstance(text_config, dict):
            text_config = PS3TextConfig(**PS3TextConfig._select(text_config))
        self.vision_config = vision_config if vision_config is not None else PS3VisionConfig()
        self.text_config = text_config if text_config is not None else PS3TextConfig()

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("vision_config", "text_config")}
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out

    @classmethod
    def _select(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "vision_config" not in data:
            raise ValueError("not a joint PS3 config (no 'vision_config'): load it with PS3VisionConfig")
        return super()._select(data)
