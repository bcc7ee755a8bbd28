"""S2 multi-scale features (design §6): hand-derived cases, an independent loop-based reference, every
option, gradients, dtypes and every caller error."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ps3.s2 import merge_chessboard, multiscale_forward, split_chessboard, token_grid


# ----------------------------------------------------------------------------------- backbones
def patchify(p: int):
    """Average-pool patchifier: B×C×H×W → B×(H/p·W/p)×C tokens (row-major); p=1 is the identity."""
    def model(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, p).flatten(2).transpose(1, 2)
    return model


def with_prefix(model, num: int):
    """Prepends `num` prefix tokens: the mean of the pieces' tokens, times 1, 2, ..."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        tokens = model(x)
        mean = tokens.mean(1, keepdim=True)
        return torch.cat([mean * (k + 1) for k in range(num)] + [tokens], dim=1)
    return wrapped


def maps(p: int):
    """Average-pool feature maps B×C×H/p×W/p (a 'ConvNet' for output_shape='bchw')."""
    return lambda x: F.avg_pool2d(x, p)


def bicubic(x: torch.Tensor, size) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False).to(x.dtype)


# ------------------------------------------------------------------ independent loop reference
def master_accepts(x, sizes, piece) -> bool:
    """Upstream master takes square inputs and sizes cut into ceil(size / piece) equal pieces."""
    return (x.shape[-1] == x.shape[-2] and piece[0] == piece[1] and all(h == w for h, w in sizes)
            and all(h % math.ceil(h / piece[0]) == 0 for h, _ in sizes))


