"""C-RADIO PS3 towers (``radio: true``, design §1.6): outputs recorded from upstream's code on a
tiny C-RADIO-style model (tests/fixtures/ps3_radio_tiny), its checkpoint layout read and written
key for key, the published C-RADIOv2 layouts, mixed batches and bf16."""
import json

import pytest
import torch
from golden import RADIO_CASES, RADIO_FIXTURES, RADIO_MODEL_DIR, indexed, load_case, run_case
from safetensors.torch import load_file
from tolerances import assert_close_bf16, assert_close_paths, assert_same_selection

import ps3
from ps3 import registry
from ps3.config import PS3Config, PS3VisionConfig


@pytest.fixture(scope="module")
def vision():
    return ps3.PS3VisionModel.from_pretrained(RADIO_MODEL_DIR).eval()


@pytest.mark.parametrize("path", RADIO_CASES, ids=[p.stem for p in RADIO_CASES])
def test_case_matches_upstream(vision, path):
    run_case(vision, RADIO_MODEL_DIR, path)


def test_fixture_is_a_radio_tower(vision):
    trunk = vision.vision_model.trunk
    assert isinstance(trunk.norm, torch.nn.Identity)  # final_norm: false
    assert trunk.crop_pos_embed and trunk.arch.pos_grid == 16 > 192 // 16  # cropped, larger than the top scale
    assert trunk.pooled_dim == 48 != vision.width == 32  # the adapter's width differs from the trunk's


