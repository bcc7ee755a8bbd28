"""Every output field a caller reads has upstream's dtype, container and None-ness, in float32,
bfloat16 and float16 calls (upstream NVlabs/PS3 f7e3fd4, ps3/modeling_ps3.py: selection maps are
``zeros_like`` of the probabilities, the probabilities and features keep the model's dtype, the
inference output carries no pooled feature and no separate bottom-up / top-down maps).
``benchmarks/upstream_types.py`` checks the same table against upstream's code itself."""
import pytest
import torch

import ps3
from golden import MODEL_DIR

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def models():
    return {dt: (ps3.PS3VisionModel.from_pretrained(MODEL_DIR).eval().to(dt),
                 ps3.PS3TextModel.from_pretrained(MODEL_DIR).eval().to(dt)) for dt in DTYPES}


def floats(values, dtype, batch):
    assert isinstance(values, list), type(values)
    for v in values:
        assert v.dtype == dtype and v.shape[0] == batch and v.device.type == "cpu"


CALLS = {
    "lowres_only": dict(num_look_close=0),
    "look1": dict(num_look_close=1),
    "look2_prompt": dict(num_look_close=2, prompt=True),
    "tokens_50_gt": dict(num_token_look_close=50, gt=True),
    "all_smooth": dict(num_look_close="all", smooth_selection_prob=True),
    "pretrain": dict(output_hidden_states=False),
    "pretrain_prompt_gt": dict(output_hidden_states=False, prompt=True, gt=True, pool_gt_token_only=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(CALLS))
def test_vision_output_types(models, dtype, name):
    vision, _ = models[dtype]
    kw = dict(CALLS[name])
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)
    if kw.pop("prompt", False):
        kw["prompt"] = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    if kw.pop("gt", False):
        gt = torch.zeros(2, 224, 224)
        gt[:, 40:120, 60:200] = 1
        kw["gt_selection_maps"] = gt.long() if name == "tokens_50_gt" else gt.to(dtype)
    with torch.no_grad():
        out = vision(x, **kw)
    pretrain = kw.get("output_hidden_states") is False
    floats(out.selection_probs, dtype, 2)
    if pretrain:
        assert out.last_hidden_state is None and out.hidden_states is None
        assert out.pooled_output.dtype == dtype and out.pooled_output.shape == (2, 64)
        floats(out.bottomup_selection_probs, dtype, 2)
        if "prompt" in kw:
            floats(out.topdown_selection_probs, dtype, 2)
        else:
            assert out.topdown_selection_probs is None
    else:
        assert out.pooled_output is None
        assert out.bottomup_selection_probs is None and out.topdown_selection_probs is None
        floats(out.hidden_states, dtype, 2)
        assert out.last_hidden_state.dtype == dtype and out.last_hidden_state is out.hidden_states[-1]
    if name == "lowres_only":
        assert out.selection_maps is None
        return
    floats(out.selection_maps, dtype, 2)  # 0/1 in the probabilities' dtype, as upstream
    for m in out.selection_maps:
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    if not pretrain:
        maps = vision.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
        floats(maps, dtype, 2)
        assert out.lengths is None and out.feature_sizes is None and out.num_looks is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_text_output_types(models, dtype):
    _, text = models[dtype]
    with torch.no_grad():
        out = text(torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(2)))
    assert out.pooled_output.dtype == out.prompt.dtype == dtype
    assert out.pooled_output.shape == out.prompt.shape == (2, 64)


def test_vila_area_resizes_the_maps(models):
    # NVlabs/VILA llava_arch.py encode_images_ps3: F.interpolate(m.unsqueeze(1), ..., mode="area")
    # on each selection map; integer maps raise "adaptive_avg_pool2d not implemented for 'Long'".
    vision, _ = models[torch.bfloat16]
    with torch.no_grad():
        out = vision(torch.rand(2, 3, 224, 224).bfloat16(), num_look_close=1)
    for m in out.selection_maps:
        half = torch.nn.functional.interpolate(m.unsqueeze(1), (-(-m.shape[-2] // 2), -(-m.shape[-1] // 2)),
                                               mode="area").squeeze(1)
        assert half.dtype == torch.bfloat16 and half.max() <= 1