def reference(model, x, sizes, piece, patch, split_mode=None, out_idx=0, prefix=0, bchw=False):
    """Straightforward S2 with explicit loops and torch.cat, written from design §6.

    `sizes` and `piece` are (h, w); `patch` is the backbone's stride (token grid = piece / patch).
    split_mode None: master's equal pieces where master accepts the call, else "resize"."""
    b = x.shape[0]
    feats, prefixes = [], []
    use_master = split_mode is None and master_accepts(x, sizes, piece)
    split_mode = split_mode or "resize"
    for h, w in sizes:
        img = bicubic(x, (h, w))
        nh, nw = math.ceil(h / piece[0]), math.ceil(w / piece[1])
        # master: equal pieces of size / count, nothing grows
        cut = (h // nh, w // nw) if use_master else piece
        full_h, full_w = nh * cut[0], nw * cut[1]
        if (full_h, full_w) != (h, w):
            if split_mode in ("resize", "resize_back"):
                img = bicubic(img, (full_h, full_w))
            else:
                img = F.pad(img, (0, full_w - w, 0, full_h - h))
        pieces = []
        for i in range(nh):
            for j in range(nw):
                pieces.append(img[:, :, i * cut[0]:(i + 1) * cut[0], j * cut[1]:(j + 1) * cut[1]])
        out = model(torch.cat(pieces, dim=0))
        gh, gw = cut[0] // patch, cut[1] // patch
        if not bchw:
            if prefix:
                pre = out[:, :prefix]
                prefixes.append(sum(pre[k * b:(k + 1) * b] for k in range(nh * nw)) / (nh * nw))
                out = out[:, prefix:]
            out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)
        rows = []
        for i in range(nh):
            rows.append(torch.cat([out[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=3))
        fmap = torch.cat(rows, dim=2)
        keep = (math.ceil(h * fmap.shape[2] / full_h), math.ceil(w * fmap.shape[3] / full_w))
        if split_mode == "resize_back":
            fmap = F.interpolate(fmap, size=keep, mode="area")
        elif split_mode == "pad":
            fmap = fmap[:, :, :keep[0], :keep[1]]
        feats.append(fmap)
    size = feats[out_idx].shape[-2:]
    res = torch.cat([F.interpolate(f, size=size, mode="area") for f in feats], dim=1)
    if bchw:
        return res
    res = res.flatten(2).transpose(1, 2)
    if prefix:
        res = torch.cat([torch.cat(prefixes, dim=-1), res], dim=1)
    return res


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.fixture
def img() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8)


# ------------------------------------------------------------------------- hand-derived cases
def test_single_scale_is_the_backbone(img):
    model = patchify(2)
    close(multiscale_forward(model, img, scales=[1]), model(img))


def test_identity_backbone_reproduces_the_resized_image(img):
    # Patch 1 "backbone" returns pixels: stitching the 4 pieces back must give the 16x16 bicubic
    # image exactly, which pins the piece order (row by row, piece-major batch) and the merge.
    out = multiscale_forward(patchify(1), img, scales=[1, 2], resize_output_to_idx=1, output_shape="bnc")
    up = bicubic(img, 16)
    assert out.shape == (2, 256, 6)
    close(out[..., 3:].transpose(1, 2).reshape(2, 3, 16, 16), up)
    close(out[..., :3].transpose(1, 2).reshape(2, 3, 16, 16), F.interpolate(img, size=16, mode="area"))


def test_avgpool_backbone_scale_two_is_a_coarser_pool(img):
    # Pool-2 tokens of four 8x8 pieces of the 16x16 image, area-resized to 4x4, are the pool-4 of it.
    out = multiscale_forward(patchify(2), img, scales=[1, 2])
    assert out.shape == (2, 16, 6)
    close(out[..., :3], F.avg_pool2d(img, 2).flatten(2).transpose(1, 2))
    close(out[..., 3:], F.avg_pool2d(bicubic(img, 16), 4).flatten(2).transpose(1, 2))


def test_pad_mode_crops_the_padding_away(img):
    # 8 -> 12 px, padded to 16 = 2x2 pieces of 8; identity features cropped back to 12x12.
    out = multiscale_forward(patchify(1), img, img_sizes=[12], max_split_size=8, split_mode="pad",
                             output_shape="bnc")
    close(out.transpose(1, 2).reshape(2, 3, 12, 12), bicubic(img, 12))


def test_pad_mode_keeps_the_partly_padded_token(img):
    # 11 px padded to 16, pool-2 tokens: 8 a side, ceil(11 / 16 * 8) = 6 kept; the 6th straddles
    # the last image pixel and the first zero of the padding.
    out = multiscale_forward(patchify(2), img, img_sizes=[11], max_split_size=8, split_mode="pad")
    padded = F.pad(bicubic(img, 11), (0, 5, 0, 5))
    assert out.shape == (2, 36, 3)
    close(out.transpose(1, 2).reshape(2, 3, 6, 6), F.avg_pool2d(padded, 2)[:, :, :6, :6])


def test_default_follows_master_on_square_calls(img):
    # 8 -> 12 px with max_split_size 8: master cuts 2x2 equal pieces of 6 px (nothing grows), so
    # identity features are the 12x12 bicubic image itself.
    out = multiscale_forward(patchify(1), img, img_sizes=[12], max_split_size=8)
    close(out.transpose(1, 2).reshape(2, 3, 12, 12), bicubic(img, 12))


def test_resize_mode_keeps_the_grown_grid(img):
    # split_mode="resize" (dev_any_shape at 809ce65): 12 px grown to 16, the whole 16x16 map kept.
    out = multiscale_forward(patchify(1), img, img_sizes=[12], max_split_size=8, split_mode="resize")
    close(out.transpose(1, 2).reshape(2, 3, 16, 16), bicubic(bicubic(img, 12), 16))


def test_resize_back_mode_grows_then_area_shrinks(img):
    # The older any-shape rule (31688b1): grown to 16, then the map is area-resized back to 12x12.
    out = multiscale_forward(patchify(1), img, img_sizes=[12], max_split_size=8, split_mode="resize_back")
    expect = F.interpolate(bicubic(bicubic(img, 12), 16), size=12, mode="area")
    close(out.transpose(1, 2).reshape(2, 3, 12, 12), expect)


def test_token_counts_of_upstreams_any_shape_examples():
    # An any-shape example, as upstream dev_any_shape at 809ce65 computes it: a 24x40 input,
    # img_sizes=[(24, 40), (48, 80)], max_split_size=16, patch 8, one class token. Scale 0 is grown
    # to 32x48 = 2x3 pieces of 2x2 tokens and that whole 4x6 grid is kept: 1 + 24 = 25 tokens.
    # "pad" and "resize_back" bring it back to ceil(24/32·4) x ceil(40/48·6) = 3x5: 1 + 15 = 16.
    x = torch.randn(1, 3, 24, 40)
    for mode, grid in ((None, (4, 6)), ("resize", (4, 6)), ("pad", (3, 5)), ("resize_back", (3, 5))):
        out = multiscale_forward(with_prefix(patchify(8), 1), x, img_sizes=[(24, 40), (48, 80)],
                                 max_split_size=16, num_prefix_token=1, split_mode=mode)
        assert out.shape == (1, 1 + grid[0] * grid[1], 6), mode
        close(out, reference(with_prefix(patchify(8), 1), x, [(24, 40), (48, 80)], (16, 16), 8,
                             split_mode=mode, prefix=1))
    # The branch README's example: 112x224, img_sizes=[(112, 224), (224, 448)], max_split_size=224,
    # patch 16: 98 = 7·14 tokens under the older rule it describes, 14·14 = 196 under the newest.
    x = torch.randn(1, 3, 112, 224)
    for mode, count in (("resize_back", 98), ("resize", 196), (None, 196)):
        out = multiscale_forward(patchify(16), x, img_sizes=[(112, 224), (224, 448)], max_split_size=224,
                                 split_mode=mode)
        assert out.shape == (1, count, 6), mode


def test_prefix_tokens_are_averaged_over_pieces(img):
    # Prefix = mean of a piece's pooled tokens; averaged over equal pieces it is the image mean.
    out = multiscale_forward(with_prefix(patchify(2), 2), img, scales=[1, 2], num_prefix_token=2)
    assert out.shape == (2, 2 + 16, 6)
    for k in range(2):
        close(out[:, k, :3], img.mean((2, 3)) * (k + 1))
        close(out[:, k, 3:], bicubic(img, 16).mean((2, 3)) * (k + 1))
    close(out[:, 2:], multiscale_forward(patchify(2), img, scales=[1, 2]))


def test_constant_image_gives_constant_features():
    x = torch.full((1, 2, 6, 6), 0.75)
    out = multiscale_forward(patchify(3), x, scales=[1, 2, 3], resize_output_to_idx=-1)
    assert out.shape == (1, 36, 6)
    close(out, torch.full_like(out, 0.75))


# ------------------------------------------------------------- against the loop reference
@pytest.mark.parametrize("split_mode", [None, "resize", "pad", "resize_back"])
@pytest.mark.parametrize("out_idx", [0, 1, -1])
def test_square_matches_reference(img, split_mode, out_idx):
    model = patchify(2)
    sizes = [8, 11, 20]  # 11 -> 16 px: 8 tokens a side, ceil(11 / 16 * 8) = 6 kept
    out = multiscale_forward(model, img, img_sizes=sizes, max_split_size=8, split_mode=split_mode,
                             resize_output_to_idx=out_idx)
    ref = reference(model, img, [(s, s) for s in sizes], (8, 8), 2, split_mode, out_idx)
    close(out, ref)


def test_scales_and_img_sizes_agree(img):
    model = patchify(2)
    a = multiscale_forward(model, img, scales=[1, 1.5, 2], max_split_size=4)
    b = multiscale_forward(model, img, img_sizes=[8, 12, 16], max_split_size=4)
    close(a, b)
    close(a, reference(model, img, [(8, 8), (12, 12), (16, 16)], (4, 4), 2))


@pytest.mark.parametrize("split_mode", [None, "resize", "pad", "resize_back"])
def test_non_square_input_matches_reference(split_mode):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 10)
    model = patchify(2)
    sizes = [(6, 10), (9, 13), (12, 20)]  # 9x13 -> 12x16: keeps ceil(4.5) x ceil(6.5) = 5x7
    out = multiscale_forward(model, x, img_sizes=sizes, max_split_size=4, split_mode=split_mode,
                             resize_output_to_idx=-1)
    close(out, reference(model, x, sizes, (4, 4), 2, split_mode, -1))


