"""Low precision on the CPU (ps3.encoder.precision): capability detection, the chunked bf16 attention, the
bf16 encoder's agreement with float32, and the float32 fallback on CPUs without bf16 units.

Tolerances. bf16 keeps 8 significant bits, so one rounding moves a value by at most 2^-9 of it.
* Attention: the scores are rounded to bf16 before the softmax (|score| <= ~4 here, so each
  probability moves by up to ~4·2^-9 relative), the probabilities and the output once more: every
  output, a convex combination of value rows, is within ~6·2^-9 · max|v| of float32. We allow
  2^-6 · max|v| (8·2^-9).
* A whole encoder: a token's path through the tiny model's 4 blocks passes ~20 such roundings
  (weights, inputs and outputs of each product, the residual sums), each up to 2^-9 of the
  residual stream's scale; their sum stays under 2^-4 of the stream's RMS on average and under
  2^-3 of it at the largest of the tokens' elements (measured: 0.01 and 0.08).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ps3
import ps3.encoder.precision as precision
from golden import MODEL_DIR
from ps3.encoder.precision import attention, cpu_capability, native_dtype

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rand(*shape, seed=0, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def images(b=2, h=224, w=224, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_capability_is_read_from_this_machine():
    cap = cpu_capability()
    assert cap.aten == torch.backends.cpu.get_cpu_capability()
    assert cap.flags <= set(precision._FLAGS_OF_INTEREST)
    if cap.native_bf16:  # units in the flags and oneDNN taking bf16
        assert cap.flags & {"avx512_bf16", "amx_bf16"} and cap.onednn_bf16
    if not cap.flags & {"avx512_fp16", "amx_fp16"}:
        assert not cap.native_fp16
    assert set(cap.as_dict()) >= {"aten_capability", "native_bf16", "native_fp16"}
    assert "natively" in cap.describe()


def test_native_dtype_override(monkeypatch):
    assert native_dtype(torch.float32) and native_dtype(torch.bfloat16, "cuda")
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "float32")
    assert not native_dtype(torch.bfloat16) and not native_dtype(torch.float16)
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    assert native_dtype(torch.bfloat16) and native_dtype(torch.float16)
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "fast")
    with pytest.raises(ValueError, match="PS3_CPU_LOW_PRECISION"):
        native_dtype(torch.bfloat16)


@pytest.mark.parametrize("n,p,masked", [(300, 400, True), (256, 300, False), (1, 70000, False)])
def test_chunked_attention_agrees_with_float32(monkeypatch, n, p, masked):
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")  # the bf16 path, emulated where there are no units
    monkeypatch.setenv("PS3_ATTENTION", "chunked")
    q, k, v = rand(2, 3, n, 64, seed=1), rand(2, 3, p, 64, seed=2), rand(2, 3, p, 64, seed=3)
    mask = torch.rand(2, 1, 1, p, generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    assert precision._chunked_applies(q, k, v)
    with torch.no_grad():
        got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2 ** -6 * v.abs().max().item())
    # the caller's (B, N, H·d) reshape is a view of the result
    assert got.transpose(1, 2).reshape(2, n, -1).data_ptr() == got.data_ptr()


@pytest.mark.parametrize("kernel", ["chunked", "sdpa"])
def test_masked_keys_are_never_attended(monkeypatch, kernel):
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    monkeypatch.setenv("PS3_ATTENTION", kernel)
    q, k, v = rand(1, 2, 300, 64, seed=1), rand(1, 2, 400, 64, seed=2), rand(1, 2, 400, 64, seed=3)
    mask = torch.ones(1, 1, 1, 400, dtype=torch.bool)
    mask[..., 100:] = False
    v[:, :, 100:] = 1e4
    with torch.no_grad():
        out = attention(q, k, v, mask)
    assert out.abs().max() <= v[:, :, :100].abs().max()


def test_inference_paths_only_for_large_low_precision_inputs(monkeypatch):
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    q = rand(1, 2, 300, 64).requires_grad_()
    assert not precision._chunked_applies(q, q, q)  # grad wanted: the training path
    assert not precision._chunked_applies(q.float(), q.float(), q.float())
    small = rand(1, 2, 16, 64)
    assert not precision._chunked_applies(small, small, small)


def test_bf16_training_attention_gradients_agree_with_float32(monkeypatch):
    """Training in bf16 (autograd through matmuls and a softmax): values and gradients within
    the attention tolerance above of float32's."""
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    q32, k32, v32 = rand(2, 3, 40, 64, seed=1, dtype=torch.float32), rand(2, 3, 56, 64, seed=2, dtype=torch.float32), \
        rand(2, 3, 56, 64, seed=3, dtype=torch.float32)
    mask = torch.rand(2, 1, 1, 56, generator=torch.Generator().manual_seed(4)) > 0.3
    grad = rand(2, 3, 40, 64, seed=5, dtype=torch.float32)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32)]
        out = attention(*leaves, mask)
        out.backward(grad.to(dtype))
        results.append([out.float()] + [t.grad.float() for t in leaves])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=2 ** -6 * max(want.abs().max().item(), 1.0))


@pytest.fixture(scope="module")
def models():
    return (ps3.PS3VisionModel.from_pretrained(MODEL_DIR),
            ps3.PS3VisionModel.from_pretrained(MODEL_DIR, dtype="bfloat16"))


def _forced_cells():
    gt = torch.zeros(2, 224, 224)
    # Exactly one look's cells: 4×4 of the 8×8 scale-1 grid (28 px cells) and, by nearest, 8×8 of
    # the 16×16 scale-2 grid = the budgets 16 and 64. Those cells have probability 1 and every other
    # cell less (sigmoid(5) at most), so both dtypes select them with no tie at the boundary.
    gt[:, :112, :112] = 1
    return gt


