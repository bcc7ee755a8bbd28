"""The published callers' code paths, replayed on tiny models (SigLIP-style and C-RADIO-style):
what NVlabs/VILA (b760c34) and haotian-liu/LLaVA (c121f04) do with the ``ps3`` and ``s2wrapper``
packages, written from a reading of their code (not copied), with transformers as the only extra.

- VILA ``VisionTower.forward``'s PS3 branch (llava/model/multimodal_encoder/vision_encoder.py):
  the tower is called with the images in its dtype, the top-down prompt and the look options;
  ``feature_select`` takes ``hidden_states[select_layer]`` and casts to the images' dtype; the
  selection maps and probabilities go back to the caller.
- VILA ``encode_images_ps3`` (llava/model/llava_arch.py): per-image ``only_select_first_n_scale``
  from the original sizes, the batch split into groups of 2 and 3 scales (a dummy image when a
  group is empty), each group's outputs scattered back into zeros of the group-0 dtypes, the maps
  area-resized by 2 and the 2×2 blocks kept where the resized map is exactly 1.
- LLaVA ``CLIPVisionTowerS2.forward`` (llava/model/multimodal_encoder/clip_encoder.py) and VILA
  ``VisionTowerS2.forward``: ``multiscale_forward(forward_feature, images, img_sizes=scales,
  max_split_size=..., [resize_output_to_idx=...])`` on a batch or image by image.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from golden import MODEL_DIR, RADIO_MODEL_DIR
from tolerances import assert_close_paths
from ps3 import PS3ImageProcessor, PS3VisionConfig, PS3VisionModel, first_n_scales_for_sizes
from s2wrapper import forward as multiscale_forward

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- VILA, PS3 tower
def vision_tower_forward(tower, images, prompts, num_look_close, num_token_look_close, smooth, gt, first_n,
                         select_layer=-2):
    """VILA's VisionTower.forward for a PS3 tower: (features, selection maps, selection probs)."""
    dtype = next(tower.parameters()).dtype
    out = tower(images.to(device=images.device, dtype=dtype), prompt=prompts, output_hidden_states=True,
                num_look_close=num_look_close, num_token_look_close=num_token_look_close,
                smooth_selection_prob=smooth, gt_selection_maps=gt, only_select_first_n_scale=first_n)
    features = out.hidden_states[select_layer].to(images.dtype)  # select_feature "cls_patch": all tokens
    return features, out.selection_maps, out.selection_probs


@pytest.fixture(scope="module")
def tower4k():
    """A four-scale tiny PS3 tower (three high-res scales, like PS3-4K) with random weights, so the
    2-scale and 3-scale groups of encode_images_ps3 both exist; VILA sets num_hidden_layers_to_return = 2."""
    base = PS3VisionConfig.from_pretrained(MODEL_DIR)
    config = PS3VisionConfig.from_dict({**base.to_dict(), "ps3_scales": [56, 112, 224, 448], "max_select_num": 120})
    torch.manual_seed(0)
    tower = PS3VisionModel(config).eval()
    tower.vision_model.num_hidden_layers_to_return = 2
    return tower


def test_vision_tower_forward_ps3_branch(tower4k):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    prompts = torch.randn(2, tower4k.width)
    with torch.no_grad():
        feats, maps, probs = vision_tower_forward(copy.deepcopy(tower4k).bfloat16(), images, prompts.bfloat16(), 1,
                                                  None, False, None, None)
    assert feats.dtype == torch.float32  # cast back to the images' dtype
    assert feats.shape == (2, 16 + sum(tower4k.vision_model.max_select_num_each_scale), tower4k.width)
    assert [m.dtype for m in maps] == [torch.bfloat16] * 3 and [p.dtype for p in probs] == [torch.bfloat16] * 3
    assert int(sum(m.sum() for m in maps)) == 2 * sum(tower4k.vision_model.max_select_num_each_scale)