def test_scales_on_non_square_input_use_rectangular_pieces():
    # Default pieces are the input size (6x10): a 3x5 token grid per piece, 2x2 pieces at scale 2.
    torch.manual_seed(2)
    x = torch.randn(1, 3, 6, 10)
    model = patchify(2)
    out = multiscale_forward(model, x, scales=[1, 2], resize_output_to_idx=1)
    assert out.shape == (1, 6 * 10, 6)
    close(out, reference(model, x, [(6, 10), (12, 20)], (6, 10), 2, out_idx=1))
    close(out[..., 3:], F.avg_pool2d(bicubic(x, (12, 20)), 2).flatten(2).transpose(1, 2))


def test_rectangular_max_split_size_matches_reference(img):
    model = patchify(2)
    out = multiscale_forward(model, img, img_sizes=[8, (12, 16)], max_split_size=(4, 6), split_mode="pad")
    close(out, reference(model, img, [(8, 8), (12, 16)], (4, 6), 2, "pad"))


@pytest.mark.parametrize("split_mode", [None, "resize", "pad", "resize_back"])
def test_prefix_tokens_match_reference(img, split_mode):
    model = with_prefix(patchify(2), 1)
    out = multiscale_forward(model, img, img_sizes=[8, 14], max_split_size=8, split_mode=split_mode,
                             num_prefix_token=1)
    close(out, reference(model, img, [(8, 8), (14, 14)], (8, 8), 2, split_mode, prefix=1))


