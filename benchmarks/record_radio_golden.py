"""Record golden cases of a tiny C-RADIO-style PS3 model from the upstream implementation.

Run with the Python that has upstream's pins (``/work/shared/tools/setup_upstream_env.sh`` builds
one) and point ``--upstream`` at a checkout of NVlabs/PS3 (recorded at f7e3fd4)::

    /tmp/upstream/venv/bin/python benchmarks/record_radio_golden.py --upstream /tmp/upstream/PS3 \
        --out tests/fixtures/ps3_radio_tiny

It builds upstream's ``PS3Model`` on a tiny ViT with the C-RADIOv2 features (patch 16, a cropped
position table larger than the top scale, no final norm, adapter MLP v2 with inner blocks whose
output width differs from the trunk width, a 16-head MAP pool of the adapter's width), sets every
parameter to a random value, saves the joint checkpoint in the published layout (``config.json``
+ ``model.safetensors``) and records one ``cases/<name>.safetensors`` per call, in the format of
the SigLIP fixtures (metadata ``case``: the call's keyword arguments; tensors ``input.*`` and
``expected.*``).

One deviation from upstream's code, and only in its size: upstream builds the RADIO pool with a
hard-coded width of 1152 (``AttentionPoolLatent(1152, num_heads=16, mlp_ratio=3.7362)``), the
adapter's output width in both published configurations. A 1152-wide pool alone weighs 61 MB,
so the recording builds it at the adapter's output width (``radio_adapter_mlp_output_dim``), the
rule that gives 1152 for the published models; heads, MLP ratio and norm are upstream's.
The tower's key names and shapes at the published widths are recorded unpatched in
``layout_1152.json`` (names and shapes only, no weights).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

TRUNK = dict(patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0, class_token=False,
             global_pool="map", img_size=256)
ADAPTER_OUT = 48


def vision_config(pool_width: int = ADAPTER_OUT) -> dict:
    return {
        "model_name": "vit_test_radio_tiny_patch16",
        "vit": dict(TRUNK),  # read by the ps3 package; upstream keeps it as an unused key
        "hidden_size": TRUNK["embed_dim"], "pool": "map", "ps3": True, "ps3_scales": [48, 96, 192],
        "select_based_on_layer": [0, 1, 2, 3], "min_select_num": 1, "max_select_num": 45,  # budgets 9 and 36
        "separate_pos_emb": True, "highres_selection_feature": True,
        "highres_selection_module_hidden_dim": 16, "highres_selection_module_out_dim": 16,
        "highres_selection_module_depth": 2, "highres_selection_module_kernel_size": 28,
        "img_size": TRUNK["img_size"],  # a 16 x 16 position table; the top scale uses 12 x 12 of it
        "drop": 0.0, "class_token": False, "final_norm": False, "radio": True,
        "radio_adapter_mlp_version": "v2", "radio_adapter_mlp_input_dim": TRUNK["embed_dim"],
        "radio_adapter_mlp_hidden_dim": 40, "radio_adapter_mlp_output_dim": pool_width,
        "radio_adapter_mlp_num_inner": 2,
    }


def text_config(pool_width: int = ADAPTER_OUT) -> dict:
    return {
        "width": 32, "heads": 2, "layers": 2, "context_length": 16, "vocab_size": 256, "mlp_ratio": 4.0,
        "output_dim": pool_width,  # the joint embedding width (the pool's)
        "prompt_proj_dim": TRUNK["embed_dim"],  # prompts live in the trunk's width
        "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "act_kwargs": {"approximate": "tanh"},
        "norm_kwargs": {"eps": 1e-6}, "hf_tokenizer_name": None,
    }


def register_tiny_vit() -> None:
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    @register_model
    def vit_test_radio_tiny_patch16(pretrained=False, **kwargs):
        args = {k: TRUNK[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
        skip = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
        args.update({k: v for k, v in kwargs.items() if k not in skip})
        return VisionTransformer(**args)


def patch_pool_width(modeling, width: int) -> None:
    """Build upstream's RADIO pool at ``width`` instead of its hard-coded 1152 (see the module doc)."""
    original = modeling.AttentionPoolLatent

    def pool(dim, **kwargs):
        assert dim == 1152, "upstream's RADIO pool is the only AttentionPoolLatent built in modeling_ps3"
        return original(width, **kwargs)

    modeling.AttentionPoolLatent = pool


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so every parameter matters (layer norms around 1, the rest ~N(0, s²)
    at about the scale of a fresh layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".weight") and p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.2 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                p.copy_(noise * max(fan_in, 1) ** -0.5)


