"""Typed configs: dataclass fields with defaults, unknown keys carried through load and save, the
published joint layout read and written unchanged (design §1)."""
import dataclasses
import json
from pathlib import Path

import pytest

from ps3 import PS3Config, PS3TextConfig, PS3VisionConfig
from ps3.registry import published_configs

FIXTURE = Path(__file__).parent / "fixtures" / "ps3_tiny" / "model" / "config.json"

# The joint config.json of a released checkpoint (design §1), with keys this library does not know.
PUBLISHED = {
    "architectures": ["PS3Model"], "model_type": "ps3", "torch_dtype": "float32",
    "vision_config": {"model_type": "ps3_vision_model", "model_name": "vit_so400m_patch14_siglip_378",
                      "hidden_size": 1152, "pool": "map", "ps3": True, "ps3_scales": [378, 756, 1512, 3780],
                      "select_based_on_layer": [0, 9, 18, 26], "min_select_num": 1, "max_select_num": 2560,
                      "separate_pos_emb": True, "highres_selection_feature": True, "img_size": 378,
                      "future": {"nested": [1, 2]}},
    "text_config": {"model_type": "ps3_text_model", "context_length": 64, "vocab_size": 256000,
                    "hf_tokenizer_name": "timm/ViT-SO400M-14-SigLIP2-378",
                    "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 1152, "heads": 16, "layers": 27,
                    "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                    "norm_kwargs": {"eps": 1e-06}, "act_kwargs": {"approximate": "tanh"}, "output_dim": 1152,
                    "prompt_proj_dim": 1152, "ls_init_value": None},
}


def test_configs_are_dataclasses_with_typed_defaults():
    names = {f.name: f.type for f in dataclasses.fields(PS3VisionConfig)}
    assert names["ps3_scales"] == "list[int]" and names["max_select_num"] == "int"
    vision, text = PS3VisionConfig(), PS3TextConfig()
    assert vision.max_select_num == 1280 and vision.pool == "avg" and vision.vit is None
    assert text.context_length == 77 and text.pool_type == "argmax" and text.norm_kwargs == {}
    vision.ps3_scales.append(7560)  # defaults are per instance, never shared
    assert PS3VisionConfig().ps3_scales == [378, 756, 1512, 3780]


def test_published_layout_round_trips_with_unknown_keys(tmp_path):
    config = PS3Config.from_dict(PUBLISHED)
    assert config.vision_config.max_select_num == 2560 and config.text_config.vocab_size == 256000
    assert config.vision_config.ps3 is True and config.torch_dtype == "float32"  # unknown keys as attributes
    assert config.vision_config.extra_keys() == ["ps3", "img_size", "future"]
    assert config.text_config.extra_keys() == ["ls_init_value"]
    out = config.to_dict()
    for part in ("vision_config", "text_config"):
        assert {k: out[part][k] for k in PUBLISHED[part]} == PUBLISHED[part]
    assert out["torch_dtype"] == "float32" and out["model_type"] == "ps3"
    config.save_pretrained(tmp_path / "a")
    again = PS3Config.from_pretrained(tmp_path / "a")
    assert again == config
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


def test_tower_configs_from_a_joint_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED))
    vision = PS3VisionConfig.from_pretrained(tmp_path)
    text = PS3TextConfig.from_pretrained(tmp_path)
    assert vision.model_type == "ps3_vision_model" and vision.to_dict()["future"] == {"nested": [1, 2]}
    assert text.mlp_ratio == 3.7362 and text.to_dict()["model_type"] == "ps3_text_model"
    vision.save_pretrained(tmp_path / "vision")
    assert json.loads((tmp_path / "vision" / "config.json").read_text())["model_type"] == "ps3_vision_model"
    assert PS3VisionConfig.from_pretrained(tmp_path / "vision") == vision


def test_fixture_and_registry_configs_round_trip(tmp_path):
    for data in (json.loads(FIXTURE.read_text()), published_configs("PS3-1.5K-SigLIP")[0]):
        config = PS3Config.from_dict(data)
        assert PS3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="expects a dict"):
        PS3VisionConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="no 'text_config' dict: this repo holds no text tower"):
        PS3TextConfig.from_dict({"model_type": "ps3", "vision_config": {}})
    with pytest.raises(ValueError, match="not a joint PS3 config"):
        PS3Config.from_dict({"model_name": "x"})
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        PS3Config.from_pretrained(tmp_path)


def test_from_dict_takes_transformers_keyword_arguments():
    # What transformers' AutoConfig.from_pretrained passes: bookkeeping dropped, known keys override.
    config = PS3Config.from_dict(PUBLISHED, name_or_path="/some/dir", _from_auto=True, revision="main",
                                 dtype="float32")
    assert config == PS3Config.from_dict(PUBLISHED)
    config, unused = PS3Config.from_dict(PUBLISHED, architectures=["X"], vision_config={"max_select_num": 7},
                                         not_a_key=3, return_unused_kwargs=True)
    assert config.architectures == ["X"] and unused == {"not_a_key": 3}
    assert isinstance(config.vision_config, PS3VisionConfig) and config.vision_config.max_select_num == 7
    assert config.vision_config.ps3_scales == PS3Config.from_dict(PUBLISHED).vision_config.ps3_scales
    assert PS3VisionConfig.from_dict(PUBLISHED, max_select_num=9).max_select_num == 9
