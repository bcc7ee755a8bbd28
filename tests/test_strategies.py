"""ps3.strategies: hand-computed plans per strategy, encode's rows against the plan, bad parameters.

Sizes are (height, width). Expectations are worked out by hand from each original's rules (see
the strategy modules' docstrings for the code read); the worked example is a 4000 × 3000
(width × height) photo.
"""
import math

import pytest
import torch

import ps3.strategies as S
from ps3.registry import SCALES_1P5K, SCALES_4K, bench_vision_config
from ps3.mllm import count_llm_tokens
from ps3.strategies.ps3 import params_for

PATCH = 14


class PatchEmbed(torch.nn.Module):
    """A cheap backbone: (B, 3, h, w) → (B, h/14 · w/14, 4) tokens, row-major (any h, w)."""

    def __init__(self, width=4):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, width, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def backbone():
    return PatchEmbed().eval()


# ------------------------------------------------------------------------------------------ worked example
def test_worked_example_4000x3000():
    h, w = 3000, 4000
    s2 = S.plan("s2", h, w)
    assert (s2.num_tokens, s2.backbone_passes, s2.num_text_tokens) == (576, 14, 0)
    d = S.plan("dynamic_s2", h, w)
    assert (d.grid, d.num_tokens, d.backbone_passes, d.num_text_tokens) == ((3, 4), 3072, 17, 1)  # 4 cols × 3 rows
    iv = S.plan("internvl_tiling", h, w)
    assert [v.name for v in iv.views] == ["tiles", "thumbnail"] and iv.views[0].passes == 12
    assert (iv.num_tokens, iv.backbone_passes, iv.num_text_tokens) == (3328, 13, 2)
    a = S.plan("anyres", h, w)
    assert a.views[1].window[2:] == (672, 672) and a.segments[1].grid == (36, 48)
    assert (a.num_tokens, a.backbone_passes) == (576 + 1728 + 36, 5)
    q = S.plan("qwen2_vl", h, w)
    assert q.views[0].resize == (840, 1148) and (q.num_tokens, q.num_text_tokens, q.backbone_passes) == (1230, 2, 1)
    x = S.plan("ixc_hd", h, w)
    assert (x.grid, x.num_tokens, x.backbone_passes) == ((4, 5), 3085, 21)  # 5 columns × 4 rows of tiles


# ------------------------------------------------------------------------------------------ per strategy
def test_s2_crops_the_centre_square_and_always_gives_576():
    p = S.plan("s2", 500, 4000)  # 8:1: shortest edge → 1008, long side 8064, centre 1008 kept
    crop = p.views[0]
    assert crop.resize == (1008, 8064) and crop.window == (0, 3528, 1008, 1008) and not crop.encoded
    assert p.segments[0].box == pytest.approx((1750.0, 0.0, 2250.0, 500.0))
    assert [v.grid for v in p.views[1:]] == [(1, 1), (2, 2), (3, 3)]
    assert (p.num_tokens, p.backbone_passes) == (576, 14)
    assert S.plan("s2", 10, 10, resize_output_to_idx=2).num_tokens == 72 * 72


@pytest.mark.parametrize("hw, grid, tokens, passes", [
    ((500, 4000), (1, 9), 9 * 256, 14),     # 8:1 → 9×1 (ratio 9 is the closest with ≥ 9 tiles)
    ((4000, 500), (9, 1), 9 * 256, 14),
    ((10, 10), (3, 3), 9 * 256, 14),        # tiny: the 3×3 square, never fewer than 9 tiles
    ((20, 30), (3, 4), 12 * 256, 17),       # 3:2 → 4/3 closest among 9..12 tiles
])
def test_dynamic_s2(hw, grid, tokens, passes):
    p = S.plan("dynamic_s2", *hw)
    assert (p.grid, p.num_tokens, p.backbone_passes, p.num_text_tokens) == (grid, tokens, passes, 1)
    assert [v.resize for v in p.views[:2]] == [(448, 448), (896, 896)]