def test_joint_checkpoint_saved_key_for_key(tmp_path):
    model = ps3.PS3Model.from_pretrained(RADIO_MODEL_DIR)
    model.save_pretrained(tmp_path)
    want, got = load_file(RADIO_MODEL_DIR / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    # logit_scale / logit_bias: the joint model's contrastive pair (upstream keeps it in training only).
    assert sorted(k for k in got if not k.startswith("logit_")) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(k.startswith("vision_model.trunk.siglip_proj.blocks.1.") for k in got)
    assert not any(k.startswith("vision_model.trunk.norm.") for k in got)
    recorded = json.loads((RADIO_MODEL_DIR / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("radio", "radio_adapter_mlp_version", "radio_adapter_mlp_input_dim", "radio_adapter_mlp_hidden_dim",
                "radio_adapter_mlp_output_dim", "radio_adapter_mlp_num_inner", "img_size", "final_norm", "class_token"):
        assert saved["vision_config"][key] == recorded["vision_config"][key], key
    assert ps3.PS3VisionModel.from_pretrained(tmp_path).vision_model.trunk.pooled_dim == 48


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_layout_at_the_published_pool_width_matches_upstream():
    """Upstream's joint model with the adapter ending at 1152 (its hard-coded pool width),
    recorded unpatched: every key and shape."""
    recorded = json.loads((RADIO_FIXTURES / "layout_1152.json").read_text())
    with torch.device("meta"):
        model = ps3.PS3Model(PS3Config.from_dict(recorded["config"]))
    ours = {k: v for k, v in shapes(model).items() if not k.startswith("logit_")}
    assert ours == {k: v for k, v in recorded["shapes"].items() if not k.startswith("logit_")}


@pytest.mark.parametrize("name,scales,budgets", [
    ("PS3-4K-C-RADIOv2", [384, 768, 1536, 3840], [85, 341, 2134]),
    ("PS3-1.5K-C-RADIOv2", [384, 768, 1536], [512, 2048]),
])
def test_published_radio_layouts(name, scales, budgets):
    joint, pre = registry.published_configs(f"nvidia/{name}")
    assert joint == registry.training_config(name)[0]
    assert pre["image_size"] == scales[-1] and pre["mean"] == list(registry.CLIP_MEAN)
    with torch.device("meta"):
        model = ps3.PS3Model(PS3Config.from_dict(joint))
    got = {k: tuple(v) for k, v in shapes(model).items()}
    v = "vision_model.trunk."
    assert got[v + "pos_embed"] == (1, 256 * 256, 1024) and got[v + "patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert got[v + "siglip_proj.fc1.weight"] == (1520, 1024)
    assert got[v + "siglip_proj.blocks.2.2.weight"] == (1520, 1520)
    assert got[v + "siglip_proj.final.2.weight"] == (1152, 1520) and v + "siglip_proj.blocks.3.0.weight" not in got
    assert got[v + "attn_pool.latent"] == (1, 1, 1152)
    assert got[v + "attn_pool.mlp.fc1.weight"] == (4304, 1152)
    assert got[v + "blocks.23.mlp.fc1.weight"] == (4096, 1024) and v + "blocks.24.norm1.weight" not in got
    assert v + "norm.weight" not in got
    assert got["vision_model.prompt_proj_for_highres.weight"] == (512 * (len(scales) - 1), 1024)
    assert got["vision_model.selection_feature_proj.fc1.weight"] == (4096, 4096)
    assert got["text_model.text_projection.weight"][0] == 1152  # meets the 1152-wide pooled feature
    assert got["text_model.prompt_proj.fc2.weight"][0] == 1024  # prompts steer the 1024-wide trunk
    assert model.vision_model.max_select_num_each_scale == budgets
    counts = model.vision_model.count_tokens(scales[-1], scales[-1], num_look_close="all")
    assert counts.per_scale == [(s // 16) ** 2 for s in scales[1:]] and counts.low_res == 576


def test_published_config_from_a_local_directory(tmp_path):
    joint, pre = registry.published_configs("PS3-4K-C-RADIOv2")
    (tmp_path / "config.json").write_text(json.dumps(joint))
    config = PS3VisionConfig.from_pretrained(tmp_path, local_files_only=True)
    assert config.radio is True and config.radio_adapter_mlp_output_dim == 1152 and config.img_size == 4096


@pytest.mark.parametrize("change,match", [
    (dict(radio_adapter_mlp_version=None), "radio_adapter_mlp_version"),
    (dict(radio_adapter_mlp_version="v3"), "radio_adapter_mlp_version"),
    (dict(radio_adapter_mlp_input_dim=64), "radio_adapter_mlp_input_dim"),
    (dict(radio_adapter_mlp_hidden_dim=None), "radio_adapter_mlp_hidden_dim"),
    (dict(radio_adapter_mlp_output_dim=40), "radio_adapter_mlp_output_dim"),
    (dict(img_size=128), "img_size"),
    (dict(img_size="big"), "img_size"),
    (dict(class_token=True), "class_token"),
])
def test_bad_radio_configs_name_the_key(change, match):
    base = PS3VisionConfig.from_pretrained(RADIO_MODEL_DIR).to_dict()
    with pytest.raises(ValueError, match=match):
        ps3.PS3VisionModel(PS3VisionConfig.from_dict({**base, **change}))


def test_adapter_v1_and_final_norm_build_and_run():
    base = PS3VisionConfig.from_pretrained(RADIO_MODEL_DIR).to_dict()
    torch.manual_seed(0)
    model = ps3.PS3VisionModel(PS3VisionConfig.from_dict({**base, "radio_adapter_mlp_version": "v1",
                                                          "final_norm": True})).eval()
    assert sorted(k for k in shapes(model) if "siglip_proj" in k)[:4] == [
        "vision_model.trunk.siglip_proj.fc1.bias", "vision_model.trunk.siglip_proj.fc1.weight",
        "vision_model.trunk.siglip_proj.fc2.bias", "vision_model.trunk.siglip_proj.fc2.weight"]
    assert "vision_model.trunk.siglip_proj.inner.4.weight" in shapes(model)  # the second inner LayerNorm
    assert isinstance(model.vision_model.trunk.norm, torch.nn.LayerNorm)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 40, 40), output_hidden_states=False)
    assert out.pooled_output.shape == (2, 48)


def test_mixed_batch_equals_single_calls(vision):
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(32, 32), (24, 48), (64, 40)]]
    kw = dict(num_token_look_close=[45, 20, 60], only_select_first_n_scale=[2, 1, 2])
    with torch.no_grad():
        out = vision(images, **kw)
        for b, one in enumerate(out.per_sample()):
            ref = vision(images[b][None], **{k: v[b] for k, v in kw.items()})
            if assert_same_selection(one.selection_maps, ref.selection_maps, ref.selection_probs):
                assert_close_paths(one.last_hidden_state, ref.last_hidden_state, f"image {b}")
        pooled = vision(images, output_hidden_states=False).pooled_output
        for b, image in enumerate(images):
            ref = vision(image[None], output_hidden_states=False)
            assert_close_paths(pooled[b:b + 1], ref.pooled_output, f"pooled {b}")


def test_c_radio_bench_preset():
    """``ps3 bench --preset c-radio`` / ``benchmarks/bf16.py --preset c-radio``: the published 4K
    C-RADIOv2 vision tower's layout at full size, a working tower when narrowed."""
    from ps3.cli import build_parser

    assert registry.preset_scales("c-radio") == (registry.SCALES_1P5K_RADIO, registry.SCALES_4K_RADIO)
    with torch.device("meta"):
        bench = ps3.PS3VisionModel(registry.bench_vision_config("c-radio"))
        published = ps3.PS3VisionModel(PS3VisionConfig.from_dict(registry.published_configs("PS3-4K-C-RADIOv2")[0]))
    assert shapes(bench) == shapes(published)
    small = registry.bench_vision_config("c-radio", [32, 64], width=64, depth=2)
    torch.manual_seed(0)
    model = ps3.PS3VisionModel(small).eval()
    assert model.vision_model.patch_size == 16 and model.vision_model.trunk.pooled_dim == 1152
    with torch.no_grad():
        out, pooled = model.encode_looks_with_pooled(torch.randn(1, 3, 64, 64), num_look_close=1)
    assert out.last_hidden_state.shape[-1] == 64 and pooled.shape == (1, 1152)
    assert build_parser().parse_args(["bench", "--preset", "c-radio"]).preset == "c-radio"


BF16_CASES = sorted((RADIO_FIXTURES / "cases_bf16").glob("*.safetensors"))


@pytest.fixture(scope="module")
def towers_bf16():
    return (ps3.PS3VisionModel.from_pretrained(RADIO_MODEL_DIR, dtype="bfloat16").eval(),
            ps3.PS3TextModel.from_pretrained(RADIO_MODEL_DIR, dtype="bfloat16").eval())


@pytest.mark.parametrize("path", BF16_CASES, ids=[p.stem for p in BF16_CASES])
def test_bf16_case_matches_upstream(towers_bf16, path):
    """Upstream's bf16 run on a CPU (model and input cast): every output bf16, the forced cells
    selected, values within bf16 rounding of upstream's."""
    vision, text = towers_bf16
    meta, t = load_case(path)
    kw = {"num_look_close": meta["num_look_close"]} if "num_look_close" in meta else {}
    with torch.no_grad():
        if "input.text_ids" in t:
            tout = text(t["input.text_ids"])
            assert_close_bf16(tout.prompt, t["expected.text.prompt"], "text.prompt")
            assert_close_bf16(tout.pooled_output, t["expected.text.pooled_output"], "text.pooled_output")
            kw["prompt"] = tout.prompt
        if "input.gt_selection_maps" in t:
            kw["gt_selection_maps"] = t["input.gt_selection_maps"]
        out = vision(t["input.pixel_values"], output_hidden_states=not meta.get("pretrain"), **kw)
    for field in ("selection_probs", "bottomup_selection_probs", "topdown_selection_probs"):
        for i, want in enumerate(indexed(t, f"expected.{field}")):
            assert_close_bf16(getattr(out, field)[i], want, f"{field}[{i}]", prob=True)
    for i, want in enumerate(indexed(t, "expected.selection_maps")):
        assert out.selection_maps[i].dtype == want.dtype and torch.equal(out.selection_maps[i], want), i
    if "expected.last_hidden_state" in t:
        assert_close_bf16(out.last_hidden_state, t["expected.last_hidden_state"], "last_hidden_state")
        layers = indexed(t, "expected.hidden_states")
        assert len(out.hidden_states) == len(layers)
        for i, want in enumerate(layers):
            assert_close_bf16(out.hidden_states[i], want, f"hidden_states[{i}]")
    if "expected.pooled_output" in t:
        assert_close_bf16(out.pooled_output, t["expected.pooled_output"], "pooled_output")
