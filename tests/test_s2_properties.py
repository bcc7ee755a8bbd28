"""Property tests for S2 (design §6): output shapes for random input sizes, scales, piece sizes and
modes, derived from the spec's size arithmetic; and chunked backbone calls never change numbers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ps3.s2 import multiscale_forward

SETTINGS = settings(max_examples=25, deadline=None)


def patchify(p: int):
    """Average-pool patchifier B×C×H×W → B×(H/p·W/p)×C, plus one prefix token (the token mean)."""
    def model(x: torch.Tensor) -> torch.Tensor:
        tokens = F.avg_pool2d(x, p).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
    return model


def master_accepts(in_hw, sizes, piece) -> bool:
    """Upstream master's calls: square input and sizes, each cut into ceil(size / piece) equal pieces."""
    return (in_hw[0] == in_hw[1] and piece[0] == piece[1] and all(h == w for h, w in sizes)
            and all(h % math.ceil(h / piece[0]) == 0 for h, _ in sizes))


def expected_hw(size: tuple[int, int], piece: tuple[int, int], patch: int, mode: str) -> tuple[int, int]:
    """Feature size design §6 keeps for one scale: "master" count · (size / count // patch);
    "resize" the grown grid; "pad" / "resize_back" ceil(size / grown_size · grown_feature_size)."""
    out = []
    for s, m in zip(size, piece):
        n = math.ceil(s / m)
        if mode == "master":
            out.append(n * (s // n // patch))
            continue
        feat = n * (m // patch)
        # float order as design §6 and upstream compute it
        out.append(feat if mode == "resize" else math.ceil(s / (n * m) * feat))
    return out[0], out[1]


def mode_of(split_mode, in_hw, sizes, piece) -> str:
    if split_mode is None:
        return "master" if master_accepts(in_hw, sizes, piece) else "resize"
    return split_mode


request = st.fixed_dictionaries({
    "h": st.integers(2, 9), "w": st.integers(2, 9), "batch": st.integers(1, 2), "patch": st.sampled_from([1, 2]),
    "piece": st.tuples(st.integers(1, 4), st.integers(1, 4)),  # in patches
    "split_mode": st.sampled_from([None, "resize", "pad", "resize_back"]), "prefix": st.booleans(),
})


@SETTINGS
@given(req=request, scales=st.lists(st.sampled_from([0.5, 1, 1.5, 2, 2.5]), min_size=1, max_size=3),
       data=st.data())
def test_scales_output_shape(req, scales, data):
    piece = (req["piece"][0] * req["patch"], req["piece"][1] * req["patch"])
    sizes = [(int(req["h"] * s), int(req["w"] * s)) for s in scales]
    idx = data.draw(st.integers(-len(scales), len(scales) - 1))
    x = torch.randn(req["batch"], 2, req["h"], req["w"])
    out = multiscale_forward(patchify(req["patch"]), x, scales=scales, max_split_size=piece,
                             split_mode=req["split_mode"], resize_output_to_idx=idx, num_prefix_token=1)
    mode = mode_of(req["split_mode"], (req["h"], req["w"]), sizes, piece)
    fh, fw = expected_hw(sizes[idx], piece, req["patch"], mode)
    assert out.shape == (req["batch"], 1 + fh * fw, 2 * len(scales))
    assert torch.isfinite(out).all()


@SETTINGS
@given(req=request, sizes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3),
       data=st.data())
def test_img_sizes_output_shape_bnc_and_bchw(req, sizes, data):
    piece = (req["piece"][0] * req["patch"], req["piece"][1] * req["patch"])
    idx = data.draw(st.integers(-len(sizes), len(sizes) - 1))
    x = torch.randn(req["batch"], 2, req["h"], req["w"])
    model = patchify(req["patch"])
    kwargs = dict(img_sizes=sizes, max_split_size=piece, split_mode=req["split_mode"], resize_output_to_idx=idx)
    mode = mode_of(req["split_mode"], (req["h"], req["w"]), sizes, piece)
    fh, fw = expected_hw(sizes[idx], piece, req["patch"], mode)
    P = int(req["prefix"])
    out = multiscale_forward(model if P else (lambda t: model(t)[:, 1:]), x, num_prefix_token=P, **kwargs)
    assert out.shape == (req["batch"], P + fh * fw, 2 * len(sizes))
    maps = multiscale_forward(lambda t: F.avg_pool2d(t, req["patch"]), x, output_shape="bchw", **kwargs)
    assert maps.shape == (req["batch"], 2 * len(sizes), fh, fw)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), out[:, P:], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(req=request, chunk=st.integers(1, 7), scales=st.lists(st.sampled_from([1, 1.5, 2]), min_size=1, max_size=3))
def test_chunked_backbone_calls_change_nothing(req, chunk, scales):
    piece = (req["piece"][0] * req["patch"], req["piece"][1] * req["patch"])
    x = torch.randn(req["batch"], 2, req["h"], req["w"])
    kwargs = dict(scales=scales, max_split_size=piece, split_mode=req["split_mode"], num_prefix_token=1)
    whole = multiscale_forward(patchify(req["patch"]), x, **kwargs)
    torch.testing.assert_close(multiscale_forward(patchify(req["patch"]), x, split_chunk_size=chunk, **kwargs),
                               whole, atol=0, rtol=0)
    torch.testing.assert_close(multiscale_forward(patchify(req["patch"]), x, split_forward=True, **kwargs),
                               whole, atol=0, rtol=0)
