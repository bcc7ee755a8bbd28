"""PS3 text tower: recorded upstream outputs, published parameter names and count, the design §4
behaviours (masking, pooling, projection, prompt) and input errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from golden import FEATURE_TOL, FIXTURES, MODEL_DIR, assert_close, load_case
from ps3.config import PS3TextConfig
from ps3.hub import load_state_dict
from ps3.text import PS3TextModel, PS3TextOutput, PS3TextTransformer

# The text_config of nvidia/PS3-4K-SigLIP2 (design §1).
SIGLIP2_TEXT = dict(context_length=64, vocab_size=256000, hf_tokenizer_name="timm/ViT-SO400M-14-SigLIP2-378",
                    tokenizer_kwargs={"clean": "canonicalize"}, width=1152, heads=16, layers=27, mlp_ratio=3.7362,
                    no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-06},
                    act_kwargs={"approximate": "tanh"}, output_dim=1152, prompt_proj_dim=1152)


def tiny_config(**overrides) -> PS3TextConfig:
    values = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=2, mlp_ratio=2.0, output_dim=12,
                  prompt_proj_dim=10, pool_type="last", no_causal_mask=True, proj_bias=True,
                  norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"})
    values.update(overrides)
    return PS3TextConfig(**values)


def tiny_model(seed=0, **overrides) -> PS3TextModel:
    torch.manual_seed(seed)
    model = PS3TextModel(tiny_config(**overrides)).eval()
    with torch.no_grad():  # LayerNorm affine params start at 1/0; perturb so they matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(b=3, n=8, vocab=50, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def published_keys(layers: int, proj_bias: bool) -> set[str]:
    """The text_model.* names of design §1, without the prefix."""
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        keys |= {b + "attn.in_proj_weight", b + "attn.in_proj_bias", b + "attn.out_proj.weight",
                 b + "attn.out_proj.bias"}
        for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {b + m + ".weight", b + m + ".bias"}
    keys |= {"text_projection.weight", "text_projection.bias"} if proj_bias else {"text_projection"}
    for m in ("fc1", "norm", "fc2"):
        keys |= {f"prompt_proj.{m}.weight", f"prompt_proj.{m}.bias"}
    return keys


# --- recorded upstream outputs ------------------------------------------------------------------

def test_reproduces_recorded_text_outputs():
    _, t = load_case(FIXTURES / "cases" / "topdown_look2.safetensors")
    model = PS3TextModel.from_pretrained(MODEL_DIR)
    with torch.no_grad():
        out = model(t["input.text_ids"])
    assert isinstance(out, PS3TextOutput)
    assert_close(out.pooled_output, t["expected.text.pooled_output"], "text.pooled_output", FEATURE_TOL)
    assert_close(out.prompt, t["expected.text.prompt"], "text.prompt", FEATURE_TOL)


def test_loads_exactly_the_text_weights_of_the_joint_checkpoint():
    model = PS3TextModel.from_pretrained(MODEL_DIR)
    state = load_state_dict(MODEL_DIR)
    own = model.state_dict()
    assert set(own) == {k for k in state if k.startswith("text_model.")}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_save_and_reload_round_trip(tmp_path):
    model = PS3TextModel.from_pretrained(MODEL_DIR)
    model.save_pretrained(tmp_path)
    saved = load_state_dict(tmp_path)
    assert all(k.startswith("text_model.") for k in saved)
    again = PS3TextModel.from_pretrained(tmp_path)
    x = ids(2, 16, vocab=1000)
    with torch.no_grad():
        assert torch.equal(model(x).prompt, again(x).prompt)
    assert again.config == model.config


def test_from_pretrained_dtype():
    model = PS3TextModel.from_pretrained(MODEL_DIR, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = PS3TextModel.from_pretrained(MODEL_DIR)
    x = ids(2, 16, vocab=1000)
    with torch.no_grad():
        got, want = model(x).prompt.float(), ref(x).prompt
    assert torch.allclose(got, want, atol=0.1, rtol=0.1)


# --- names and sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("proj_bias", [True, False])
def test_state_dict_keys_are_the_published_ones(proj_bias):
    model = PS3TextModel(tiny_config(proj_bias=proj_bias))
    keys = set(model.state_dict())
    assert keys == {"text_model." + k for k in published_keys(2, proj_bias)}
    p = model.text_model.text_projection
    if proj_bias:
        assert p.weight.shape == (12, 16)
    else:
        assert p.shape == (16, 12)  # (W, out), applied as x @ P
    block = model.text_model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.shape == (48, 16)
    assert block.mlp.c_fc.weight.shape == (32, 16)


def test_siglip2_text_tower_size_and_names_on_meta():
    with torch.device("meta"):
        tower = PS3TextTransformer(PS3TextConfig(**SIGLIP2_TEXT))
    assert sum(p.numel() for p in tower.parameters()) == 710_441_712
    assert set(tower.state_dict()) == published_keys(27, proj_bias=True)
    assert tower.transformer.resblocks[0].mlp.c_fc.weight.shape == (4304, 1152)
    assert tower.positional_embedding.shape == (64, 1152)
    assert tower.token_embedding.weight.shape == (256000, 1152)


def test_norm_eps_and_activation_follow_the_config():
    tower = tiny_model(norm_kwargs={"eps": 1e-6}).text_model
    assert tower.ln_final.eps == 1e-6 and tower.transformer.resblocks[1].ln_2.eps == 1e-6
    assert tower.prompt_proj.norm.eps == 1e-5
    assert PS3TextTransformer(tiny_config(norm_kwargs={})).ln_final.eps == 1e-5
    x = ids()
    tanh, exact = tiny_model(act_kwargs={"approximate": "tanh"}), tiny_model(act_kwargs={})
    with torch.no_grad():
        assert not torch.allclose(tanh(x).pooled_output, exact(x).pooled_output, atol=1e-7, rtol=0)


# --- behaviour against an independent reference ----------------------------------------------------

def reference_forward(tower: PS3TextTransformer, token_ids: torch.Tensor, causal: bool, approximate: str):
    """design §4 written with torch's own nn.MultiheadAttention holding the same weights."""
    n = token_ids.shape[1]
    x = tower.token_embedding.weight[token_ids] + tower.positional_embedding[:n]
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    for blk in tower.transformer.resblocks:
        width = x.shape[-1]
        mha = nn.MultiheadAttention(width, tower.transformer.resblocks[0].attn.heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": blk.attn.in_proj_weight, "in_proj_bias": blk.attn.in_proj_bias,
                             "out_proj.weight": blk.attn.out_proj.weight, "out_proj.bias": blk.attn.out_proj.bias})
        h = F.layer_norm(x, (width,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h), approximate=approximate))
    x = F.layer_norm(x, (x.shape[-1],), tower.ln_final.weight, tower.ln_final.bias, tower.ln_final.eps)
    return x


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["last", "first", "argmax"])
def test_matches_reference_for_masks_and_pools(causal, pool):
    model = tiny_model(no_causal_mask=not causal, pool_type=pool, act_kwargs={})
    tower = model.text_model
    x = ids(3, 6)
    with torch.no_grad():
        out = model(x)
        hidden = reference_forward(tower, x, causal, "none")
        index = {"last": torch.full((3,), 5), "first": torch.zeros(3, dtype=torch.long), "argmax": x.argmax(-1)}[pool]
        pooled = tower.text_projection(hidden[torch.arange(3), index])
        prompt = tower.prompt_proj.fc2(F.layer_norm(F.gelu(tower.prompt_proj.fc1(F.normalize(pooled, dim=-1))),
                                                    (10,), tower.prompt_proj.norm.weight,
                                                    tower.prompt_proj.norm.bias, 1e-5))
    assert torch.allclose(out.last_hidden_state, hidden, atol=1e-5)
    assert torch.allclose(out.pooled_output, pooled, atol=1e-5)
    assert torch.allclose(out.prompt, prompt, atol=1e-5)
    assert out.pooled_output.shape == (3, 12) and out.prompt.shape == (3, 10)