def encode_images_ps3(tower, images, prompts, original_sizes, num_look_close=1):
    """VILA's group split: per image 2 or 3 scales by its original size (the rule reads s3_scales;
    here those of PS3-4K, the model VILA-HD pairs it with), one tower call per group, results
    scattered back into the batch."""
    firsts = first_n_scales_for_sizes(original_sizes, [378, 756, 1512, 3780])
    assert set(firsts) <= {2, 3}
    masks = [[n == 2 for n in firsts], [n == 3 for n in firsts]]
    results = []
    for mask in masks:
        if sum(mask) == 0:  # every rank runs both groups (ZeRO-3): a dummy first image
            mask = [True] + mask[1:]
        results.append(vision_tower_forward(tower, images[mask], prompts[mask], num_look_close, None, False, None,
                                            [n for n, m in zip(firsts, mask) if m]))
    feats0, maps0, probs0 = results[0]
    features = torch.zeros(len(images), *feats0.shape[1:], dtype=feats0.dtype)
    maps = [torch.zeros(len(images), *m.shape[1:], dtype=m.dtype) for m in maps0]
    probs = [torch.zeros(len(images), *p.shape[1:], dtype=p.dtype) for p in probs0]
    for mask, (f, ms, ps) in zip(masks, results):
        if sum(mask) == 0:
            features += f.sum() * 0
            continue
        features[mask] = f
        for j in range(len(maps)):
            maps[j][mask] = ms[j]
            probs[j][mask] = ps[j]
    return features, maps, probs, firsts


def test_encode_images_ps3_group_split_and_downsampled_maps(tower4k):
    torch.manual_seed(2)
    images = torch.rand(3, 3, 224, 224) * 2 - 1
    prompts = torch.randn(3, tower4k.width)
    sizes = [(3000, 4000), (1000, 800), (2900, 2000)]  # (h, w) originals: 3, 2, 3 scales
    with torch.no_grad():
        features, maps, probs, firsts = encode_images_ps3(tower4k, images, prompts, sizes)
    assert firsts == [3, 2, 3]
    low = tower4k.vision_model.low_res_token_num
    assert low == 16
    # Both groups return the same token count (the budgets of 2 and of 3 scales add up alike), so
    # the scatter above fits; every selected cell has its token.
    selected = torch.cat([m.flatten(1) for m in maps], 1)
    assert selected.dtype == torch.float32 and selected.sum(1).tolist() == [features.shape[1] - low] * 3
    canvas = torch.zeros(3, selected.shape[1], features.shape[-1])
    for b in range(3):
        canvas[b][selected[b].bool()] = features[b, low:]
    assert int(maps[2][1].sum()) <= 1  # the 2-scale image selects (almost) nothing at the top scale
    # mlp_downsample: each map area-resized by 2 (floating maps), blocks kept where all 4 cells are.
    halves = [F.interpolate(m.unsqueeze(1), (math.ceil(m.shape[-2] / 2), math.ceil(m.shape[-1] / 2)),
                            mode="area").squeeze(1).flatten(1, 2) for m in maps]
    kept = torch.cat(halves, 1) == 1
    full = [m[:, :m.shape[1] // 2 * 2, :m.shape[2] // 2 * 2].unflatten(1, (-1, 2)).unflatten(3, (-1, 2))
            .amin((2, 4)).flatten(1) for m in maps]
    assert torch.equal(kept, torch.cat(full, 1) == 1)  # integer bookkeeping: exact
    assert int(kept.sum()) > 0


@pytest.fixture(scope="module")
def radio_tower4k():
    """The recorded C-RADIO-style tower's config (adapter MLP, cropped position table, no final
    norm) at PS3-4K's four scales, random weights."""
    base = PS3VisionConfig.from_pretrained(RADIO_MODEL_DIR)
    config = PS3VisionConfig.from_dict({**base.to_dict(), "ps3_scales": [48, 96, 192, 384], "max_select_num": 120,
                                        "img_size": 512})
    torch.manual_seed(0)
    return PS3VisionModel(config).eval()


def test_vila_ps3_vision_tower_on_a_radio_tower(radio_tower4k, tmp_path):
    """VILA's PS3VisionTower.__init__ and forward, and encode_images_ps3, as on a SigLIP tower:
    its hidden_size is the trunk width (what the projector reads), not the adapter's."""
    radio_tower4k.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": 384, "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276], "interpolation": "bicubic",
         "resize_mode": "squash"}))
    tower = PS3VisionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    processor = PS3ImageProcessor.from_pretrained(tmp_path)
    tower.vision_model.num_hidden_layers_to_return = 2
    tower.vision_model.trunk.set_grad_checkpointing(True)  # config.ps3_grad_checkpointing
    assert tower.width == 32 and tower.vision_model.trunk.pooled_dim == 48
    pixels = torch.stack(processor(torch.zeros(40, 50, 3, dtype=torch.uint8).numpy())["pixel_values"])
    with torch.no_grad():
        feats, maps, probs = vision_tower_forward(tower, pixels, torch.randn(1, 32).bfloat16(), 1, None, False, None,
                                                  None)
    budgets = tower.vision_model.max_select_num_each_scale
    assert feats.dtype == torch.float32 and feats.shape == (1, 9 + sum(budgets), 32)
    assert [m.dtype for m in maps] == [torch.bfloat16] * 3 and len(probs) == 3
    torch.manual_seed(2)
    images = torch.rand(3, 3, 192, 192) * 2 - 1
    with torch.no_grad():
        features, maps, _, firsts = encode_images_ps3(radio_tower4k, images, torch.randn(3, 32),
                                                      [(3000, 4000), (1000, 800), (2900, 2000)])
    assert firsts == [3, 2, 3] and features.shape[-1] == 32
    selected = torch.cat([m.flatten(1) for m in maps], 1)
    assert selected.sum(1).tolist() == [features.shape[1] - 9] * 3


