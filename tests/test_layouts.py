"""The published checkpoint layouts (design §1), built on the meta device: every key and shape."""
import torch

import ps3

SO400M = dict(hidden_size=1152, pool="map", ps3=True, min_select_num=1, max_select_num=2560,
              separate_pos_emb=True, highres_selection_feature=True, select_based_on_layer=[0, 9, 18, 26])


def expected_vision_keys(scales, C=1152, L=27, p=14, mlp=4304, g=27, n_sel=4, h=512, o=512, depth=3, k=28):
    S = len(scales)
    keys = {
        "trunk.patch_embed.proj.weight": (C, 3, p, p), "trunk.patch_embed.proj.bias": (C,),
        "trunk.pos_embed": (1, g * g, C),
        "trunk.norm.weight": (C,), "trunk.norm.bias": (C,),
        "trunk.attn_pool.latent": (1, 1, C),
        "trunk.attn_pool.q.weight": (C, C), "trunk.attn_pool.q.bias": (C,),
        "trunk.attn_pool.kv.weight": (2 * C, C), "trunk.attn_pool.kv.bias": (2 * C,),
        "trunk.attn_pool.proj.weight": (C, C), "trunk.attn_pool.proj.bias": (C,),
        "trunk.attn_pool.norm.weight": (C,), "trunk.attn_pool.norm.bias": (C,),
        "trunk.attn_pool.mlp.fc1.weight": (mlp, C), "trunk.attn_pool.mlp.fc1.bias": (mlp,),
        "trunk.attn_pool.mlp.fc2.weight": (C, mlp), "trunk.attn_pool.mlp.fc2.bias": (C,),
        "selection_feature_proj.fc1.weight": (n_sel * C, n_sel * C), "selection_feature_proj.fc1.bias": (n_sel * C,),
        "selection_feature_proj.norm.weight": (n_sel * C,), "selection_feature_proj.norm.bias": (n_sel * C,),
        "selection_feature_proj.fc2.weight": ((S - 1) * C, n_sel * C),
        "selection_feature_proj.fc2.bias": ((S - 1) * C,),
        "prior_prompt": (C,),
        "highres_selection_feature_module.stem.0.weight": (h, 3, k, k),
        "highres_selection_feature_module.stem.0.bias": (h,),
        "highres_selection_feature_module.stem.1.weight": (h,), "highres_selection_feature_module.stem.1.bias": (h,),
        "highres_selection_feature_module.out_proj.weight": (o, h, 1, 1),
        "highres_selection_feature_module.out_proj.bias": (o,),
        "prompt_proj_for_highres.weight": (o * (S - 1), C), "prompt_proj_for_highres.bias": (o * (S - 1),),
    }
    for i in range(L):
        b = f"trunk.blocks.{i}."
        keys.update({b + "norm1.weight": (C,), b + "norm1.bias": (C,), b + "norm2.weight": (C,), b + "norm2.bias": (C,),
                     b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                     b + "mlp.fc1.weight": (mlp, C), b + "mlp.fc1.bias": (mlp,),
                     b + "mlp.fc2.weight": (C, mlp), b + "mlp.fc2.bias": (C,)})
    for j in range(S - 1):
        keys[f"pos_emb_residual.{j}"] = (1, (scales[j + 1] // p) ** 2, C)
    for i in range(depth):
        b = f"highres_selection_feature_module.blocks.{i}."
        keys.update({b + "conv_dw.weight": (h, 1, 7, 7), b + "conv_dw.bias": (h,), b + "norm.weight": (h,),
                     b + "norm.bias": (h,), b + "mlp.fc1.weight": (4 * h, h), b + "mlp.fc1.bias": (4 * h,),
                     b + "mlp.fc2.weight": (h, 4 * h), b + "mlp.fc2.bias": (h,), b + "weight": (h,)})
    return {"vision_model." + k: v for k, v in keys.items()}


def build(**cfg):
    with torch.device("meta"):
        return ps3.PS3VisionModel(ps3.PS3VisionConfig(**cfg))


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_ps3_4k_siglip2_layout():
    scales = [378, 756, 1512, 3780]
    model = build(model_name="vit_so400m_patch14_siglip_378", ps3_scales=scales, **SO400M)
    assert shapes(model) == expected_vision_keys(scales)
    assert sum(p.numel() for p in model.parameters()) == 575_799_872
    assert model.vision_model.max_select_num_each_scale == [85, 341, 2134]


def test_ps3_1p5k_siglip_layout():
    scales = [378, 756, 1512]
    model = build(model_name="vit_so400m_patch14_siglip_384", ps3_scales=scales, **SO400M)
    assert shapes(model) == expected_vision_keys(scales)
    assert model.vision_model.max_select_num_each_scale == [512, 2048]


def test_published_token_counts():
    model = build(model_name="vit_so400m_patch14_siglip_378", ps3_scales=[378, 756, 1512, 3780], **SO400M)
    everything = model.count_tokens(3780, 3780, num_look_close="all")
    assert everything.total == 88209 and everything.num_looks == 35
    assert everything.per_scale == [2916, 11664, 72900]
    assert model.count_tokens(3780, 3780, num_look_close=1).total == 3289
    assert model.count_tokens(3780, 3780, num_look_close=1, only_select_first_n_scale=2).per_scale == [510, 2049, 1]
    small = build(model_name="vit_so400m_patch14_siglip_384", ps3_scales=[378, 756, 1512], **SO400M)
    assert small.count_tokens(1512, 1512, num_look_close="all").num_looks == 6