@pytest.mark.parametrize("split_mode", [None, "resize", "pad", "resize_back"])
def test_bchw_matches_reference(img, split_mode):
    model = maps(2)
    out = multiscale_forward(model, img, img_sizes=[8, 12, 16], max_split_size=8, split_mode=split_mode,
                             output_shape="bchw", resize_output_to_idx=1)
    assert out.shape[:2] == (2, 9) and out.dim() == 4
    close(out, reference(model, img, [(8, 8), (12, 12), (16, 16)], (8, 8), 2, split_mode, 1, bchw=True))


def test_bchw_and_bnc_give_the_same_numbers(img):
    a = multiscale_forward(maps(2), img, scales=[1, 2], output_shape="bchw")
    b = multiscale_forward(patchify(2), img, scales=[1, 2])
    close(a.flatten(2).transpose(1, 2), b)


def test_split_forward_and_chunks_are_the_same_numbers(img):
    calls: list[int] = []

    def model(x):
        calls.append(x.shape[0])
        return patchify(2)(x)

    kwargs = dict(img_sizes=[8, 16, 24], max_split_size=8, num_prefix_token=0)
    full = multiscale_forward(model, img, **kwargs)
    assert calls == [2, 8, 18]
    calls.clear()
    close(multiscale_forward(model, img, split_forward=True, **kwargs), full)
    assert calls == [2] * (1 + 4 + 9)  # chunks of the input batch size, as in the reference
    calls.clear()
    close(multiscale_forward(model, img, split_chunk_size=5, **kwargs), full)
    assert calls == [2, 5, 3, 5, 5, 5, 3]


def test_s2wrapper_import_path(img):
    from s2wrapper import forward as s2_forward
    import s2wrapper

    assert s2wrapper.multiscale_forward is multiscale_forward
    close(s2_forward(patchify(2), img, scales=[1, 2]), multiscale_forward(patchify(2), img, scales=[1, 2]))


def test_split_and_merge_chessboard_round_trip():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    pieces = split_chessboard(x, (2, 3))
    assert pieces.shape == (12, 1, 2, 2)
    # piece (row 0, col 1) of image 1 sits at index (0 * 3 + 1) * 2 + 1
    assert torch.equal(pieces[3], x[1, :, 0:2, 2:4])
    assert torch.equal(merge_chessboard(pieces, (2, 3)), x)
    assert torch.equal(merge_chessboard(split_chessboard(x, 2), 2), x)


def test_token_grid():
    assert token_grid(196, (224, 224)) == (14, 14)
    assert token_grid(15, (224, 224)) is None
    assert token_grid(12, (42, 56)) == (3, 4)  # stride 14
    assert token_grid(16 * 24, (224, 336)) == (16, 24)
    assert token_grid(6, (15, 22)) == (2, 3)  # stride 7, flooring
    assert token_grid(6, (14, 20)) == (2, 3)  # stride 7, padding (ceil)
    assert token_grid(7, (30, 31)) is None


