"""S2: multi-scale features from any vision backbone (design §6).

The image is resized to every requested size; each resized image is cut into a chessboard of
``max_split_size`` pieces that all go through the *same* backbone at its native resolution; the
pieces' feature maps are stitched back, every scale is area-resized to one feature size and the
scales are concatenated on channels. Numerically this follows the reference S2-Wrapper
(``s2wrapper.forward`` of bfshi/scaling_on_scales, any-shape version): bicubic resizing in float32,
pieces ordered row by row then column by column and stacked on the batch dim (piece-major: all
``B`` images of piece (0, 0) first), area resizing of the features, and prefix tokens averaged over
the pieces of each scale.

Beyond the reference: ``scales`` works for non-square inputs, ``max_split_size`` may be an
``(h, w)`` pair (non-square pieces, whose token grid is inferred from the piece shape),
``split_chunk_size`` bounds how many pieces go through the backbone at once, low-precision inputs
keep their dtype (every resize runs in float32), and caller mistakes raise ``ValueError`` /
``TypeError`` that say what to pass.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

__all__ = ["multiscale_forward", "forward", "SPLIT_MODES"]

Size2 = tuple[int, int]
# What a scale whose size is not a multiple of the piece size becomes (design §6):
#   "resize"       the image is resized up to whole pieces and the grown image's full feature grid
#                  is kept (upstream dev_any_shape at 809ce65, the newest code);
#   "pad"          the image is zero-padded to whole pieces and the map cropped back;
#   "resize_back"  as "resize", then the map is area-resized back to the requested image's grid
#                  (upstream 31688b1, which the dev_any_shape README's 98-token example describes).
SPLIT_MODES = ("resize", "pad", "resize_back")


@dataclass(frozen=True)
class _ScalePlan:
    """Geometry of one scale: requested image size, chessboard layout and padded/resized size."""

    size: Size2  # the image size asked for (h, w)
    splits: Size2  # chessboard rows, columns
    piece: Size2  # the size of one piece (h, w)

    @property
    def full(self) -> Size2:
        """Image size after growing `size` to a whole number of pieces."""
        return self.splits[0] * self.piece[0], self.splits[1] * self.piece[1]


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _as_size2(v: object, name: str) -> Size2:
    """An int or an (h, w) pair of positive ints as (h, w); anything else is a ValueError."""
    if _is_int(v):
        pair = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(e) for e in v):
        pair = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {v!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return pair


def _target_sizes(in_hw: Size2, scales: Sequence[float] | None,
                  img_sizes: Sequence[int | Sequence[int]] | None) -> list[Size2]:
    """Per-scale image sizes: ``int(side * scale)`` for `scales`, else `img_sizes` as (h, w)."""
    if (scales is None) == (img_sizes is None):
        raise ValueError("pass exactly one of scales (e.g. scales=[1, 2]) or img_sizes "
                         f"(e.g. img_sizes=[224, 448] or [(224, 336)]); got scales={scales!r}, "
                         f"img_sizes={img_sizes!r}")
    if scales is not None:
        if not isinstance(scales, (list, tuple)) or len(scales) == 0:
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales!r}")
        sizes = []
        for i, s in enumerate(scales):
            if not isinstance(s, Real) or isinstance(s, bool) or not s > 0:
                raise ValueError(f"scales[{i}] must be a positive number, got {s!r}")
            hw = (int(in_hw[0] * s), int(in_hw[1] * s))
            if min(hw) <= 0:
                raise ValueError(f"scales[{i}]={s!r} turns the {in_hw[0]}x{in_hw[1]} input into a "
                                 f"{hw[0]}x{hw[1]} image; pass a larger scale")
            sizes.append(hw)
        return sizes
    if not isinstance(img_sizes, (list, tuple)) or len(img_sizes) == 0:
        raise ValueError("img_sizes must be a non-empty list of sizes, each an int (square) or an "
                         f"(h, w) pair, got {img_sizes!r}")
    return [_as_size2(s, f"img_sizes[{i}]") for i, s in enumerate(img_sizes)]


def _plan(sizes: list[Size2], piece: Size2) -> list[_ScalePlan]:
    # ceil(size / piece) pieces per side (exact in integers; the reference uses math.ceil of a float).
    return [_ScalePlan(size=s, splits=(-(-s[0] // piece[0]), -(-s[1] // piece[1])), piece=piece)
            for s in sizes]


def _master_plan(in_hw: Size2, sizes: list[Size2], piece: Size2) -> list[_ScalePlan] | None:
    """The chessboard of upstream's master branch, or None for a call master refuses (it takes
    square inputs and sizes only, cut into ceil(size / max_split_size) equal pieces). Where a size
    is not a multiple of max_split_size its pieces are size / count, smaller than max_split_size:
    no growing, no resizing back."""
    if in_hw[0] != in_hw[1] or piece[0] != piece[1] or any(h != w for h, w in sizes):
        return None
    plans = []
    for side, _ in sizes:
        count = -(-side // piece[0])
        if side % count:
            return None  # master's split asserts that the pieces are equal
        plans.append(_ScalePlan(size=(side, side), splits=(count, count), piece=(side // count,) * 2))
    return plans


def _resize(x: torch.Tensor, size: Size2, mode: str) -> torch.Tensor:
    """Resize in float32 (as the reference does; float64 stays float64) and return in x's dtype.

    Bicubic and area resizing to the unchanged size are exact identities in torch, so skipping them
    changes no number and saves a copy."""
    if tuple(x.shape[-2:]) == size:
        return x
    work = x if x.dtype == torch.float64 else x.float()
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    return F.interpolate(work, size=size, mode=mode, **kwargs).to(x.dtype)


def _splits(num_split: int | Sequence[int]) -> Size2:
    return (num_split, num_split) if _is_int(num_split) else (int(num_split[0]), int(num_split[1]))


def split_chessboard(x: torch.Tensor, num_split: int | Sequence[int]) -> torch.Tensor:
    """B×C×H×W → (nh·nw·B)×C×(H/nh)×(W/nw): pieces row-major, each piece's B images contiguous.

    `num_split` is nh = nw or (nh, nw); H and W must be multiples of them."""
    b, c, h, w = x.shape
    nh, nw = _splits(num_split)
    if h % nh or w % nw:
        raise ValueError(f"a {h}x{w} image does not split into {nh}x{nw} equal pieces; pass a "
                         f"num_split that divides the height and width")
    ph, pw = h // nh, w // nw
    x = x.reshape(b, c, nh, ph, nw, pw).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(nh * nw * b, c, ph, pw)


def merge_chessboard(x: torch.Tensor, num_split: int | Sequence[int]) -> torch.Tensor:
    """Inverse of `split_chessboard`: (nh·nw·B)×C×h×w → B×C×(nh·h)×(nw·w)."""
    n, c, h, w = x.shape
    nh, nw = _splits(num_split)
    if n % (nh * nw):
        raise ValueError(f"a batch of {n} is not a whole number of {nh}x{nw} chessboards; pass the "
                         "num_split used to split it")
    b = n // (nh * nw)
    x = x.reshape(nh, nw, b, c, h, w).permute(2, 3, 0, 4, 1, 5)
    return x.reshape(b, c, nh * h, nw * w)


def token_grid(num_tokens: int, piece: Size2) -> Size2 | None:
    """The (rows, cols) token grid a patchifier gives for a `piece`-sized image with `num_tokens`.

    A square piece needs a square number of tokens (as in the reference). For a non-square piece,
    a factorisation rows·cols = num_tokens is accepted when some stride s patchifies the piece to
    it, flooring (rows = ⌊h/s⌋, cols = ⌊w/s⌋) or padding (rows = ⌈h/s⌉, cols = ⌈w/s⌉); among
    several, the one closest to the piece's aspect ratio wins. None when no grid fits.
    """
    ph, pw = piece
    if ph == pw:
        r = math.isqrt(num_tokens)
        return (r, r) if r * r == num_tokens and r > 0 else None

    def fits(rows: int, cols: int) -> bool:
        # Stride intervals (lo, hi] for flooring and [lo, hi) for padding must overlap on both axes.
        floor_lo, floor_hi = max(ph / (rows + 1), pw / (cols + 1)), min(ph / rows, pw / cols)
        ceil_lo = max(ph / rows, pw / cols)
        ceil_hi = min(ph / (rows - 1) if rows > 1 else math.inf, pw / (cols - 1) if cols > 1 else math.inf)
        return floor_lo < floor_hi or ceil_lo < ceil_hi

    target = math.log(ph / pw)
    best: Size2 | None = None
    for d in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % d:
            continue
        for rows, cols in ((d, num_tokens // d), (num_tokens // d, d)):
            if fits(rows, cols) and (best is None or abs(math.log(rows / cols) - target)
                                     < abs(math.log(best[0] / best[1]) - target)):
                best = (rows, cols)
    return best


def _run_backbone(model: Callable[[torch.Tensor], torch.Tensor], pieces: torch.Tensor,
                  chunk: int | None) -> torch.Tensor:
    """One backbone call, or calls on `chunk` pieces at a time to bound activation memory."""
    if chunk is None or chunk >= pieces.shape[0]:
        out = model(pieces)
        _check_tensor(out)
        return out
    outs = []
    for part in pieces.split(chunk):
        out = model(part)
        _check_tensor(out)
        outs.append(out)
    return torch.cat(outs, dim=0)


def _check_tensor(out: object) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError("model must return a tensor (B×N×C tokens or B×C×h×w maps), got "
                        f"{type(out).__name__}; wrap it, e.g. lambda x: model(x).last_hidden_state")


def _to_feature_map(out: torch.Tensor, plan: _ScalePlan, batch: int, num_prefix_token: int,
                    output_shape: str, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backbone output of one scale's pieces → (stitched B×C×H×W map, prefix tokens or None)."""
    nh, nw = plan.splits
    n_pieces = nh * nw * batch
    where = f"scale {index} ({plan.size[0]}x{plan.size[1]} image, {plan.piece[0]}x{plan.piece[1]} pieces)"
    if out.shape[0] != n_pieces:
        raise ValueError(f"model returned batch {out.shape[0]} for {n_pieces} pieces at {where}; the "
                         "model must map B×C×H×W to a batch of B outputs")
    if output_shape == "bchw":
        if out.dim() != 4:
            raise ValueError(f"output_shape='bchw' needs the model to return B×C×h×w maps, got shape "
                             f"{tuple(out.shape)} at {where}; pass output_shape='bnc' for B×N×C tokens")
        return merge_chessboard(out, plan.splits), None
    if out.dim() != 3:
        raise ValueError(f"output_shape='bnc' needs the model to return B×N×C tokens, got shape "
                         f"{tuple(out.shape)} at {where}; pass output_shape='bchw' for feature maps")
    if out.shape[1] <= num_prefix_token:
        raise ValueError(f"model returned {out.shape[1]} tokens at {where}, not more than "
                         f"num_prefix_token={num_prefix_token}")
    prefix = out[:, :num_prefix_token] if num_prefix_token else None
    tokens = out[:, num_prefix_token:]
    n, c = tokens.shape[1], tokens.shape[2]
    grid = token_grid(n, plan.piece)
    if grid is None:
        raise ValueError(f"model returned {n} spatial tokens per piece at {where}, which is not a "
                         f"token grid for that piece shape (a square piece needs a square count); "
                         f"set num_prefix_token to the number of class/register tokens "
                         f"(now {num_prefix_token}) or pass output_shape='bchw' for feature maps")
    gh, gw = grid
    # Tokens are row-major per piece; go straight from (pieces, tokens, C) to the stitched map.
    fmap = tokens.reshape(nh, nw, batch, gh, gw, c).permute(2, 5, 0, 3, 1, 4).reshape(batch, c, nh * gh, nw * gw)
    return fmap, prefix