def test_dynamic_s2_tie_goes_to_the_larger_grid_only_for_large_images():
    # Square images tie between 3×3 and 4×4 with max_tiles 16: 4×4 only when area > ½·448²·16.
    assert S.plan("dynamic_s2", 4000, 4000, max_tiles=16).grid == (4, 4)
    assert S.plan("dynamic_s2", 1000, 1000, max_tiles=16).grid == (3, 3)


@pytest.mark.parametrize("hw, grid, tokens, passes", [
    ((500, 4000), (1, 8), 9 * 256, 9),      # 8 tiles + thumbnail
    ((4000, 500), (8, 1), 9 * 256, 9),
    ((10, 10), (1, 1), 256, 1),             # one tile, so no thumbnail
    ((4000, 4000), (3, 3), 10 * 256, 10),   # tie 1×1/2×2/3×3: large image takes 3×3
])
def test_internvl_tiling(hw, grid, tokens, passes):
    p = S.plan("internvl_tiling", *hw)
    assert (p.grid, p.num_tokens, p.backbone_passes, p.num_text_tokens) == (grid, tokens, passes, 2)


def test_internvl_training_setting_max_num_6():
    assert S.plan("internvl_tiling", 3000, 4000, max_num=6).grid == (2, 3)  # 3:2 is closest within 6 tiles