# ------------------------------------------------------------------- gradients, dtype, device
def test_gradients_reach_backbone_and_input(img):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, 2, stride=2)

    def model(x):
        return conv(x).flatten(2).transpose(1, 2)

    x = img.clone().requires_grad_(True)
    out = multiscale_forward(model, x, img_sizes=[8, 12], max_split_size=8, num_prefix_token=0)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    g_w, g_x = conv.weight.grad.clone(), x.grad.clone()
    assert g_w.abs().sum() > 0 and g_x.abs().sum() > 0

    conv.zero_grad()
    x2 = img.clone().requires_grad_(True)
    ref = reference(model, x2, [(8, 8), (12, 12)], (8, 8), 2)
    close(out.detach(), ref.detach())
    (ref * weights).sum().backward()
    close(conv.weight.grad, g_w, atol=1e-4)
    close(x2.grad, g_x, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_is_preserved(img, dtype):
    x = img.to(dtype)
    out = multiscale_forward(with_prefix(patchify(2), 1), x, img_sizes=[8, 12], max_split_size=8,
                             num_prefix_token=1, split_mode="pad")
    assert out.dtype == dtype
    ref = multiscale_forward(with_prefix(patchify(2), 1), img, img_sizes=[8, 12], max_split_size=8,
                             num_prefix_token=1, split_mode="pad")
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    assert multiscale_forward(maps(2), x, scales=[1, 2], output_shape="bchw").dtype == dtype


def test_float64_stays_float64(img):
    out = multiscale_forward(patchify(2), img.double(), scales=[1, 1.5], max_split_size=4)
    assert out.dtype == torch.float64
    close(out.float(), multiscale_forward(patchify(2), img, scales=[1, 1.5], max_split_size=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(img):
    kwargs = dict(img_sizes=[8, 12, (16, 20)], max_split_size=8, num_prefix_token=1)
    model = with_prefix(patchify(2), 1)
    out = multiscale_forward(model, img.cuda(), **kwargs)
    assert out.is_cuda
    close(out.cpu(), multiscale_forward(model, img, **kwargs), atol=1e-4)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of scales"),
    (dict(scales=[1], img_sizes=[8]), "exactly one of scales"),
    (dict(scales=[]), "scales must be a non-empty"),
    (dict(scales=[1, 0]), r"scales\[1\] must be a positive"),
    (dict(scales=[-1]), r"scales\[0\] must be a positive"),
    (dict(scales=[0.01]), "pass a larger scale"),
    (dict(img_sizes=8), "img_sizes must be a non-empty list"),
    (dict(img_sizes=[8, 0]), r"img_sizes\[1\] must be positive"),
    (dict(img_sizes=[(8, -2)]), r"img_sizes\[0\] must be positive"),
    (dict(img_sizes=[(8, 8, 8)]), r"img_sizes\[0\] must be a positive int or an \(h, w\) pair"),
    (dict(img_sizes=[8.5]), r"img_sizes\[0\] must be a positive int"),
    (dict(scales=[1], max_split_size=0), "max_split_size must be positive"),
    (dict(scales=[1], max_split_size=(4, 0)), "max_split_size must be positive"),
    (dict(scales=[1], split_mode="crop"),
     "split_mode must be None .upstream's default. or one of 'resize', 'pad', 'resize_back'"),
    (dict(scales=[1], output_shape="bhwc"), "output_shape must be 'bnc'"),
    (dict(scales=[1], output_shape="bchw", num_prefix_token=1), "needs output_shape='bnc'"),
    (dict(scales=[1], num_prefix_token=-1), "num_prefix_token must be an int >= 0"),
    (dict(scales=[1, 2], resize_output_to_idx=2), r"resize_output_to_idx must be an int in \[-2, 1\]"),
    (dict(scales=[1, 2], resize_output_to_idx=-3), "resize_output_to_idx"),
    (dict(scales=[1], split_chunk_size=0), "split_chunk_size must be a positive int"),
])
def test_bad_arguments_raise_value_error(img, kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiscale_forward(patchify(2), img, **kwargs)


def test_input_must_be_4d_float_tensor(img):
    with pytest.raises(ValueError, match="input must be 4-D"):
        multiscale_forward(patchify(2), img[0], scales=[1])
    with pytest.raises(TypeError, match="floating-point"):
        multiscale_forward(patchify(2), (img * 100).to(torch.uint8), scales=[1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        multiscale_forward(patchify(2), img.numpy(), scales=[1])


def test_token_count_not_a_grid_names_scale_and_count(img):
    def model(x):  # 4x4 grid plus one unannounced class token = 17 tokens
        return with_prefix(patchify(2), 1)(x)

    with pytest.raises(ValueError, match=r"17 spatial tokens per piece at scale 0 \(8x8 image"):
        multiscale_forward(model, img, scales=[1, 2])
    with pytest.raises(ValueError, match=r"scale 1 \(16x16 image, 8x8 pieces\)"):
        multiscale_forward(lambda x: model(x) if x.shape[0] > 2 else patchify(2)(x), img, scales=[1, 2])


def test_bad_backbone_outputs(img):
    with pytest.raises(ValueError, match="needs the model to return B×N×C tokens"):
        multiscale_forward(maps(2), img, scales=[1])
    with pytest.raises(ValueError, match="needs the model to return B×C×h×w maps"):
        multiscale_forward(patchify(2), img, scales=[1], output_shape="bchw")
    with pytest.raises(ValueError, match="returned batch 1 for 8 pieces at scale 1"):
        multiscale_forward(lambda x: patchify(2)(x)[:1] if x.shape[0] > 2 else patchify(2)(x), img,
                           scales=[1, 2])
    with pytest.raises(ValueError, match="not more than num_prefix_token=16"):
        multiscale_forward(patchify(2), img, scales=[1], num_prefix_token=16)
    with pytest.raises(TypeError, match="model must return a tensor"):
        multiscale_forward(lambda x: {"x": x}, img, scales=[1])


def test_split_helpers_reject_bad_num_split():
    with pytest.raises(ValueError, match="does not split into 3x3"):
        split_chessboard(torch.zeros(1, 1, 4, 4), 3)
    with pytest.raises(ValueError, match="not a whole number of 2x2 chessboards"):
        merge_chessboard(torch.zeros(3, 1, 2, 2), 2)