def save_case(path: Path, case: dict, tensors: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items() if v is not None}
    save_file(tensors, str(path), metadata={"case": json.dumps(case)})


def record(model, name: str, case: dict, pixels: torch.Tensor, out_dir: Path, text_ids=None, gt=None,
           is_global_text=None) -> None:
    vision = model.vision_model  # upstream's PS3VisionEncoder (what PS3VisionModel.forward calls)
    pixels = pixels.to(getattr(torch, case.get("dtype", "float32")))
    t = {"input.pixel_values": pixels}
    kw = {k: v for k, v in case.items() if k not in ("text", "pretrain", "dtype")}
    with torch.no_grad():
        if text_ids is not None:
            tout = model.text_model(text_ids)
            t.update({"input.text_ids": text_ids, "expected.text.pooled_output": tout.pooled_output,
                      "expected.text.prompt": tout.prompt})
            kw["prompt"] = tout.prompt
        if gt is not None:
            t["input.gt_selection_maps"] = gt
            kw["gt_selection_maps"] = gt.to(pixels.dtype)
        if is_global_text is not None:
            t["input.is_global_text"] = is_global_text
            kw["is_global_text"] = is_global_text
        kw["output_hidden_states"] = not case.get("pretrain")  # the encoder's default is pre-training
        out = vision(pixels, **kw)
    for field in ("selection_maps", "selection_probs", "bottomup_selection_probs", "topdown_selection_probs",
                  "hidden_states"):
        for i, x in enumerate(getattr(out, field, None) or []):
            t[f"expected.{field}.{i}"] = x
    if out.last_hidden_state is not None:
        t["expected.last_hidden_state"] = out.last_hidden_state
        if out.selection_maps is not None:
            maps = vision.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
            for i, m in enumerate(maps):
                t[f"expected.feature_maps.{i}"] = m
    if out.pooled_output is not None:
        t["expected.pooled_output"] = out.pooled_output
    save_case(out_dir / f"{name}.safetensors", case, t)
    print(f"  {name}: {sorted(k for k in t if not k.startswith('expected.hidden'))[:6]} ...")