@pytest.mark.parametrize("hw, pinpoint, kept, tokens", [
    # 8:1 → 1008×336 canvas, 24×72 features; unpad keeps int(500·72/4000) = 9 rows + ⌊15/2⌋ twice → 10
    ((500, 4000), (1008, 336), (10, 72), 576 + 10 * 73),
    ((4000, 500), (336, 1008), (72, 10), 576 + 72 * 11),
    # tiny: every pinpoint shows all 100 px; 336×672 and 672×336 waste least, the first listed wins
    ((10, 10), (336, 672), (24, 24), 576 + 24 * 25),
])
def test_anyres(hw, pinpoint, kept, tokens):
    p = S.plan("anyres", *hw)
    assert p.views[1].window[2:] == (pinpoint[1], pinpoint[0])
    assert p.segments[1].grid == kept and p.num_tokens == tokens
    assert p.backbone_passes == 1 + (pinpoint[0] // 336) * (pinpoint[1] // 336)


def test_anyres_pinpoint_range():
    p = S.plan("anyres", 3000, 4000, grid_pinpoints="(1x1),...,(3x3)")
    assert p.grid == (3, 3) and p.segments[1].grid == (54, 72)  # 1008² canvas; int(3000·72/4000) = 54 rows


@pytest.mark.parametrize("hw, resized, tokens", [
    ((500, 4000), (336, 2828), 12 * 101),   # 504×4004 too many: β = √(2e6/1003520), floor
    ((4000, 500), (2828, 336), 101 * 12),
    ((20, 30), (56, 84), 6),                # 28×28 below min_pixels: β = √(3136/600), ceil
    ((70, 70), (56, 56), 4),                # 70/28 = 2.5 rounds half to even: 2
])
def test_qwen2_vl(hw, resized, tokens):
    p = S.plan("qwen2_vl", *hw)
    assert p.views[0].resize == resized and p.num_tokens == tokens and p.backbone_passes == 1


@pytest.mark.parametrize("hw, grid, tokens", [
    ((500, 4000), (2, 12), 157 + 24 * 145),  # ratio 8: 12·⌈12/8⌉ = 24 ≤ 25; 4032×504 padded to 672
    ((4000, 500), (12, 2), 157 + 144 * 25),  # the portrait: same transform, transposed
    ((10, 10), (5, 5), 157 + 60 * 61),       # square: 5·5 ≤ 25, upscaled to 1680²
])
def test_ixc_hd(hw, grid, tokens):
    p = S.plan("ixc_hd", *hw)
    assert (p.grid, p.num_tokens, p.backbone_passes) == (grid, tokens, grid[0] * grid[1] + 1)


def test_ixc_hd_pads_white_and_centres():
    tiles = S.plan("ixc_hd", 500, 4000).views[0]
    assert tiles.resize == (504, 4032) and tiles.window == (-84, 0, 672, 4032) and tiles.fill == 1.0


def _tiny_ps3_config(scales=SCALES_4K):
    cfg = bench_vision_config("cpu", scales, width=64, depth=1)
    cfg.highres_selection_feature = False
    return cfg


@pytest.mark.parametrize("hw, kw", [((3000, 4000), {}), ((500, 4000), {"num_looks": "all"}),
                                    ((4000, 500), {"only_select_first_n_scale": 2}),
                                    ((3000, 4000), {"budgets": [40, 400, 1600], "k": 1})])
def test_ps3_counts_as_count_llm_tokens(hw, kw):
    cfg = _tiny_ps3_config()
    kw = {"budgets": (85, 341, 2134), "num_looks": 1, **kw}  # the model's own budgets by default
    p = S.plan("ps3", *hw, **kw)
    core = {"budgets": "max_select_num_each_scale", "num_looks": "num_look_close"}  # the core's option names
    count = count_llm_tokens(cfg, 3780, 3780, **{core.get(k, k): v for k, v in kw.items()})  # squashed: 3780²
    assert p.num_tokens == count.total
    assert p.backbone_passes == 1 + count.num_looks


def test_ps3_default_one_look_at_4k():
    p = S.plan("ps3", 3000, 4000)
    # 27×27 low-res → 14×14 merged; 85/341/2134 cells → 21/85/533 blocks of 2×2
    assert [s.rows for s in p.segments] == [196, 21, 85, 533] and p.num_tokens == 835


# ------------------------------------------------------------------------------------------ encode
SIZES = [(3000, 4000), (500, 4000), (4000, 500), (10, 10), (20, 30)]


@pytest.mark.parametrize("name", ["s2", "dynamic_s2", "internvl_tiling", "anyres", "qwen2_vl", "ixc_hd"])
def test_encode_returns_exactly_the_planned_rows(name, backbone):
    for hw in SIZES[1:]:
        p = S.plan(name, *hw)
        with torch.no_grad():
            tokens, layout = S.encode(p, backbone, torch.rand(3, *hw))
        assert tokens.shape[0] == p.num_tokens and layout.segments == p.segments


def test_encode_places_separators_where_the_plan_says(backbone):
    marks = {"image_newline": torch.full((4,), 7.0), "sub_GN": torch.full((16,), 5.0), "glb_GN": torch.full((16,), 6.0)}
    p = S.plan("anyres", 500, 4000)
    with torch.no_grad():
        rows, _ = S.encode(p, backbone, torch.rand(3, 500, 4000), separators=marks)
    kh, kw = p.segments[1].grid
    newline = (rows == 7.0).all(1)
    assert newline.sum() == kh and newline[576 + kw::kw + 1].all()
    p = S.plan("ixc_hd", 10, 10)
    with torch.no_grad():
        rows, _ = S.encode(p, backbone, torch.rand(3, 10, 10), separators=marks)
    assert (rows == 5.0).all(1).sum() == 12 + 60 and (rows[12 * 13] == 6.0).all()
    assert (rows == 6.0).all(1).sum() == 1


def test_encode_matches_a_direct_computation_for_qwen2_vl(backbone):
    image = torch.rand(3, 70, 100)
    p = S.plan("qwen2_vl", 70, 100)
    h, w = p.views[0].resize
    x = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        rows, _ = S.encode(p, backbone, image)
        maps = backbone(x).reshape(h // 14, w // 14, 4)
    first = torch.cat([maps[0, 0], maps[0, 1], maps[1, 0], maps[1, 1]])  # the first 2×2 block, row-major
    torch.testing.assert_close(rows[0], first)  # same kernels on the same data


def test_ps3_encode_agrees_with_plan():
    from ps3.encoder.vision import PS3VisionModel
    torch.manual_seed(0)
    model = PS3VisionModel(_tiny_ps3_config(SCALES_1P5K)).eval()  # 1.5K: the same code, a quarter of the pixels
    for hw in [(300, 400), (60, 480)]:
        p = S.plan("ps3", *hw, **params_for(model), num_token_look_close=400)
        with torch.no_grad():
            rows, layout = S.encode(p, model, torch.rand(3, *hw))
        assert rows.shape == (p.num_tokens, 4 * 64)
        assert [int(m.sum()) for m in layout.masks.values()] == [s.rows for s in p.segments[1:]]


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, kw, words", [
    ("dynamic_s2", {"max_tiles": 8}, ["max_tiles", ">= 9"]),
    ("internvl_tiling", {"max_num": 0}, ["max_num"]),
    ("internvl_tiling", {"min_num": 4, "max_num": 2}, ["max_num", "min_num"]),
    ("anyres", {"grid_pinpoints": [(300, 672)]}, ["grid_pinpoints", "multiples"]),
    ("anyres", {"grid_pinpoints": "1x1..3x3"}, ["grid_pinpoints", "(1x1),...,(3x3)"]),
    ("qwen2_vl", {"max_pixels": 100}, ["max_pixels"]),
    ("ixc_hd", {"hd_num": 0}, ["hd_num"]),
    ("s2", {"s2_scales": [336, 600]}, ["max_split_size", "multiple"]),
    ("s2", {"scales": [1, 2]}, ["scales", "s2_scales="]),
    ("s2", {"patch_size": 15}, ["patch_size"]),
    ("ps3", {"k": 4}, ["k"]),
    ("ps3", {"budgets": [1, 2]}, ["budgets"]),
])
def test_bad_parameters_say_what_to_pass(name, kw, words):
    with pytest.raises(ValueError) as err:
        S.plan(name, 300, 400, **kw)
    for word in words:
        assert word in str(err.value)


