"""Replays, on the tiny fixture model, every call NVlabs/VILA's PS3 vision tower
(``llava/model/multimodal_encoder/ps3_encoder.py``) and ``encode_images_ps3`` / the top-down
model (``llava/model/llava_arch.py``, ``llava_topdown_llama.py``) make on the ``ps3`` package,
and checks each means what it means upstream."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golden import MODEL_DIR
from ps3 import PS3Config, PS3ImageProcessor, PS3VisionConfig, PS3VisionModel

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The fixture model laid out like a published repo (with its preprocessor config)."""
    path = tmp_path_factory.mktemp("ps3_repo")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MODEL_DIR / name, path / name)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}))
    return path


def test_vision_tower_init_calls(repo):
    # PS3VisionTower.__init__: from_pretrained with HF's torch_dtype, the processor, layers to return.
    tower = PS3VisionModel.from_pretrained(repo, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    processor = PS3ImageProcessor.from_pretrained(repo)
    tower.vision_model.num_hidden_layers_to_return = 2
    # hidden_size / dtype / device properties of the tower read these.
    assert tower.width == tower.vision_model.width == 64
    assert list(tower.parameters())[0].dtype == tower.dtype == torch.bfloat16
    assert list(tower.parameters())[0].device == tower.device == torch.device("cpu")
    pixels = torch.stack(processor(torch.zeros(40, 50, 3, dtype=torch.uint8).numpy())["pixel_values"])
    with torch.no_grad():
        out = tower(pixels.to(tower.dtype), num_look_close=1)
    assert len(out.hidden_states) == 2 and out.last_hidden_state.dtype == torch.bfloat16


def test_image_processor_calls(repo, tmp_path):
    # VILA's data code: expand2square with the mean as fill colour, then
    # preprocess(image, return_tensors="pt")["pixel_values"][0]; it sizes tiles from crop_size / size.
    from PIL import Image
    processor = PS3ImageProcessor.from_pretrained(repo)
    assert processor.image_mean == [0.5] * 3 and processor.image_std == [0.5] * 3
    assert tuple(int(x * 255) for x in processor.image_mean) == (127, 127, 127)
    assert processor.size == {"shortest_edge": 224}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert PS3ImageProcessor(image_size=[252, 378]).crop_size == {"height": 252, "width": 252}
    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    single = processor.preprocess_image(image)
    assert single.shape == (3, 224, 224)
    pt = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pt, single)
    plain = processor.preprocess(image)
    assert isinstance(plain["pixel_values"], list) and len(plain["pixel_values"]) == 1
    assert torch.equal(plain["pixel_values"][0], single)
    with pytest.raises(ValueError, match="return_tensors"):
        processor.preprocess(image, return_tensors="np")


def test_torch_dtype_spellings(repo):
    assert PS3VisionModel.from_pretrained(repo, torch_dtype="auto").dtype == torch.float32  # stored precision
    assert PS3VisionModel.from_pretrained(repo, torch_dtype="float16").dtype == torch.float16
    same = PS3VisionModel.from_pretrained(repo, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype"):
        PS3VisionModel.from_pretrained(repo, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_encode_images_ps3_calls(repo):
    tower = PS3VisionModel.from_pretrained(repo)
    encoder = tower.vision_model
    # The dynamic-aspect-ratio rule reads s3_scales; the top-down model reads low_res_token_num.
    assert encoder.s3_scales == encoder.ps3_scales == [56, 112, 224]
    assert encoder.low_res_token_num == 16
    thresholds = [(encoder.s3_scales[i] + encoder.s3_scales[i + 1]) / 2 for i in range(1, len(encoder.s3_scales) - 1)]
    assert thresholds == [168.0]
    # The tower is called per group with a per-sample only_select_first_n_scale list and a prompt.
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    prompt = torch.randn(2, encoder.width)
    with torch.no_grad():
        out = tower(x, num_look_close=1, num_token_look_close=None, prompt=prompt, smooth_selection_prob=False,
                    gt_selection_maps=None, only_select_first_n_scale=[1, 1])
    assert out.selection_maps[0].sum() == 2 * 64  # the first scale's budget covers its whole 8×8 grid
    assert out.last_hidden_state.shape[1] == encoder.low_res_token_num + sum(encoder.max_select_num_each_scale)


def test_grad_checkpointing_calls(repo):
    # PS3VisionTower: vision_tower.vision_model.trunk.set_grad_checkpointing(True) for ps3_grad_checkpointing.
    tower = PS3VisionModel.from_pretrained(repo).train()
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    grads = []
    for enable in (False, True):
        tower.vision_model.trunk.set_grad_checkpointing(enable)
        assert tower.vision_model.gradient_checkpointing is enable
        tower.zero_grad()
        tower(x, num_look_close=1).last_hidden_state.square().mean().backward()
        grads.append(tower.vision_model.trunk.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_autoconfig_register():
    # ps3_encoder.py registers both configs with transformers at import time.
    code = ("from transformers import AutoConfig\n"
            "from ps3 import PS3Config, PS3VisionConfig\n"
            "AutoConfig.register('ps3', PS3Config)\n"
            "AutoConfig.register('ps3_vision_model', PS3VisionConfig)\n"
            "c = AutoConfig.for_model('ps3_vision_model', ps3_scales=[56, 112, 224])\n"
            "assert isinstance(c, PS3VisionConfig) and c.ps3_scales == [56, 112, 224]\n"
            "assert isinstance(AutoConfig.for_model('ps3'), PS3Config)\n"
            # A ps3 model directory through AutoConfig (transformers passes name_or_path, _from_auto, …).
            f"c = AutoConfig.from_pretrained({str(MODEL_DIR)!r})\n"
            "assert type(c) is PS3Config and c == PS3Config.from_pretrained(" + repr(str(MODEL_DIR)) + ")\n"
            "assert 'name_or_path' not in c.to_dict() and c.vision_config.ps3_scales == [56, 112, 224]\n"
            f"c, unused = AutoConfig.from_pretrained({str(MODEL_DIR)!r}, architectures=['X'], foo=1, "
            "return_unused_kwargs=True)\n"
            "assert c.architectures == ['X'] and unused == {'foo': 1}, unused\n")
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert PS3Config.model_type == "ps3" and PS3VisionConfig.model_type == "ps3_vision_model"
