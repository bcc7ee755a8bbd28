"""Side by side with upstream: the type of every output field a caller can read.

For each call upstream accepts (looks 0/1/2/"all", token budgets, first-n scales, prompts, gt
maps, smoothing, pre-training mode with and without global text, float32 and bfloat16), run the
tiny fixture checkpoint through upstream's code and ours and print every field whose None-ness,
dtype, shape or device differs. Values are the golden tests' business; this is about types.

    /tmp/upstream/venv/bin/python benchmarks/upstream_types.py --upstream /tmp/upstream/PS3

(``../shared/tools/setup_upstream_env.sh`` builds that Python and checkout.) Run from the repository
root; ours is imported from ``src/``. Exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "tests" / "fixtures" / "ps3_tiny" / "model"
FIELDS = ("last_hidden_state", "hidden_states", "pooled_output", "selection_maps", "selection_probs",
          "bottomup_selection_probs", "topdown_selection_probs",
          "lengths", "feature_sizes", "num_looks")


def load_upstream(path: Path):
    """Upstream's package under another name (ours is ``ps3`` too), with the fixture's tiny
    backbone registered in timm (upstream builds its trunk with timm.create_model)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    @register_model
    def vit_test_tiny_patch14_map(pretrained=False, **kw):  # the fixture's `vit` dict
        kw = {k: v for k, v in kw.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        kw.setdefault("img_size", 56)
        return VisionTransformer(patch_size=14, embed_dim=64, depth=4, num_heads=4, mlp_ratio=3.7362,
                                 class_token=False, **kw)

    spec = importlib.util.spec_from_file_location("upstream_ps3", path / "ps3" / "__init__.py",
                                                  submodule_search_locations=[str(path / "ps3")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["upstream_ps3"] = module
    spec.loader.exec_module(module)
    assert timm.is_model("vit_test_tiny_patch14_map")
    return module


def describe(value):
    """None, or a tuple of (dtype, shape, device) per tensor (a list/tuple of tensors: one each)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.device.type)
    return (type(value).__name__,) + tuple(describe(v) for v in value)


def calls(width: int):
    """(name, kwargs builder) of every call exercised; the builder takes the dtype."""
    torch.manual_seed(0)
    prompt = torch.randn(2, width)
    gt = torch.zeros(2, 224, 224)
    gt[:, 30:90, 100:200] = 1
    glob = torch.tensor([[True], [False]])
    yield "lowres_only", lambda dt: dict(num_look_close=0)
    yield "tokens_0", lambda dt: dict(num_token_look_close=0)
    yield "look1", lambda dt: dict(num_look_close=1)
    yield "look2_prompt", lambda dt: dict(num_look_close=2, prompt=prompt.to(dt))
    yield "all", lambda dt: dict(num_look_close="all")
    yield "tokens_50", lambda dt: dict(num_token_look_close=50)
    yield "tokens_130", lambda dt: dict(num_token_look_close=130)
    yield "first_scale", lambda dt: dict(num_look_close=1, only_select_first_n_scale=1)
    yield "gt_float", lambda dt: dict(num_look_close=1, gt_selection_maps=gt.to(dt))
    yield "gt_long", lambda dt: dict(num_look_close=1, gt_selection_maps=gt.long())
    yield "smooth_prompt", lambda dt: dict(num_look_close=1, prompt=prompt.to(dt), smooth_selection_prob=True)
    yield "pretrain", lambda dt: dict(output_hidden_states=False)
    yield "pretrain_prompt_gt", lambda dt: dict(output_hidden_states=False, prompt=prompt.to(dt),
                                                gt_selection_maps=gt.to(dt), pool_gt_token_only=True,
                                                is_global_text=glob)


def compare(upstream, dtype: torch.dtype) -> list[str]:
    import ps3
    theirs = upstream.PS3VisionModel.from_pretrained(str(MODEL_DIR)).eval().to(dtype)
    ours = ps3.PS3VisionModel.from_pretrained(str(MODEL_DIR)).eval().to(dtype)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224).to(dtype)
    problems = []
    for name, make in calls(ours.vision_model.width):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = theirs(pixels, **make(dtype))
            got = ours(pixels, **make(dtype))
        rows = [(f, describe(getattr(want, f, None)), describe(getattr(got, f, None))) for f in FIELDS]
        if want.selection_maps is not None and want.last_hidden_state is not None:
            fm_want = theirs.vision_model.format_features_into_feature_maps(want.last_hidden_state, want.selection_maps)
            fm_got = ours.vision_model.format_features_into_feature_maps(got.last_hidden_state, got.selection_maps)
            rows.append(("feature_maps", describe(fm_want), describe(fm_got)))
        bad = [f"  {f}: upstream {w} / ours {g}" for f, w, g in rows if w != g]
        print(f"{str(dtype)[6:]:9} {name:20} {'same types' if not bad else 'DIFFERS'}")
        problems += [f"{dtype} {name}:"] + bad if bad else []
    return problems + compare_text(upstream, dtype)


def compare_text(upstream, dtype: torch.dtype) -> list[str]:
    import ps3
    theirs = upstream.PS3TextModel.from_pretrained(str(MODEL_DIR)).eval().to(dtype)
    ours = ps3.PS3TextModel.from_pretrained(str(MODEL_DIR)).eval().to(dtype)
    ids = torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        want, got = theirs(ids), ours(ids)
    rows = [(f, describe(getattr(want, f, None)), describe(getattr(got, f, None))) for f in ("pooled_output", "prompt")]
    bad = [f"  text.{f}: upstream {w} / ours {g}" for f, w, g in rows if w != g]
    print(f"{str(dtype)[6:]:9} {'text':20} {'same types' if not bad else 'DIFFERS'}")
    return [f"{dtype} text:"] + bad if bad else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help="an NVlabs/PS3 checkout")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    upstream = load_upstream(args.upstream)
    problems = [p for dtype in (torch.float32, torch.bfloat16, torch.float16) for p in compare(upstream, dtype)]
    print("\n".join(problems) if problems else "every field has upstream's None-ness, dtype, shape and device")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
