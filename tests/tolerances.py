"""How closely two computations of the same quantity must agree, stated once for the suite.

Two computations that differ in shape, stride, batch size or thread count (batch vs single image,
a row of a batch tensor vs a standalone call, ragged vs per-image loop, a reused low-res pass vs a
fresh one) may pick different kernels: oneDNN and the BLAS choose their blocking by shape, by
thread count and by the CPU's instruction set (AVX2, AVX-512, AVX-512 BF16/VNNI, AMX), and so sum
in another order. They agree to rounding, not to the bit. ``torch.equal`` is kept only where the
same kernel runs on the same data by construction (a call and its alias, a saved and reloaded
tensor, integer bookkeeping).

float32: one reordered sum changes its result by a few units in the last place (2^-24 ≈ 6e-8
relative); through the fixture's four blocks, softmaxes and layer norms the largest difference
seen between such paths is about 2e-6 relative to the tensor's magnitude. PATH_RTOL / PATH_ATOL
leave a 10x margin over that and are still far below any real error (a wrong token, position or
scale moves values by O(1)).

Selection: top-k over probabilities computed by two paths can disagree where two cells' scores
lie within rounding of each other at the selection boundary. ``assert_same_selection`` accepts
exactly that and nothing else.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

PATH_RTOL = 2e-5
PATH_ATOL = 2e-5
# Probabilities are sigmoids of clamped cosines: their rounding follows the features' (PATH_RTOL),
# so two cells closer than this may swap places at the top-k boundary.
NEAR_TIE = 1e-5


def assert_close_paths(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Values of two computation paths agree to float32 rounding (see the module docstring)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.float(), want.float(), rtol=PATH_RTOL, atol=PATH_ATOL, msg=lambda m: f"{what}: {m}")


def assert_same_selection(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                          probs: Sequence[torch.Tensor] | None = None) -> bool:
    """The per-scale 0/1 maps of two paths select the same cells, except that cells whose
    probabilities (``probs``, one map per scale, same batch) lie within NEAR_TIE of the selection
    boundary may be swapped, one for one. Returns True when the maps are identical (then the
    two paths' high-res features are comparable token by token)."""
    assert len(got) == len(want), f"{len(got)} maps != {len(want)}"
    identical = True
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach().cpu().bool(), b.detach().cpu().bool()
        assert a.shape == b.shape, f"selection_maps[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if torch.equal(a, b):
            continue
        identical = False
        assert probs is not None, f"selection_maps[{i}] differ and no probabilities were given to judge ties"
        assert torch.equal(a.flatten(1).sum(1), b.flatten(1).sum(1)), f"selection_maps[{i}]: counts differ"
        p = probs[i].detach().cpu().float().flatten(1)
        for row, (x, y) in enumerate(zip(a.flatten(1), b.flatten(1))):
            if torch.equal(x, y):
                continue
            chosen, rest = p[row][y], p[row][~y]
            low = chosen.min() if chosen.numel() else torch.tensor(float("inf"))
            high = rest.max() if rest.numel() else torch.tensor(float("-inf"))
            swapped = p[row][x ^ y]
            near = ((swapped - low).abs() <= NEAR_TIE) | ((swapped - high).abs() <= NEAR_TIE)
            assert bool(near.all()), f"selection_maps[{i}] sample {row}: differs beyond a near-tie at the boundary"
    return identical

# bfloat16 against bfloat16 computed another way (upstream's native bf16 kernels against ours,
# which on a CPU without bf16 units compute in float32 and round once): bf16 keeps 8 significant
# bits, so each op's rounding is up to 2^-9 relative and a few blocks of matmuls, softmaxes and
# norms accumulate it. Seen on the C-RADIO fixture: features 1.2 % of the tensor's largest
# magnitude, pooled features 0.7 %, probabilities one bf16 step (2^-8 near 1). The bounds leave
# a 2-3x margin and still catch a wrong token or scale (an O(1) change).
BF16_FEATURE_REL = 2 ** -5
BF16_PROB_ATOL = 2 ** -7


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, what: str = "", prob: bool = False) -> None:
    """Same dtype and shape; values within bf16 rounding (``BF16_PROB_ATOL`` for probabilities,
    else ``BF16_FEATURE_REL`` of the reference's largest magnitude)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = BF16_PROB_ATOL if prob else BF16_FEATURE_REL * max(want.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


# Kernel choices (ps3.encoder.kernels) are timed per process, so two processes may compute the same
# thing with different formulations and differ by rounding. Tests that compare separate processes
# bit for bit (a killed-and-resumed run against an uninterrupted one) give each process this
# environment: every choice forced, the same kernels everywhere.
SAME_KERNELS = {"PS3_CONV_STEM": "conv", "PS3_ATTENTION": "sdpa"}
