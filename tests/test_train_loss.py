"""Tests for the pre-training losses (design §5): SigLIP ring loss and box supervision."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ps3.train.loss import (
    LOGIT_BIAS_INIT,
    LOGIT_SCALE_INIT,
    PS3PretrainLoss,
    SigLipLoss,
    box_selection_loss,
    ps3_pretrain_loss,
    siglip_loss,
)
from tolerances import SAME_KERNELS

WORKER = Path(__file__).with_name("_dist_loss_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("_dist_loss_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ SigLIP


def _siglip_by_loops(img: torch.Tensor, txt: torch.Tensor, log_scale: float, bias: float) -> float:
    """The loss written out pair by pair with Python floats."""
    scale = math.exp(log_scale)
    norm = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    imgs = [norm(row) for row in img.tolist()]
    txts = [norm(row) for row in txt.tolist()]
    total = 0.0
    for i, a in enumerate(imgs):
        for j, b in enumerate(txts):
            logit = scale * sum(x * y for x, y in zip(a, b)) + bias
            label = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    return total / len(imgs)


@pytest.mark.parametrize("log_scale,bias", [(LOGIT_SCALE_INIT, LOGIT_BIAS_INIT), (math.log(3.0), -0.7)])
def test_siglip_matches_pairwise_loops(log_scale, bias):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 3, generator=g, dtype=torch.float64)
    txt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    expected = _siglip_by_loops(img, txt, log_scale, bias)

    got = siglip_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64), bias, distributed=False)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Python-float parameters and pre-normalised features with normalize=False agree.
    got_pre = siglip_loss(
        F.normalize(img, dim=-1), F.normalize(txt, dim=-1), log_scale, bias, normalize=False
    )
    assert got_pre.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    module = SigLipLoss(distributed=False)
    assert module(img, txt, log_scale, bias).item() == pytest.approx(expected, rel=1e-12)


def test_siglip_gradients_reach_logit_parameters_and_features():
    img = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(LOGIT_SCALE_INIT, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS_INIT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s, c: siglip_loss(a, b, s, c), (img, txt, scale, bias))


def test_siglip_rejects_bad_inputs():
    with pytest.raises(ValueError, match="text_features"):
        siglip_loss(torch.randn(4, 3), torch.randn(3, 3), 0.0, 0.0)
    with pytest.raises(ValueError, match="image_features"):
        siglip_loss(torch.randn(4), torch.randn(4), 0.0, 0.0)
    with pytest.raises(ValueError, match="distributed=True"):
        siglip_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0, 0.0, distributed=True)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ring_loss_matches_one_process(tmp_path, world):
    """Real torchrun (gloo, CPU): DDP-averaged gradients equal the one-process gradients."""
    env = {**SAME_KERNELS, **os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", str(WORKER), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    worker = _load_worker()
    tower, images, texts = worker.build_problem()
    img_f, txt_f = tower(images, texts)
    img_f.retain_grad()
    txt_f.retain_grad()
    reference = siglip_loss(img_f, txt_f, tower.logit_scale, tower.logit_bias, distributed=False)
    reference.backward()
    local = worker.GLOBAL_BATCH // world
    tol = dict(rtol=1e-5, atol=1e-5)

    # Each rank's loss is its images' rows against all texts, over its local batch size.
    logits = tower.logit_scale.exp() * F.normalize(img_f, dim=-1) @ F.normalize(txt_f, dim=-1).T
    logits = logits + tower.logit_bias
    labels = 2 * torch.eye(worker.GLOBAL_BATCH, dtype=logits.dtype) - 1
    per_row = -F.logsigmoid(labels * logits).sum(dim=1)
    for r, out in enumerate(ranks):
        rows = slice(r * local, (r + 1) * local)
        torch.testing.assert_close(out["loss"], per_row[rows].sum().detach() / local, **tol)
        # Without the exchanged negatives the value would differ clearly: the check has teeth.
        own_only = siglip_loss(img_f[rows], txt_f[rows], tower.logit_scale, tower.logit_bias)
        assert abs(out["loss"].item() - own_only.item()) > 1e-2
        # Feature gradients are those of Σ_r L_r = world · reference.
        torch.testing.assert_close(out["image_features_grad"], world * img_f.grad[rows], **tol)
        torch.testing.assert_close(out["text_features_grad"], world * txt_f.grad[rows], **tol)
        # DDP averages the parameter gradients: equal to the one-process gradients.
        for name, param in tower.named_parameters():
            torch.testing.assert_close(out["param_grads"][name], param.grad, **tol)
    mean_loss = torch.stack([out["loss"] for out in ranks]).mean()
    torch.testing.assert_close(mean_loss, reference.detach(), **tol)


# ---------------------------------------------------------------------------------- box loss


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_box_loss_by_hand():
    # One sample, gt 4x4 with a single lit pixel at (row 1, col 2).
    gt = torch.zeros(1, 4, 4)
    gt[0, 1, 2] = 1
    # Scale A: 2x2 — area-resize gives 0.25 in cell (0, 1) → target [[0, 1], [0, 0]].
    probs_a = torch.tensor([[[0.2, 0.7], [0.4, 0.9]]], dtype=torch.float64)
    # Scale B: 1x2 — cells average rows 0-3 over columns 0-1 / 2-3 → target [[0, 1]].
    probs_b = torch.tensor([[[0.3, 0.6]]], dtype=torch.float64)
    expected_a = (_bce(0.2, 0) + _bce(0.7, 1) + _bce(0.4, 0) + _bce(0.9, 0)) / 4
    expected_b = (_bce(0.3, 0) + _bce(0.6, 1)) / 2
    got = box_selection_loss([probs_a, probs_b], gt)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx((expected_a + expected_b) / 2, rel=1e-6)


def test_box_loss_excludes_global_captions():
    g = torch.Generator().manual_seed(3)
    gt = torch.zeros(3, 8, 8)
    gt[0, :3, :5] = 1
    gt[1, 4:, 2:] = 1
    gt[2] = 1  # global caption: whole image
    probs = [torch.rand(3, 4, 4, generator=g).requires_grad_(), torch.rand(3, 8, 8, generator=g)]
    is_global = torch.tensor([[False], [True], [False]])

    got = box_selection_loss(probs, gt, is_global)
    keep = [0, 2]
    targets = [(F.interpolate(gt[keep, None], p.shape[-2:], mode="area")[:, 0] > 0).float() for p in probs]
    expected = torch.stack([F.binary_cross_entropy(p[keep], t) for p, t in zip(probs, targets)]).mean()
    torch.testing.assert_close(got, expected)

    got.backward()
    assert probs[0].grad[1].abs().sum() == 0  # the global sample gets no gradient
    assert probs[0].grad[0].abs().sum() > 0
    # Changing the global sample's probabilities leaves the loss unchanged.
    other = [p.detach().clone() for p in probs]
    other[0][1] = 1 - other[0][1]
    torch.testing.assert_close(box_selection_loss(other, gt, is_global.flatten()), got.detach())


def test_box_loss_all_global_is_zero_with_graph():
    probs = [torch.rand(2, 3, 3, requires_grad=True)]
    got = box_selection_loss(probs, torch.ones(2, 6, 6), torch.tensor([True, True]))
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert torch.equal(probs[0].grad, torch.zeros(2, 3, 3))


def test_box_loss_clamps_saturated_probabilities():
    probs = [torch.tensor([[[0.0, 1.0]]], requires_grad=True)]
    got = box_selection_loss(probs, torch.tensor([[[1.0, 0.0]]]))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_box_loss_under_autocast_is_float32():
    probs = [torch.rand(2, 4, 4).to(torch.bfloat16).requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = box_selection_loss(probs, torch.ones(2, 8, 8))
    assert got.dtype == torch.float32
    got.backward()
    assert probs[0].grad is not None and probs[0].grad.dtype == torch.bfloat16


def test_box_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="selection_probs"):
        box_selection_loss([], torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"selection_probs\[0\]"):
        box_selection_loss([torch.rand(3, 2, 2)], torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="gt_selection_maps"):
        box_selection_loss([torch.rand(2, 2, 2)], torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="is_global_text"):
        box_selection_loss([torch.rand(2, 2, 2)], torch.ones(2, 4, 4), torch.tensor([True]))


# ---------------------------------------------------------------------------- combined loss


def test_ps3_pretrain_loss_combines_terms():
    g = torch.Generator().manual_seed(7)
    img, txt = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    gt = torch.zeros(3, 8, 8)
    gt[:, 2:5, 1:6] = 1
    bottomup = [torch.rand(3, 2, 2, generator=g), torch.rand(3, 4, 4, generator=g)]
    topdown = [torch.rand(3, 2, 2, generator=g), torch.rand(3, 4, 4, generator=g)]
    is_global = torch.tensor([False, True, False])
    scale, bias = torch.tensor(LOGIT_SCALE_INIT), torch.tensor(LOGIT_BIAS_INIT)

    out = ps3_pretrain_loss(img, txt, scale, bias, bottomup, topdown, gt, is_global, 0.5, 2.0)
    assert isinstance(out, PS3PretrainLoss)
    torch.testing.assert_close(out.contrastive, siglip_loss(img, txt, scale, bias))
    torch.testing.assert_close(out.bottomup, box_selection_loss(bottomup, gt, is_global))
    torch.testing.assert_close(out.topdown, box_selection_loss(topdown, gt, is_global))
    torch.testing.assert_close(out.total, out.contrastive + 0.5 * out.bottomup + 2.0 * out.topdown)
    assert set(out.as_dict()) == {"total", "contrastive", "bottomup", "topdown"}

    no_topdown = ps3_pretrain_loss(img, txt, scale, bias, bottomup, None, gt, is_global)
    assert no_topdown.topdown.item() == 0.0
    torch.testing.assert_close(no_topdown.total, out.contrastive + out.bottomup)

    with pytest.raises(ValueError, match="gt_selection_maps"):
        ps3_pretrain_loss(img, txt, scale, bias, bottomup, None, None, is_global)
