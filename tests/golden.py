"""Compare a PS3 call with outputs recorded from the upstream implementation.

Rules from the fixtures' README: selection probabilities to 1e-5; features to 2e-4 (abs and rel);
selection maps equal, except that cells of exactly equal probability at the top-k boundary may be
chosen differently (then the high-res features are not comparable, the low-res ones still are).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ps3

FIXTURES = Path(__file__).parent / "fixtures" / "ps3_tiny"
MODEL_DIR = FIXTURES / "model"
CASES = sorted((FIXTURES / "cases").glob("*.safetensors"))
RADIO_FIXTURES = Path(__file__).parent / "fixtures" / "ps3_radio_tiny"  # a C-RADIO-style tower
RADIO_MODEL_DIR = RADIO_FIXTURES / "model"
RADIO_CASES = sorted((RADIO_FIXTURES / "cases").glob("*.safetensors"))
FEATURE_TOL = 2e-4
PROB_TOL = 1e-5


def load_case(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["case"])
    return meta, load_file(str(path))


def indexed(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    keys = [k for k in tensors if k.startswith(prefix + ".")]
    return [tensors[k] for k in sorted(keys, key=lambda k: int(k.rsplit(".", 1)[1]))]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = FEATURE_TOL) -> None:
    """Same dtype (the recorded call ran in float32, so every output upstream returns is float32),
    shape and values within ``tol``."""
    assert got is not None, f"{what} missing"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, upstream returns {want.dtype}"
    got = got.detach().float().cpu()
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want.float()).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, want.float(), atol=tol, rtol=tol), f"{what}: max abs diff {diff:.3g}"


def differs_only_in_ties(ours: torch.Tensor, ref: torch.Tensor, probs: torch.Tensor) -> bool:
    """Same count per sample, and every disagreeing cell holds a value found both inside and
    outside the reference selection (a tie torch.topk may break either way)."""
    if not torch.equal(ours.sum((-1, -2)), ref.sum((-1, -2))):
        return False
    for b in range(ref.shape[0]):
        p, r, o = probs[b].flatten(), ref[b].flatten().bool(), ours[b].flatten().bool()
        boundary = set(p[r].tolist()) & set(p[~r].tolist())
        if any(v not in boundary for v in p[r ^ o].tolist()):
            return False
    return True


def check_selection(out, t: dict[str, torch.Tensor]) -> bool:
    """Asserts probabilities and maps; returns True when maps are identical (features comparable)."""
    for field in ("selection_probs", "bottomup_selection_probs", "topdown_selection_probs"):
        for i, want in enumerate(indexed(t, f"expected.{field}")):
            got = getattr(out, field)
            assert got is not None and i < len(got), f"{field}[{i}] missing"
            assert_close(got[i], want, f"{field}[{i}]", PROB_TOL)
    identical = True
    probs = indexed(t, "expected.selection_probs")
    for i, want in enumerate(indexed(t, "expected.selection_maps")):
        # Upstream's maps are floating 0/1 (zeros_like of the probabilities); VILA area-resizes them.
        assert out.selection_maps[i].dtype == want.dtype, f"selection_maps[{i}] dtype {out.selection_maps[i].dtype}"
        got = out.selection_maps[i].detach().cpu().long()
        assert got.shape == want.shape, f"selection_maps[{i}] shape {tuple(got.shape)}"
        if not torch.equal(got, want.long()):
            assert differs_only_in_ties(got, want.long(), probs[i]), f"selection_maps[{i}] differ beyond ties"
            identical = False
    return identical


def run_case(vision, model_dir: Path, path: Path) -> None:
    """Run one recorded call through ``vision`` (the text tower from ``model_dir`` when the case
    has a prompt) and assert every recorded output, with the README's rules."""
    meta, t = load_case(path)
    kwargs = {k: meta[k] for k in ("num_look_close", "num_token_look_close", "smooth_selection_prob",
                                   "only_select_first_n_scale", "pool_gt_token_only") if k in meta}
    if "input.text_ids" in t:
        text = ps3.PS3TextModel.from_pretrained(model_dir)
        with torch.no_grad():
            tout = text(t["input.text_ids"])
        assert_close(tout.pooled_output, t["expected.text.pooled_output"], "text.pooled_output")
        assert_close(tout.prompt, t["expected.text.prompt"], "text.prompt")
        kwargs["prompt"] = t["expected.text.prompt"]
    for name in ("gt_selection_maps", "is_global_text"):
        if f"input.{name}" in t:
            kwargs[name] = t[f"input.{name}"]
    if meta.get("pretrain"):
        kwargs["output_hidden_states"] = False
    with torch.no_grad():
        out = vision(t["input.pixel_values"], **kwargs)
    identical = check_selection(out, t)
    if not meta.get("pretrain"):
        # What upstream's inference call leaves None: no maps without looks, no pooled feature,
        # no separate bottom-up / top-down maps (the recorder stores every field it returned).
        for field in ("selection_maps", "pooled_output", "bottomup_selection_probs", "topdown_selection_probs"):
            recorded = any(k.startswith(f"expected.{field}") for k in t)
            assert (getattr(out, field) is not None) == recorded, f"{field}: None-ness differs from upstream"
        assert isinstance(out.hidden_states, list), "upstream returns hidden_states as a list"
    if "expected.last_hidden_state" in t:
        want = t["expected.last_hidden_state"]
        if identical:
            assert_close(out.last_hidden_state, want, "last_hidden_state")
            layers = indexed(t, "expected.hidden_states")
            assert len(out.hidden_states) == len(layers)
            for i, w in enumerate(layers):
                assert_close(out.hidden_states[i], w, f"hidden_states[{i}]")
            maps = indexed(t, "expected.feature_maps")
            if maps:
                got = vision.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
                for i, w in enumerate(maps):
                    assert_close(got[i], w, f"feature_maps[{i}]")
        else:
            low = vision.vision_model.low_res_token_num
            assert_close(out.last_hidden_state[:, :low], want[:, :low], "last_hidden_state (low-res part)")
    if "expected.pooled_output" in t and identical:
        assert_close(out.pooled_output, t["expected.pooled_output"], "pooled_output")
