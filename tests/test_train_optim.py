"""Training settings stated by the model (weight-decay exemptions, selection modules, freezing,
gradient checkpointing) and the optimizer built from them: groups, clipping, schedule."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ps3 import PS3Config, PS3Model
from ps3.train.optim import build_optimizer, build_scheduler, clip_grad_norm, decay_exempt, lr_multiplier

def _micro_model(seed: int = 0) -> PS3Model:
    """The micro model of the loop tests (its config lives in the training worker)."""
    spec = importlib.util.spec_from_file_location("_train_worker", Path(__file__).parent / "_train_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    config = PS3Config(**worker.MICRO_CONFIG)
    config.text_config.vocab_size = worker.VOCAB
    torch.manual_seed(seed)
    return PS3Model(config)


def test_no_weight_decay_names_tables_not_matrices():
    model = _micro_model()
    named = model.no_weight_decay()
    assert {"vision_model.trunk.pos_embed", "vision_model.trunk.attn_pool.latent", "vision_model.prior_prompt",
            "text_model.token_embedding.weight", "text_model.positional_embedding", "logit_scale",
            "logit_bias"} <= named
    assert any(".pos_emb_residual" in name for name in named)
    assert all(name in dict(model.named_parameters()) for name in named)
    assert "vision_model.trunk.blocks.0.attn.qkv.weight" not in named
    exempt = decay_exempt(model)
    assert named <= exempt
    assert {"vision_model.trunk.blocks.0.norm1.weight", "vision_model.trunk.blocks.0.attn.qkv.bias"} <= exempt
    assert "vision_model.trunk.blocks.0.attn.qkv.weight" not in exempt


def test_selection_parameters_and_locking():
    model = _micro_model()
    selection = model.selection_parameter_names()
    assert "text_model.prompt_proj.fc1.weight" in selection and "vision_model.prior_prompt" in selection
    assert any(n.startswith("vision_model.selection_feature_proj.") for n in selection)
    assert not any(n.startswith(("vision_model.trunk.", "text_model.token_embedding")) for n in selection)
    model.lock_all_but_selection()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(selection)
    optimizer = build_optimizer(model, lr=1e-3, wd=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(selection)


def test_grad_checkpointing_gives_the_same_gradients():
    model = _micro_model()
    trunk = model.vision_model.trunk
    x = torch.randn(2, 16, trunk.embed_dim)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        assert trunk.grad_checkpointing is enable
        model.zero_grad()
        out, _, _ = trunk.forward_blocks(x)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    model.set_grad_checkpointing(False)
    assert trunk.grad_checkpointing is False


def test_optimizer_groups_follow_the_model():
    model = _micro_model()
    optimizer = build_optimizer(model, lr=1e-3, wd=0.1, selection_lr=3e-3)
    assert len(optimizer.param_groups) == 4
    names = {id(p): n for n, p in model.named_parameters()}
    selection, exempt = set(model.selection_parameter_names()), decay_exempt(model)
    seen = set()
    for group in optimizer.param_groups:
        group_names = {names[id(p)] for p in group["params"]}
        seen |= group_names
        assert all((n in selection) == (group["lr"] == 3e-3) for n in group_names)
        assert all((n in exempt) == (group["weight_decay"] == 0.0) for n in group_names)
    assert seen == set(names.values())
    # Without a selection learning rate, one rate for all: two groups (decayed or not).
    assert {g["lr"] for g in build_optimizer(model, lr=1e-3, wd=0.1).param_groups} == {1e-3}
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3, wd=0.1)


def test_clip_grad_norm_returns_the_norm_before_clipping():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = clip_grad_norm([a, b], 1.0)
    assert float(norm) == pytest.approx((27 + 64) ** 0.5)
    total = torch.linalg.vector_norm(torch.cat([a.grad, b.grad]))
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    assert [lr_multiplier(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(8, 4, 12) == pytest.approx(0.5)

    def rates(warmup: int, total: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = build_scheduler(optimizer, warmup=warmup, total=total)
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs + [optimizer.param_groups[0]["lr"]]

    assert rates(2, 6) == pytest.approx([1.0, 2.0, 2.0, 1.0 + 2 ** -0.5, 1.0, 1.0 - 2 ** -0.5, 0.0])
    cut = rates(20, 10)  # a warmup longer than the run is cut to the run
    assert cut[0] == pytest.approx(0.2) and cut[9] == pytest.approx(2.0)
