"""ps3.strategies properties over random image sizes: grids within their limits, counts that add
up, nothing upscaled where the original forbids it, and encode's rows equal to the plan's count
for every size (a cheap average-pool backbone: the geometry is under test, not the features)."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ps3.strategies as S

SIZES = st.tuples(st.integers(1, 12000), st.integers(1, 12000)).filter(lambda hw: max(hw) / min(hw) <= 200)
PLAN = settings(max_examples=150, deadline=None, derandomize=True)


def pool14(x):
    """(B, 3, h, w) → (B, h/14 · w/14, 3): the patch means."""
    return F.avg_pool2d(x, 14).flatten(2).transpose(1, 2)


@PLAN
@given(SIZES, st.integers(9, 30))
def test_dynamic_s2_grid_within_limits(hw, max_tiles):
    p = S.plan("dynamic_s2", *hw, max_tiles=max_tiles)
    rows, cols = p.grid
    assert 9 <= rows * cols <= max_tiles
    assert p.num_tokens == 256 * rows * cols and p.backbone_passes == 1 + 4 + rows * cols
    # no allowed grid has a ratio strictly closer to the image's
    best = min(abs(hw[1] / hw[0] - c / r) for c in range(1, 31) for r in range(1, 31) if 9 <= c * r <= max_tiles)
    assert abs(hw[1] / hw[0] - cols / rows) == best


@PLAN
@given(SIZES, st.integers(1, 4), st.integers(0, 20), st.booleans())
def test_internvl_tiles_within_limits(hw, min_num, extra, thumbnail):
    p = S.plan("internvl_tiling", *hw, min_num=min_num, max_num=min_num + extra, use_thumbnail=thumbnail)
    tiles = p.grid[0] * p.grid[1]
    assert min_num <= tiles <= min_num + extra
    assert p.backbone_passes == tiles + (1 if thumbnail and tiles > 1 else 0) == p.num_tokens // 256


@PLAN
@given(SIZES)
def test_anyres_unpads_within_the_canvas(hw):
    p = S.plan("anyres", *hw)
    (rows, cols), (kh, kw) = p.grid, p.segments[1].grid
    assert (cols * 336, rows * 336) in S.get("anyres").defaults["grid_pinpoints"]
    # One side is kept whole; the other may shrink to nothing for a sliver (a 1 × 25 image: int(1 · 24/25)
    # = 0 rows, as the original's unpad_image gives).
    assert 0 <= kh <= rows * 24 and 0 <= kw <= cols * 24 and (kh == rows * 24 or kw == cols * 24)
    assert p.num_tokens == 576 + kh * (kw + 1)
    new_h, new_w = p.views[1].resize
    assert new_h <= rows * 336 and new_w <= cols * 336  # the fitted image never overflows the canvas


@PLAN
@given(SIZES, st.integers(4, 5000))
def test_qwen2_vl_within_pixels_and_never_upscaled(hw, tokens):
    max_pixels = tokens * 784
    p = S.plan("qwen2_vl", *hw, max_pixels=max_pixels)
    h, w = p.views[0].resize
    rounded = max(28, round(hw[0] / 28) * 28), max(28, round(hw[1] / 28) * 28)
    assert h % 28 == 0 and w % 28 == 0 and p.num_tokens == (h // 28) * (w // 28)
    if min(hw) >= 28 and rounded[0] * rounded[1] >= 3136:  # min_pixels does not apply
        assert h <= rounded[0] and w <= rounded[1]  # never scaled up beyond the rounding
        # the cap holds unless a side stopped at one factor (the original's guard: 28 × 175 px at
        # 4 tokens becomes 28 × 140)
        assert h * w <= max_pixels or min(h, w) == 28
    # A sliver under 28 px is not covered: with that guard its long side can even grow
    # (1 × 127 px → 28 × 616 at 4 tokens), as the original's does.
    else:  # scaled up to min_pixels (even past max_pixels, as the original does for slivers)
        assert h * w >= 3136


@PLAN
@given(SIZES, st.integers(1, 60))
def test_ixc_hd_uses_the_most_columns_hd_num_allows(hw, hd_num):
    h, w = hw
    ratio = max(hw) / min(hw)
    try:
        p = S.plan("ixc_hd", h, w, hd_num=hd_num)
    except ValueError as err:  # only when the short side would vanish
        assert "hd_num" in str(err) and int(hd_num * 336 / ratio) == 0
        return
    rows, cols = p.grid
    c = rows if w < h else cols
    assert c * math.ceil(c / ratio) <= hd_num < (c + 1) * math.ceil((c + 1) / ratio)
    assert rows * cols <= hd_num or rows * cols <= c * math.ceil(c / ratio) + c  # padding adds at most one line
    assert p.num_tokens == 157 + 12 * rows * (12 * cols + 1)


@PLAN
@given(SIZES, st.sampled_from(["s2", "dynamic_s2", "internvl_tiling", "anyres", "qwen2_vl", "ixc_hd", "ps3"]))
def test_counts_add_up(hw, name):
    p = S.plan(name, *hw)
    assert p.num_tokens == sum(s.rows for s in p.segments) > 0 and p.backbone_passes > 0
    for seg in p.segments:  # every grid spans a part of the image (padding may take it past the edge)
        x0, y0, x1, y1 = seg.box
        assert seg.kind == "separator" or (x0 < min(x1, hw[1]) and max(x0, 0) < x1 and y0 < min(y1, hw[0])
                                           and max(y0, 0) < y1)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.tuples(st.integers(1, 400), st.integers(1, 400)))
def test_encode_rows_equal_the_plan_for_every_size(hw):
    image = torch.rand(3, *hw)
    for name in ("s2", "dynamic_s2", "internvl_tiling", "anyres", "qwen2_vl", "ixc_hd"):
        p = S.plan(name, *hw)
        rows, layout = S.encode(p, pool14, image)
        assert rows.shape[0] == p.num_tokens, (name, hw)
