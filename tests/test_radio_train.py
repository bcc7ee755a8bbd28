"""``ps3 train`` on a C-RADIO-style PS3 (adapter MLP, cropped position table, no final norm):
it trains (the adapter and the pool get gradients through the contrastive loss) and exports
the published layout, which every loader reads back."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tolerances import assert_close_paths

from ps3 import PS3Model, PS3VisionModel

pytest.importorskip("webdataset")  # the trainer's data loader (ps3[train])

from ps3.train.export import export, load_run_model  # noqa: E402
from ps3.train.synthetic import write_synthetic_dataset  # noqa: E402

RADIO_MICRO = {
    "vision_config": {
        "model_name": "vit_micro_radio_patch16",
        "vit": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
                "global_pool": "map", "class_token": False},
        "hidden_size": 32, "pool": "map", "ps3_scales": [32, 64], "select_based_on_layer": [0, 1],
        "max_select_num": 8, "highres_selection_feature": False,
        "img_size": 128, "class_token": False, "final_norm": False, "radio": True,
        "radio_adapter_mlp_version": "v2", "radio_adapter_mlp_input_dim": 32, "radio_adapter_mlp_hidden_dim": 40,
        "radio_adapter_mlp_output_dim": 48, "radio_adapter_mlp_num_inner": 1,
    },
    "text_config": {
        "width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": None, "output_dim": 48,
        "prompt_proj_dim": 32, "mlp_ratio": 2.0, "pool_type": "last", "no_causal_mask": True, "proj_bias": True,
        "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6},
        "tokenizer_kwargs": {"clean": "canonicalize"},
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ps3.train.commands import main_train

    root = tmp_path_factory.mktemp("radio_train")
    write_synthetic_dataset(root / "data", 8, seed=0, size=64, shard_size=8)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(RADIO_MICRO))
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}))
    out = root / "run"
    argv = ["--model", str(root / "model"), "--train-data-image", str(root / "data" / "images"),
            "--train-data-text-box", str(root / "data" / "text_boxes"), "--output-dir", str(out), "--steps", "2",
            "--save-every-steps", "2", "--batch-size", "4", "--lr", "5e-3", "--warmup", "1", "--workers", "0",
            "--device", "cpu", "--quiet"]
    assert main_train(argv) == 0
    return out


def test_one_step_reaches_the_adapter_and_the_pool():
    """The pooled image feature runs through the adapter and the pool: the contrastive loss gives
    them finite, non-zero gradients (the prompt, in the trunk's width, only steers the selection)."""
    from ps3 import PS3Config
    from ps3.train.loss import siglip_loss
    from ps3.train.model_setup import PS3PretrainModule, initialise

    config = PS3Config(**json.loads(json.dumps(RADIO_MICRO)))
    config.text_config.vocab_size = 20
    torch.manual_seed(0)
    model = PS3Model(config)
    initialise(model, "random")
    g = torch.Generator().manual_seed(1)
    gt = torch.zeros(4, 64, 64)
    gt[:, 8:40, 16:48] = 1
    image, text, scale, bias, _, _ = PS3PretrainModule(model)(
        torch.randn(4, 3, 64, 64, generator=g), torch.randint(2, 20, (4, 8), generator=g), gt,
        torch.tensor([[True], [False], [False], [True]]))
    assert image.shape == text.shape == (4, 48)
    siglip_loss(image, text, scale, bias).backward()
    for name in ("vision_model.trunk.siglip_proj.fc1.weight", "vision_model.trunk.siglip_proj.blocks.0.2.weight",
                 "vision_model.trunk.siglip_proj.final.2.weight", "vision_model.trunk.attn_pool.kv.weight",
                 "vision_model.trunk.blocks.1.mlp.fc2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_training_run_keeps_the_radio_trunk(run):
    trained, state, _ = load_run_model(run)
    assert trained.vision_model.trunk.pooled_dim == 48
    assert isinstance(trained.vision_model.trunk.norm, torch.nn.Identity)
    assert all(torch.isfinite(v).all() for k, v in state["model"].items() if "siglip_proj" in k)


def test_export_writes_the_published_layout(run, tmp_path):
    trained, _, _ = load_run_model(run)
    out = tmp_path / "export"
    export(run, out)
    tensors = load_file(out / "model.safetensors")
    assert {k for k in tensors if k.startswith("vision_model.trunk.siglip_proj.")} == {
        f"vision_model.trunk.siglip_proj.{m}.{p}" for m in ("fc1", "blocks.0.0", "blocks.0.2", "final.0", "final.2")
        for p in ("weight", "bias")}
    assert not any(k.startswith("vision_model.trunk.norm.") for k in tensors)
    assert tensors["vision_model.trunk.pos_embed"].shape == (1, 64, 32)  # the 8 x 8 table of img_size 128
    config = json.loads((out / "config.json").read_text())["vision_config"]
    assert {k: config[k] for k in RADIO_MICRO["vision_config"]} == RADIO_MICRO["vision_config"]
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = trained.vision_model(pixels, output_hidden_states=False)
        for tower in (PS3Model.from_pretrained(out).vision_model, PS3VisionModel.from_pretrained(out)):
            got = tower(pixels, output_hidden_states=False)
            # Loaded tensors may be laid out unlike the trained ones (kernels pick their blocking
            # by stride): rounding-level agreement.
            assert_close_paths(got.pooled_output, want.pooled_output, "pooled_output")
