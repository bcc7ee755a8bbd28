"""The registry states each architecture and published configuration once; its entries build
working configs and match the published table (design §1)."""
import math

import pytest
import torch

import ps3
from ps3 import registry
from ps3.config import PS3Config
from ps3.encoder.selection import default_budgets


def test_so400m_backbone_shape():
    arch = registry.VIT_REGISTRY["vit_so400m_patch14_siglip_378"]
    assert (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_hidden, arch.pos_grid) == \
        (14, 1152, 27, 16, 4304, 27)
    assert registry.VIT_REGISTRY["vit_so400m_patch16_siglip_384"].gelu_approximate == "tanh"
    assert registry.VIT_REGISTRY["vit_base_patch16_siglip_224"].mlp_hidden == 3072


@pytest.mark.parametrize("name,scales,vocab,hub_id", [
    ("PS3-4K-SigLIP2", [378, 756, 1512, 3780], 256000, "nvidia/PS3_Lang-4K-SigLIP2"),
    ("PS3-1.5K-SigLIP2", [378, 756, 1512], 256000, "nvidia/PS3-1.5K-SigLIP2"),
    ("PS3-4K-SigLIP", [378, 756, 1512, 3780], 32000, "nvidia/PS3-4K-SigLIP"),
    ("PS3-1.5K-SigLIP", [378, 756, 1512], 32000, "nvidia/PS3-1.5K-SigLIP"),
])
def test_published_configs(name, scales, vocab, hub_id):
    joint, pre = registry.published_configs(hub_id)
    assert joint == registry.published_configs(name)[0] == registry.training_config(name)[0]
    config = PS3Config.from_dict(joint)
    assert config.vision_config.ps3_scales == scales and config.vision_config.max_select_num == 2560
    assert config.text_config.vocab_size == vocab and config.text_config.mlp_ratio == registry.SO400M_MLP_RATIO
    assert pre["image_size"] == scales[-1] and pre["resize_mode"] == "squash"
    assert sum(default_budgets(2560, scales, None)) == 2560


def test_training_config_names_and_errors():
    expected = {"tiny-synthetic", "tiny-synthetic-128", "hrqa-synthetic", *registry.PUBLISHED}
    assert set(registry.TRAINING_CONFIGS) == expected
    a, _ = registry.training_config("tiny-synthetic")
    a["vision_config"]["ps3_scales"].append(1)  # callers get fresh copies
    assert registry.training_config("tiny-synthetic")[0]["vision_config"]["ps3_scales"] == [64, 128, 256]
    with pytest.raises(ValueError, match="unknown training config 'nope'"):
        registry.training_config("nope")
    with pytest.raises(ValueError, match="unknown published PS3 checkpoint"):
        registry.published_configs("nvidia/PS3-8K")


def test_logit_start_values_in_the_joint_model():
    joint, _ = registry.training_config("tiny-synthetic")
    joint["text_config"]["vocab_size"] = 50
    model = ps3.PS3Model(PS3Config.from_dict(joint))
    assert model.logit_scale.item() == pytest.approx(math.log(10.0)) == pytest.approx(registry.LOGIT_SCALE_INIT)
    assert model.logit_bias.item() == registry.LOGIT_BIAS_INIT == -10.0


def test_bench_presets_build_configs():
    cpu = registry.bench_vision_config("cpu", [378, 756])
    arch = registry.arch_from_config(cpu.model_name, cpu.vit)
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size, arch.mlp_hidden) == (768, 4, 12, 14, 2869)
    assert cpu.select_based_on_layer == [0, 1, 2, 3] and cpu.max_select_num == 2560
    so = registry.bench_vision_config("so400m")
    assert so.model_name == "vit_so400m_patch14_siglip_378" and so.vit is None
    assert so.select_based_on_layer == [0, 9, 18, 26] and so.ps3_scales == [378, 756, 1512, 3780]
    small = registry.bench_vision_config("so400m", [28, 56], width=64, depth=2)
    arch = registry.arch_from_config(small.model_name, small.vit)
    assert (arch.embed_dim, arch.depth, arch.num_heads) == (64, 2, 1)
    torch.manual_seed(0)
    model = ps3.PS3VisionModel(small).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 56, 56), num_look_close=1)
    assert out.last_hidden_state.shape[-1] == 64
    with pytest.raises(ValueError, match="unknown bench preset 'gpu'"):
        registry.bench_vision_config("gpu")


@pytest.mark.slow
def test_registry_does_not_import_the_trainer():
    import subprocess
    import sys
    code = "import sys, ps3.registry; assert not any(m.startswith('ps3.train') for m in sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