def _check_request(input: torch.Tensor, split_mode: str, output_shape: str, num_prefix_token: int,
                   split_chunk_size: int | None) -> None:
    """Refuse a malformed :func:`multiscale_forward` request before any compute."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor of shape B×C×H×W, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D B×C×H×W, got shape {tuple(input.shape)}; "
                         "add a batch dim with input.unsqueeze(0) for one image")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}; "
                        "convert it, e.g. input.float() / 255")
    if split_mode is not None and split_mode not in SPLIT_MODES:
        raise ValueError(f"split_mode must be None (upstream's default) or one of "
                         f"{', '.join(map(repr, SPLIT_MODES))}, got {split_mode!r}")
    if output_shape not in ("bnc", "bchw"):
        raise ValueError(f"output_shape must be 'bnc' (model returns B×N×C tokens) or 'bchw' "
                         f"(model returns B×C×h×w maps), got {output_shape!r}")
    if not _is_int(num_prefix_token) or num_prefix_token < 0:
        raise ValueError(f"num_prefix_token must be an int >= 0, got {num_prefix_token!r}")
    if output_shape == "bchw" and num_prefix_token:
        raise ValueError(f"num_prefix_token={num_prefix_token} needs output_shape='bnc'; feature maps "
                         "(output_shape='bchw') have no prefix tokens, pass num_prefix_token=0")
    if split_chunk_size is not None and (not _is_int(split_chunk_size) or split_chunk_size <= 0):
        raise ValueError(f"split_chunk_size must be a positive int (pieces per backbone call) or None, "
                         f"got {split_chunk_size!r}")


def _encode_scale(model: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, plan: _ScalePlan, index: int,
                  split_mode: str, chunk: int | None, num_prefix_token: int,
                  output_shape: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One scale of :func:`multiscale_forward`: resize, grow to whole pieces, split, encode,
    stitch and (``pad``, ``resize_back``) bring back to the requested image's grid. Returns the
    B×C×h×w feature map and the prefix tokens (mean over the pieces) or None."""
    batch = input.shape[0]
    x = _resize(input, plan.size, "bicubic")
    if plan.full != plan.size:
        if split_mode != "pad":
            x = _resize(x, plan.full, "bicubic")
        else:
            x = F.pad(x, (0, plan.full[1] - plan.size[1], 0, plan.full[0] - plan.size[0]))
    out = _run_backbone(model, split_chessboard(x, plan.splits), chunk)
    fmap, prefix = _to_feature_map(out, plan, batch, num_prefix_token, output_shape, index)
    # Feature size the requested (ungrown) image would have had: ceil(size / full · feature),
    # in floating point exactly as the reference computes it (so shapes agree to the token).
    fh, fw = fmap.shape[-2:]
    keep = (math.ceil(plan.size[0] / plan.full[0] * fh), math.ceil(plan.size[1] / plan.full[1] * fw))
    if split_mode == "resize_back":
        fmap = _resize(fmap, keep, "area")
    elif split_mode == "pad":
        fmap = fmap[:, :, :keep[0], :keep[1]]
    if prefix is not None:
        # Mean over the chessboard pieces (piece-major batch layout), accumulated in float32.
        n_pieces = plan.splits[0] * plan.splits[1]
        prefix = prefix.reshape(n_pieces, batch, *prefix.shape[1:]).float().mean(0).to(prefix.dtype)
    return fmap, prefix


