"""Selection scores: the matmul form equals the cosine formula of design §3.5, and the 1512 px
ConvNet gives the same features whether it writes into a batch's row or returns a new tensor."""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close_paths
from ps3.encoder.selection_features import (HighresSelectionFeatures, first_slot_probs, highres_features,
                                            prior_and_prompt_probs)


def cosine_formula(feats, highres, prompt, proj):
    """Design §3.5 written out: normalise, multiply, sum; max-pool the fine map; sigmoid."""
    logits = (F.normalize(feats, dim=2) * F.normalize(prompt, dim=-1)[:, None, :, None, None]).sum(2)
    if highres is not None:
        q = proj(prompt).view(prompt.shape[0], feats.shape[1], -1)
        fine = (F.normalize(highres, dim=1).unsqueeze(1) * F.normalize(q, dim=-1)[..., None, None]).sum(2)
        logits = (logits + F.adaptive_max_pool2d(fine, logits.shape[-2:])) / 2
    return torch.sigmoid((logits * 5.0).clamp(-10, 10))[:, :1]


@pytest.mark.parametrize("with_highres", [False, True])
def test_first_slot_probs_equal_the_cosine_formula(with_highres):
    g = torch.Generator().manual_seed(0)
    B, S, C, h, o = 3, 2, 16, 6, 8
    # Features in the encoder's layout: (B, h, w, S, C) in memory, seen as (B, S, C, h, w).
    feats = torch.randn(B, h, h, S, C, generator=g).permute(0, 3, 4, 1, 2)
    highres = torch.randn(B, o, 2 * h, 2 * h, generator=g) if with_highres else None
    proj = torch.nn.Linear(C, o * S)
    prompt = torch.randn(B, C, generator=g)
    with torch.no_grad():
        got = first_slot_probs(feats, highres, prompt, proj)
        want = cosine_formula(feats, highres, prompt, proj)
    assert got.shape == (B, 1, h, h)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # The prior and a prompt scored in one pass give what two separate formulas give.
    prior = torch.randn(C, generator=g)
    with torch.no_grad():
        bottomup, topdown = prior_and_prompt_probs(feats, highres, prior, prompt, proj)
        alone, none = prior_and_prompt_probs(feats, highres, prior, None, proj)
    expected = cosine_formula(feats, highres, prior.expand(B, -1), proj)
    torch.testing.assert_close(bottomup, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(topdown, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, bottomup, atol=1e-6, rtol=1e-5)
    assert none is None


def test_convnet_writes_into_a_row_with_the_same_values():
    torch.manual_seed(0)
    module = HighresSelectionFeatures(hidden=8, out=4, depth=1, kernel=28).eval()
    images = [torch.randn(3, 60, 90), torch.randn(3, 200, 50), torch.randn(3, 1512, 1512)]
    with torch.no_grad():
        stacked = highres_features(module, images)
        alone = torch.cat([highres_features(module, image[None]) for image in images])
        row = torch.full((2, 4, 54, 54), float("nan"))
        module(torch.randn(1, 3, 1512, 1512, generator=torch.Generator().manual_seed(1)), out=row[1:])
    assert stacked.shape == (3, 4, 54, 54)
    assert_close_paths(stacked, alone, "ConvNet rows vs standalone calls")
    assert torch.isnan(row[0]).all() and torch.isfinite(row[1]).all()


def test_convnet_output_keeps_gradients_when_trained():
    module = HighresSelectionFeatures(hidden=8, out=4, depth=1, kernel=28)
    out = torch.empty(2, 4, 2, 2)
    result = module(torch.randn(2, 3, 56, 56), out=out)  # grad enabled: the copying path
    result.sum().backward()
    assert module.out_proj.weight.grad is not None and module.stem[0].weight.grad.abs().sum() > 0