def test_bad_sizes_and_names():
    with pytest.raises(ValueError, match="unknown strategy 'tiles'.*internvl_tiling"):
        S.plan("tiles", 10, 10)
    with pytest.raises(ValueError, match="height"):
        S.plan("s2", 0, 10)
    with pytest.raises(ValueError, match="aspect ratio above 200"):
        S.plan("qwen2_vl", 1, 201)
    with pytest.raises(ValueError, match="hd_num"):
        S.plan("ixc_hd", 9000, 1)  # 1 px wide: the short side would become 0 px


def test_encode_refuses_a_mismatched_backbone_or_image(backbone):
    p = S.plan("s2", 100, 100)
    with pytest.raises(ValueError, match="patch_size"):
        S.encode(p, lambda x: backbone(x)[:, 1:], torch.rand(3, 100, 100))
    with pytest.raises(ValueError, match="100x100"):
        S.encode(p, backbone, torch.rand(3, 90, 100))


def test_knob_for_budget_comes_closest():
    h, w = 1500, 2250
    for name in ("dynamic_s2", "internvl_tiling", "qwen2_vl", "ixc_hd", "anyres"):
        knob, value = S.knob_for_budget(name, h, w, 1500)
        near = S.plan(name, h, w, **{knob: value}).num_tokens
        default = S.plan(name, h, w).num_tokens
        assert abs(near - 1500) <= abs(default - 1500), name
    knob, value = S.knob_for_budget("qwen2_vl", h, w, 1000)
    assert knob == "max_pixels" and abs(S.plan("qwen2_vl", h, w, max_pixels=value).num_tokens - 1000) <= 15
    assert math.isclose(S.plan("ps3", h, w, num_token_look_close=S.knob_for_budget("ps3", h, w, 1000)[1]).num_tokens,
                        1000, abs_tol=2)


def test_load_image_tensor_and_its_deprecated_name(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (5, 3), (255, 0, 0)).save(path)
    image = S.load_image_tensor(path)
    assert image.shape == (3, 3, 5) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.ones(3, 5)) and not image[1:].any()
    with pytest.warns(DeprecationWarning, match="load_image_tensor"):
        assert torch.equal(S.load_image(path), image)