def _scale_plans(in_hw: Size2, scales, img_sizes, max_split_size, split_mode: str | None,
                 resize_output_to_idx: int) -> tuple[list[_ScalePlan], str]:
    """Every scale's chessboard and the split mode that applies (checked before any compute)."""
    sizes = _target_sizes(in_hw, scales, img_sizes)
    if not _is_int(resize_output_to_idx) or not -len(sizes) <= resize_output_to_idx < len(sizes):
        raise ValueError(f"resize_output_to_idx must be an int in [{-len(sizes)}, {len(sizes) - 1}] "
                         f"for {len(sizes)} scales, got {resize_output_to_idx!r}")
    piece = in_hw if max_split_size is None else _as_size2(max_split_size, "max_split_size")
    # No split_mode: a call upstream's master accepts gets master's pieces; any other call, and any
    # call naming a split_mode (only dev_any_shape takes one), gets the any-shape rule.
    plans = _master_plan(in_hw, sizes, piece) if split_mode is None else None
    if plans is None:
        return _plan(sizes, piece), split_mode or "resize"
    return plans, "resize"


def multiscale_forward(model: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor,
                       scales: Sequence[float] | None = None,
                       img_sizes: Sequence[int | Sequence[int]] | None = None,
                       max_split_size: int | Sequence[int] | None = None, split_mode: str | None = None,
                       resize_output_to_idx: int = 0, num_prefix_token: int = 0, output_shape: str = "bnc",
                       split_forward: bool = False, split_chunk_size: int | None = None) -> torch.Tensor:
    """Multi-scale features of `input` from `model`, concatenated on channels (S2-Wrapper).

    Args:
        model: callable mapping B×C×H×W images to B×N×C tokens (``output_shape="bnc"``) or
            B×C×h×w maps (``"bchw"``); called on pieces of ``max_split_size``.
        input: B×C×H×W floating-point images (any H, W).
        scales: factors of the input size, e.g. ``[1, 2]`` (sizes ``int(H·s)``, ``int(W·s)``).
        img_sizes: alternatively the image size of every scale, ints (square) or (h, w) pairs.
        max_split_size: side of one piece, an int or (h, w); default the input size (H, W).
            Sizes that are not multiples are resized (``split_mode="resize"``) or zero-padded
            bottom/right (``"pad"``) up to the next multiple.
        split_mode: None (default): as upstream, whose two branches agree wherever every size is
            a multiple of ``max_split_size``. A call the ``master`` branch accepts (square input
            and sizes, each cut into equal pieces) follows master: ceil(size / max_split_size)
            equal pieces, smaller than ``max_split_size`` when the size is not a multiple. Any
            other call follows ``dev_any_shape``'s default, ``"resize"``.
            ``"resize"`` (upstream ``dev_any_shape`` at 809ce65): the grown image's whole
            feature grid is kept; ``"pad"``: the map is cropped back to
            ``ceil(size / grown_size · feature_size)``; ``"resize_back"``: resized as ``"resize"``,
            then the map is area-resized to that same cropped size (upstream's older 31688b1).
        resize_output_to_idx: which scale's feature size the output takes (``-1``: the largest
            scale, most detail).
        num_prefix_token: leading non-spatial tokens (class/register) of each output; averaged
            over a scale's pieces, concatenated over scales and prepended (``"bnc"`` only).
        output_shape: ``"bnc"`` (returns B×(P+h·w)×(S·C)) or ``"bchw"`` (returns B×(S·C)×h×w).
        split_forward: run the backbone on B pieces at a time instead of all pieces of a scale
            at once (less memory, same numbers).
        split_chunk_size: pieces per backbone call; giving it implies chunked calls (default with
            ``split_forward``: the input batch size B).

    Returns:
        Features in `model`'s output dtype; the gradient flows to `model` and `input`.
    """
    _check_request(input, split_mode, output_shape, num_prefix_token, split_chunk_size)
    batch = input.shape[0]
    plans, split_mode = _scale_plans(tuple(input.shape[-2:]), scales, img_sizes, max_split_size, split_mode,
                                     resize_output_to_idx)
    chunk = split_chunk_size if split_chunk_size is not None else (batch if split_forward else None)

    # --- per scale: resize, grow to whole pieces, split, encode, stitch (pad: crop back) --------
    fmaps: list[torch.Tensor] = []
    prefixes: list[torch.Tensor] = []
    for i, plan in enumerate(plans):
        fmap, prefix = _encode_scale(model, input, plan, i, split_mode, chunk, num_prefix_token, output_shape)
        fmaps.append(fmap)
        if prefix is not None:
            prefixes.append(prefix)

    # --- bring every scale to one feature size and concatenate on channels -------------------
    out_hw = tuple(fmaps[resize_output_to_idx].shape[-2:])
    out = torch.cat([_resize(f, out_hw, "area") for f in fmaps], dim=1)
    if output_shape == "bchw":
        return out
    out = out.flatten(2).transpose(1, 2)
    if prefixes:
        out = torch.cat([torch.cat(prefixes, dim=-1), out], dim=1)
    return out


forward = multiscale_forward