@pytest.mark.parametrize("kw", [dict(num_look_close=1, gt_selection_maps="forced"), dict(num_look_close=0)],
                         ids=["forced cells", "low-res only"])
def test_bf16_encoder_agrees_with_float32(monkeypatch, models, kw):
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    monkeypatch.setenv("PS3_ATTENTION", "chunked")
    # The tiny model's sequences are short: chunked attention on them, 8 queries per chunk.
    monkeypatch.setattr(precision, "_CHUNKED_MIN_PAIRS", 0)
    monkeypatch.setattr(precision, "ATTENTION_CHUNK", 8)
    kw = {k: (_forced_cells() if v == "forced" else v) for k, v in kw.items()}
    m32, m16 = models
    x = images()
    with torch.no_grad():  # the inference output has no pooled feature (as upstream's): ask for it
        want, want_pooled = m32.encode_looks_with_pooled(x, **kw)
        got, got_pooled = m16.encode_looks_with_pooled(x.bfloat16(), **kw)
    assert got.last_hidden_state.dtype == got_pooled.dtype == torch.bfloat16
    if want.selection_maps is not None:
        for a, b in zip(want.selection_maps, got.selection_maps):
            assert torch.equal(a.float(), b.float())  # forced: the same cells encoded
    rms = want.last_hidden_state.pow(2).mean().sqrt().item()
    err = (got.last_hidden_state.float() - want.last_hidden_state).abs()
    assert err.mean() <= 2 ** -4 * rms and err.max() <= 2 ** -3 * rms
    torch.testing.assert_close(got_pooled.float(), want_pooled, rtol=0,
                               atol=2 ** -3 * want_pooled.pow(2).mean().sqrt().item())


def _types(out):
    def t(v):
        if torch.is_tensor(v):
            return (v.dtype, tuple(v.shape), v.device.type)
        if isinstance(v, (list, tuple)):
            return [t(x) for x in v]
        return type(v).__name__
    return {name: t(getattr(out, name)) for name in out.__dataclass_fields__}


@pytest.mark.parametrize("kw", [dict(num_look_close=2), dict(num_look_close=1, gt_selection_maps="forced"),
                                dict(output_hidden_states=False)], ids=["looks", "gt maps", "pooled"])
def test_float32_fallback_returns_the_native_types_and_the_float32_values(monkeypatch, models, kw):
    kw = {k: (_forced_cells() if v == "forced" else v) for k, v in kw.items()}
    m32, m16 = models
    x = images().bfloat16()
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")
    with torch.no_grad():
        native = m16(x, **kw)
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "float32")
    with torch.no_grad():
        fallback = m16(x, **kw)
        # The fallback is the float32 computation on the bf16 weights: the same kernels on the
        # same values as a float32 copy of the bf16 model, hence the same result, then rounded.
        upcast = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, dtype="bfloat16").float()
        want = upcast(x.float(), **kw)
    assert _types(fallback) == _types(native)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())  # weights restored
    if want.pooled_output is not None:  # pre-training mode (inference returns none, as upstream)
        torch.testing.assert_close(fallback.pooled_output, want.pooled_output.bfloat16(), rtol=0, atol=0)
    if want.last_hidden_state is not None:
        torch.testing.assert_close(fallback.last_hidden_state, want.last_hidden_state.bfloat16(), rtol=0, atol=0)


def test_fallback_reuses_its_float32_weights_until_they_change(monkeypatch):
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "float32")
    model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, dtype="bfloat16")
    encoder = model.vision_model
    with torch.no_grad():
        model(images(1).bfloat16(), num_look_close=1)
        first = encoder._ps3_float32_weights
        model(images(1).bfloat16(), num_look_close=1)
        assert encoder._ps3_float32_weights is first
        encoder.prior_prompt.add_(1)
        model(images(1).bfloat16(), num_look_close=1)
        assert encoder._ps3_float32_weights is not first


def test_text_tower_falls_back_too(monkeypatch):
    text16 = ps3.PS3TextModel.from_pretrained(MODEL_DIR, dtype="bfloat16")
    ids = torch.randint(1, 999, (2, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "float32")
    with torch.no_grad():
        out = text16(ids)
        want = ps3.PS3TextModel.from_pretrained(MODEL_DIR, dtype="bfloat16").float()(ids)
    assert out.prompt.dtype == torch.bfloat16
    torch.testing.assert_close(out.prompt, want.prompt.bfloat16(), rtol=0, atol=0)


@pytest.mark.slow
def test_cpu_without_bf16_units_is_detected_and_falls_back():
    """oneDNN capped at AVX2 (as on a CPU without AVX-512): no native bf16, and a bf16 call
    returns bf16 computed in float32."""
    code = (
        "import torch, ps3\n"
        "from ps3.encoder.precision import cpu_capability, native_dtype\n"
        "from golden import MODEL_DIR\n"
        "assert not cpu_capability().native_bf16 and not native_dtype(torch.bfloat16)\n"
        "m = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, dtype='bfloat16')\n"
        "with torch.no_grad():\n"
        "    out = m(torch.zeros(1, 3, 224, 224, dtype=torch.bfloat16), num_look_close=1)\n"
        "assert out.last_hidden_state.dtype == torch.bfloat16\n"
        "assert m.vision_model._ps3_float32_weights is not None\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).parent)]))
    env.pop("PS3_CPU_LOW_PRECISION", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