def test_causal_mask_hides_later_tokens_and_no_mask_does_not():
    x = ids(1, 8)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 50
    for causal in (True, False):
        model = tiny_model(no_causal_mask=not causal)
        with torch.no_grad():
            a, b = model(x).last_hidden_state, model(y).last_hidden_state
        assert torch.equal(a[:, :-1], b[:, :-1]) == causal


def test_matrix_projection_without_bias():
    model = tiny_model(proj_bias=False)
    x = ids()
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out.pooled_output, out.last_hidden_state[:, -1] @ model.text_model.text_projection,
                          atol=1e-6)


def test_batch_rows_are_independent_and_short_inputs_work():
    model = tiny_model()
    x = ids(3, 5)
    with torch.no_grad():
        both = model(x).prompt
        one = model(x[1:2]).prompt
    assert torch.allclose(both[1:2], one, atol=1e-6)
    assert both.shape == (3, 10)


def test_int32_ids_are_accepted():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).prompt, model(x.int()).prompt)


def test_gradients_flow_to_every_parameter():
    model = tiny_model().train()
    model(ids()).prompt.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error", [
    ([[1, 2, 3]], TypeError),
    (torch.rand(2, 4), TypeError),
    (torch.ones(2, 4, dtype=torch.bool), TypeError),
    (torch.ones(4, dtype=torch.long), ValueError),
    (torch.ones(1, 2, 4, dtype=torch.long), ValueError),
    (torch.ones(0, 4, dtype=torch.long), ValueError),
    (torch.ones(2, 0, dtype=torch.long), ValueError),
    (torch.ones(2, 9, dtype=torch.long), ValueError),  # context_length is 8
    (torch.tensor([[1, 50]]), ValueError),  # vocab_size is 50
    (torch.tensor([[-1, 3]]), ValueError),
])
def test_bad_token_ids_raise_clear_errors(bad, error):
    model = tiny_model()
    with pytest.raises(error, match="token_ids"):
        model(bad)


@pytest.mark.parametrize("overrides, match", [
    (dict(embed_cls=True), "embed_cls"),
    (dict(pool_type="eos"), "pool_type"),
    (dict(width=15), "divisible"),
    (dict(act_kwargs={"approximate": "sigmoid"}), "approximate"),
    (dict(ls_init_value=0.1), "ls_init_value"),
])
def test_unsupported_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        PS3TextModel(tiny_config(**overrides))


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="config"):
        PS3TextModel("not a config")
    assert PS3TextModel(tiny_config().to_dict()).config == tiny_config()
