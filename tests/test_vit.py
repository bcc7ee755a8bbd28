"""The trunk's building blocks: cell-wise position tables and patch-wise resizing equal the
whole-image computations they replace; the KV cache gives the same attention as concatenation."""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close_paths
from ps3.encoder.vit import Attention, ViTArch, VisionTransformer, interpolation_taps, patch_taps, resize_patches


@pytest.mark.parametrize("g,h,w", [(4, 8, 8), (4, 16, 8), (4, 8, 4), (4, 3, 2), (4, 4, 4), (27, 54, 30),
                                   (27, 270, 270)])
def test_pos_embed_at_equals_resampled_table(g, h, w):
    trunk = VisionTransformer(ViTArch(14, 32, 1, 4, 2.0, g))
    torch.nn.init.normal_(trunk.pos_embed)
    full = trunk.pos_embed_grid(h, w).view(h, w, -1)
    rows, cols = torch.randint(0, h, (2, 40)), torch.randint(0, w, (2, 40))
    torch.testing.assert_close(trunk.pos_embed_at(h, w, rows, cols), full[rows, cols], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(112, 56), (56, 28), (280, 420), (14, 14), (28, 28), (150, 196), (1512, 1512)])
def test_resize_patches_equals_full_resize(size):
    x = torch.randn(2, 3, 150, 200)
    full = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    p = 14
    h, w = size[0] // p, size[1] // p
    b, r, c = torch.tensor([0, 1, 1, 0]), torch.tensor([0, h - 1, h // 2, h - 1]), torch.tensor([w - 1, 0, w // 2, 0])
    got = resize_patches(x, size, p, b, r, c, chunk=3).view(4, 3, p, p)
    want = torch.stack([full[i, :, y * p:(y + 1) * p, z * p:(z + 1) * p] for i, y, z in zip(b, r, c)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_patch_sources_are_a_short_window_unless_downsampling_strongly():
    p = 14
    assert patch_taps(378, 756, p)[0].shape[1] <= 11  # 2x up: 7 source pixels and the kernel's reach
    assert patch_taps(2000, 1512, p)[0].shape[1] <= 23  # mild down: still one window
    index, weight = patch_taps(3780, 378, p)  # 10x down: the 4 taps of each output, listed
    assert index.shape[1] == 4 * p
    torch.testing.assert_close(weight.sum(-1), torch.ones(378 // p, p))


def test_taps_sum_to_one_and_stay_sparse():
    for src, dst, aa in [(3780, 378, False), (27, 270, True), (224, 224, False), (5, 3, True)]:
        index, weight = interpolation_taps(src, dst, aa)
        assert index.shape[0] == dst and weight.shape[1] <= max(4, 4 * src // dst + 4)
        torch.testing.assert_close(weight.sum(1), torch.ones(dst))


def test_kv_prefix_equals_attending_to_concatenation():
    torch.manual_seed(0)
    trunk = VisionTransformer(ViTArch(4, 32, 2, 4, 2.0, 4))
    low, high = torch.randn(1, 16, 32), torch.randn(1, 8, 32)
    _, _, kv = trunk.forward_blocks(low, return_kv=True)
    # Layer 0: the high tokens' output with the cache equals their rows of a joint pass in which the
    # low tokens cannot see the high ones (the cache was computed without them).
    block = trunk.blocks[0]
    with_cache = block(high, kv[0])
    q_all = torch.cat([low, high], 1)
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask[:16, 16:] = False
    normed = block.norm1(q_all)
    qkv = block.attn.qkv(normed).view(1, 24, 3, 4, 8).permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    x = q_all + block.attn.proj(attn.transpose(1, 2).reshape(1, 24, 32))
    x = x + block.mlp(block.norm2(x))
    assert_close_paths(with_cache, x[:, 16:], "cached prefix vs full pass")


def test_attention_broadcasts_a_prefix_over_stacked_looks():
    """Rows r of a pass stacking n looks of b images take prefix row r % b: same as repeating it."""
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    b, n = 2, 3
    x = torch.randn(n * b, 5, 32)
    prefix = (torch.randn(b, 4, 7, 8), torch.randn(b, 4, 7, 8))
    repeated = tuple(t.repeat(n, 1, 1, 1) for t in prefix)
    with torch.no_grad():
        assert_close_paths(attn(x, prefix), attn(x, repeated), "broadcast prefix vs repeated")
        with pytest.raises(ValueError, match="prefix of batch 2"):
            attn(torch.randn(5, 5, 32), prefix)