def test_encode_images_ps3_dummy_group(tower4k):
    # All images large: the 2-scale group is empty and runs the first image as a dummy, whose
    # result is discarded (it only enters as sum() * 0).
    torch.manual_seed(5)
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    prompts = torch.randn(2, tower4k.width)
    with torch.no_grad():
        features, maps, _, firsts = encode_images_ps3(tower4k, images, prompts, [(3000, 4000), (4000, 3000)])
        direct, direct_maps, _ = vision_tower_forward(tower4k, images, prompts, 1, None, False, None, [3, 3])
    assert firsts == [3, 3]
    assert_close_paths(features, direct, "grouped vs direct call")
    assert all(torch.equal(a, b) for a, b in zip(maps, direct_maps))  # the same call on the same batch


# ----------------------------------------------------------------------------- S2 callers
def clip_tower():
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(3)
    return transformers.CLIPVisionModel(config).eval()


def siglip_tower():
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(4)
    return transformers.SiglipVisionModel(config).eval()


def feature_fn(model, select_layer=-2, drop_cls=False):
    """forward_feature of the S2 towers: hidden_states[select_layer], CLS dropped for 'patch'."""
    def forward_feature(images):
        out = model(images.to(dtype=next(model.parameters()).dtype), output_hidden_states=True)
        feats = out.hidden_states[select_layer]
        return (feats[:, 1:] if drop_cls else feats).to(images.dtype)
    return forward_feature


def test_llava_clip_s2_tower_calls():
    # LLaVA-1.5-S2: s2_scales "336,672,1008" sorted, split size = the smallest (here 32/64/96).
    scales = sorted(map(int, "64,32,96".split(",")))
    fn = feature_fn(clip_tower(), drop_cls=True)
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        batch = multiscale_forward(fn, images, img_sizes=scales, max_split_size=scales[0])
        one_by_one = [multiscale_forward(fn, image.unsqueeze(0), img_sizes=scales, max_split_size=scales[0])
                      for image in images]  # the list-of-images branch
    assert batch.shape == (2, 16, 32 * len(scales))  # hidden_size × number of scales
    for b, single in enumerate(one_by_one):
        assert_close_paths(batch[b:b + 1], single, "S2 batch vs one image")


@pytest.mark.parametrize("resize_output_to_idx", [0, -1])
def test_vila_siglip_s2_tower_calls(resize_output_to_idx):
    # VILA VisionTowerS2: s2_scales, s2_max_split_size, s2_resize_output_to_scale_idx; SigLIP keeps
    # every token (no CLS).
    fn = feature_fn(siglip_tower())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = multiscale_forward(fn, images, img_sizes=[32, 64], max_split_size=32,
                                 resize_output_to_idx=resize_output_to_idx)
    side = 4 if resize_output_to_idx == 0 else 8
    assert out.shape == (2, side * side, 64) and out.dtype == torch.float32