def layout(config_cls) -> dict:
    """The joint config and key -> shape of upstream's model at the published pool width (1152),
    unpatched."""
    from ps3 import PS3Model
    config = config_cls(vision_config=vision_config(1152), text_config=text_config(1152))
    model = PS3Model(config)
    return {"config": config.to_dict(), "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}


def record_variants(modeling, out: Path, seed: int) -> None:
    """Checks too large to keep (run check_ps3_cases.py on each ``out/<variant>`` by hand):
    ``pool1152`` is upstream's code unpatched (the adapter ends at 1152, the pool is its hard-coded
    1152-wide one, 61 MB); ``v1_finalnorm`` the v1 adapter with the final norm kept."""
    from ps3 import PS3Config, PS3Model

    original = modeling.AttentionPoolLatent
    variants = {"pool1152": (vision_config(1152), text_config(1152), False),
                "v1_finalnorm": ({**vision_config(), "radio_adapter_mlp_version": "v1", "final_norm": True},
                                 text_config(), True)}
    for name, (vision, text, patch) in variants.items():
        modeling.AttentionPoolLatent = original
        if patch:
            patch_pool_width(modeling, ADAPTER_OUT)
        model = PS3Model(PS3Config(vision_config=vision, text_config=text)).eval()
        perturb(model, seed + 3)
        model.vision_model.num_hidden_layers_to_return = TRUNK["depth"]
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name / "cases").mkdir(parents=True)
        model.save_pretrained(out / name / "model")
        g = torch.Generator().manual_seed(seed + 4)
        x = torch.randn(2, 3, 40, 56, generator=g)  # non-square
        ids = torch.randint(1, 256, (2, 16), generator=g)
        cases = out / name / "cases"
        record(model, "topdown_look1", {"num_look_close": 1, "text": True}, x, cases, text_ids=ids)
        record(model, "all", {"num_look_close": "all"}, x, cases)
        record(model, "pretrain", {"pretrain": True}, x, cases)
    modeling.AttentionPoolLatent = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="a checkout of NVlabs/PS3")
    ap.add_argument("--out", required=True, help="fixture directory to (re)write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", help="also write the unstored variant checks (see record_variants) here")
    args = ap.parse_args()
    sys.path.insert(0, args.upstream)
    import ps3.modeling_ps3 as modeling

    from ps3 import PS3Config, PS3Model

    torch.manual_seed(args.seed)
    register_tiny_vit()
    if args.variants:
        record_variants(modeling, Path(args.variants), args.seed)
    out = Path(args.out)
    for part in ("model", "cases", "cases_bf16"):  # the README beside them stays
        shutil.rmtree(out / part, ignore_errors=True)
    (out / "cases").mkdir(parents=True)
    (out / "layout_1152.json").write_text(json.dumps(layout(PS3Config), indent=0, sort_keys=True) + "\n")

    patch_pool_width(modeling, ADAPTER_OUT)
    model = PS3Model(PS3Config(vision_config=vision_config(), text_config=text_config())).eval()
    perturb(model, args.seed)
    model.vision_model.num_hidden_layers_to_return = TRUNK["depth"]
    model.save_pretrained(out / "model")
    print("saved", out / "model", sum(p.numel() for p in model.parameters()), "parameters")

    g = torch.Generator().manual_seed(args.seed + 1)
    def pix(*s):
        return torch.randn(*s, generator=g)
    ids = torch.randint(1, 256, (2, 16), generator=g)
    ids[:, 12:] = 0
    # Inputs are small (the model resizes them to every scale): the fixture stays small.
    gt = torch.zeros(2, 32, 32)
    gt[0, 3:15, 17:30] = 1
    gt[1, 20:31, 0:10] = 1
    square = pix(2, 3, 32, 32)
    single = square[:1].clone()
    cases = out / "cases"
    record(model, "bottomup_look1", {"num_look_close": 1}, square, cases)
    record(model, "bottomup_all", {"num_look_close": "all"}, single, cases)
    record(model, "lowres_only", {"num_look_close": 0}, square, cases)
    record(model, "topdown_look2", {"num_look_close": 2, "text": True}, square, cases, text_ids=ids)
    record(model, "tokens_60", {"num_token_look_close": 60}, square, cases)
    record(model, "gt_maps_look1", {"num_look_close": 1, "text": True}, square, cases, text_ids=ids, gt=gt)
    record(model, "first_n_all", {"num_look_close": "all", "only_select_first_n_scale": [1]}, single, cases)
    record(model, "nonsquare_look2", {"num_look_close": 2}, pix(1, 3, 32, 48), cases)
    record(model, "smooth_topdown_look1", {"num_look_close": 1, "text": True, "smooth_selection_prob": True},
           square, cases, text_ids=ids)
    record(model, "pretrain_bottomup", {"pretrain": True}, square, cases)
    record(model, "pretrain_gt_pool", {"pretrain": True, "text": True, "pool_gt_token_only": True}, square,
           cases, text_ids=ids, gt=gt, is_global_text=torch.tensor([[False], [True]]))

    # bfloat16 (upstream runs it on a CPU too): the model and the input cast, every output bf16.
    # The gt maps force exactly one look's cells (3 x 3 of the 6 x 6 grid and 6 x 6 of the 12 x 12
    # one: the budgets 9 and 36), so that bf16's coarse probabilities leave no tie at the
    # boundary; these cases go to cases_bf16/ and are compared with bf16 tolerances.
    model.to(torch.bfloat16)
    forced = torch.zeros(2, 32, 32)
    forced[0, :16, :16] = 1
    forced[1, 16:, 16:] = 1
    bf16 = out / "cases_bf16"
    bf16.mkdir()
    record(model, "bf16_gt_look1", {"num_look_close": 1, "dtype": "bfloat16"}, square, bf16, gt=forced)
    record(model, "bf16_lowres_only", {"num_look_close": 0, "dtype": "bfloat16"}, square, bf16)
    record(model, "bf16_pretrain_gt", {"pretrain": True, "text": True, "dtype": "bfloat16"}, square, bf16,
           text_ids=ids, gt=forced)


if __name__ == "__main__":
    main()
