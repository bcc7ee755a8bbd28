"""What every strategy shares: the plan's dataclasses, parameter checks, and the encoding steps
(render a view, run the backbone, fold tokens) that the strategies compose (design §7).

A :class:`View` is one image the backbone sees, described as operations on the source image:
resize the whole image to ``resize`` (h, w), take the ``window`` (top, left, h, w) of the result
(parts outside it are filled with ``fill``: padding; a window inside it: a crop), cut it into a
``grid`` of equal tiles. A :class:`Segment` is a run of output rows: feature tokens of a view
(``grid`` tokens in row-major order, covering ``box`` of the source image) or learned
separator rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..s2 import split_chessboard

Size = tuple[int, int]
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in source pixels


@dataclass(frozen=True)
class View:
    """One resized / cropped / padded image, cut into ``grid`` tiles of ``tile`` pixels."""

    name: str
    resize: Size  # (h, w) the whole source image is resized to
    window: tuple[int, int, int, int]  # (top, left, h, w) taken from the resized image; outside = fill
    grid: Size  # (rows, cols) of tiles cut from the window
    fill: float = 0.0  # padding value, in the [0, 1] units encode's image uses
    of: int = -1  # -1: made from the source image; i: made from view i's window instead
    encoded: bool = True  # False: an intermediate image other views are made from

    @property
    def tile(self) -> Size:
        return self.window[2] // self.grid[0], self.window[3] // self.grid[1]

    @property
    def passes(self) -> int:
        return self.grid[0] * self.grid[1] if self.encoded else 0

    def span(self, height: int, width: int) -> Box:
        """The window in source coordinates, padding included (it may reach outside the image)."""
        top, left, h, w = self.window
        sy, sx = height / self.resize[0], width / self.resize[1]
        return left * sx, top * sy, (left + w) * sx, (top + h) * sy

    def source_box(self, height: int, width: int) -> Box:
        """The part of the source image the window shows (padding excluded)."""
        top, left, h, w = self.window
        sy, sx = height / self.resize[0], width / self.resize[1]
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + h, self.resize[0]), min(left + w, self.resize[1])
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy


@dataclass(frozen=True)
class Segment:
    """A run of ``rows`` output rows: ``kind`` "features" (a ``grid`` of tokens over ``box`` of the
    source, row-major; ``view`` the view they come from) or "separator" (learned rows named
    ``name``). ``row_separator``: the learned row that follows every token row of the grid
    (LLaVA-NeXT's newline, InternLM-XComposer's ``sub_GN``), counted in ``rows``."""

    kind: str
    name: str
    rows: int
    grid: Size = (0, 0)
    box: Box = (0.0, 0.0, 0.0, 0.0)
    view: int = -1
    row_separator: str | None = None

    @property
    def num_features(self) -> int:
        return self.grid[0] * self.grid[1] if self.kind == "features" else 0


@dataclass(frozen=True)
class Plan:
    """Everything a strategy will do to one image, computed without running anything.

    ``num_tokens``: rows the LLM receives for the image (feature tokens plus learned separator
    rows); ``num_text_tokens``: tokenizer tokens the original wraps around them;
    ``backbone_passes``: backbone forwards at its native input size; ``grid``: the strategy's
    tile grid (rows, cols) where it has one; ``segments``: the output rows in order."""

    strategy: str
    height: int
    width: int
    params: tuple[tuple[str, Any], ...]
    views: tuple[View, ...]
    segments: tuple[Segment, ...]
    num_tokens: int
    num_text_tokens: int
    backbone_passes: int
    grid: Size | None = None
    notes: str = ""

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    @property
    def separator_rows(self) -> int:
        return sum(s.rows for s in self.segments if s.kind == "separator")


@dataclass
class Layout:
    """What :func:`ps3.strategies.encode` returned, row by row: the plan's segments (and, for
    content-dependent strategies, which cells of each segment's grid became tokens)."""

    plan: Plan
    segments: tuple[Segment, ...]
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # segment index → (gh, gw) bool


# ------------------------------------------------------------------------------------------ checks
def check_int(name: str, value: Any, low: int = 1, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{hint}, got {value!r}")
    return int(value)


def check_size(height: Any, width: Any) -> Size:
    return check_int("height", height, hint=" (pixels)"), check_int("width", width, hint=" (pixels)")


def resolve_params(strategy: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{strategy} takes no parameter {unknown[0]!r}; its parameters are "
                         f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())}")
    return {**defaults, **given}


def check_multiple(name: str, value: int, of: int, of_name: str) -> None:
    if value % of:
        raise ValueError(f"{name} must be a multiple of {of_name}={of}, got {value}; pass e.g. "
                         f"{max(of, value // of * of)}")


def tokens_per_side(tile: int, patch_size: int, fold: int = 1) -> int:
    """Token rows of a ``tile`` px square after patchifying and a fold×fold merge (both exact)."""
    if tile % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the {tile} px tiles; pass a backbone patch "
                         f"size that divides {tile} (14 for the originals)")
    side = tile // patch_size
    if side % fold:
        raise ValueError(f"a {tile} px tile gives {side}x{side} patches of {patch_size} px, not a multiple of the "
                         f"{fold}x{fold} merge; pass a patch_size with {tile} // patch_size a multiple of {fold}")
    return side // fold


def squash(name: str, size: Size, grid: Size = (1, 1)) -> View:
    """A view that squashes the whole image to ``size`` (h, w) and cuts ``grid`` tiles."""
    return View(name, size, (0, 0, size[0], size[1]), grid)


def full_box(height: int, width: int) -> Box:
    return 0.0, 0.0, float(width), float(height)


# ------------------------------------------------------------------------------------------ encoding
def as_image(image: Any) -> torch.Tensor:
    """(3, H, W) or (1, 3, H, W) floating-point values in [0, 1] → (1, 3, H, W)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a (3, H, W) float tensor with values in [0, 1], got {type(image).__name__}; "
                        "load one with ps3.strategies.load_image_tensor(path)")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 3) or not image.is_floating_point():
        raise ValueError(f"image must be one (3, H, W) or (1, 3, H, W) float image in [0, 1], got "
                         f"{tuple(image.shape)} {image.dtype}; encode images one at a time")
    return image


def resize_antialiased_fp32(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Antialiased bicubic resize computed in float32 (as Pillow's default resize), clamped to
    [0, 1] and returned in the input's dtype: how the originals' image pipelines resize. (The
    encoder's own resize, :mod:`ps3.encoder.selection_features`, is plain bicubic in the input dtype
    as upstream's model does.)"""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 1).to(image.dtype)


def window(image: torch.Tensor, views: tuple[View, ...], index: int,
           cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """View ``index``'s window (1, 3, h, w): its source (the image, or another view's window, taken
    from ``cache`` when there) resized, then cropped and/or padded."""
    view = views[index]
    if view.of < 0:
        source = image
    elif cache is not None and view.of in cache:
        source = cache[view.of]
    else:
        source = window(image, views, view.of, cache)
        if cache is not None:
            cache[view.of] = source
    top, left, h, w = view.window
    rh, rw = view.resize
    inside = top >= 0 and left >= 0 and top + h <= rh and left + w <= rw
    if inside and rh * rw > 4 * h * w:
        return _crop_then_resize(source, view)
    x = resize_antialiased_fp32(source, view.resize)
    # Negative pads crop, positive pads add `fill`: one F.pad does both.
    return F.pad(x, (-left, left + w - rw, -top, top + h - rh), value=view.fill)


def _crop_then_resize(source: torch.Tensor, view: View, margin: int = 4) -> torch.Tensor:
    """A small crop of a large resize (LLaVA-S2's centre crop of an 8:1 panorama resized to
    1008 × 8064, or of a 1:400 strip to 1008 × 403,200) made without the large resize: the source
    region under the window, plus ``margin`` output pixels for the filter, is resized alone. The
    same pixels up to the filter's edge handling and a sub-pixel shift of the footprint."""
    sh, sw = source.shape[-2:]
    rh, rw = view.resize
    top, left, h, w = view.window
    t0, l0 = max(top - margin, 0), max(left - margin, 0)
    t1, l1 = min(top + h + margin, rh), min(left + w + margin, rw)
    y0, y1 = math.floor(t0 * sh / rh), max(math.ceil(t1 * sh / rh), math.floor(t0 * sh / rh) + 1)
    x0, x1 = math.floor(l0 * sw / rw), max(math.ceil(l1 * sw / rw), math.floor(l0 * sw / rw) + 1)
    out = resize_antialiased_fp32(source[..., y0:y1, x0:x1], (t1 - t0, l1 - l0))
    return out[..., top - t0:top - t0 + h, left - l0:left - l0 + w]


def render(image: torch.Tensor, views: tuple[View, ...], index: int,
           cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """View ``index``'s tiles: (rows·cols, 3, tile_h, tile_w), row-major; its window goes into
    ``cache`` for the views made from it."""
    x = window(image, views, index, cache)
    if cache is not None:
        cache[index] = x
    return split_chessboard(x, views[index].grid)


def encode_views(plan: "Plan", backbone: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                 patch_size: int) -> list[torch.Tensor | None]:
    """Backbone maps (tiles, gh, gw, C) of every encoded view (None for the others); views with
    equal tiles go through the backbone in one call."""
    image = as_image(image)
    if tuple(image.shape[-2:]) != (plan.height, plan.width):
        raise ValueError(f"the plan is for a {plan.height}x{plan.width} image but image is "
                         f"{image.shape[-2]}x{image.shape[-1]}; plan(name, height, width) with this image's size")
    cache: dict[int, torch.Tensor] = {}
    tiles = {i: render(image, plan.views, i, cache) for i, v in enumerate(plan.views) if v.encoded}
    out: list[torch.Tensor | None] = [None] * len(plan.views)
    for size in dict.fromkeys(v.tile for v in plan.views if v.encoded):
        idx = [i for i, v in enumerate(plan.views) if v.encoded and v.tile == size]
        maps = run_backbone(backbone, torch.cat([tiles[i] for i in idx]), patch_size,
                            f"the {plan.strategy} views {[plan.views[i].name for i in idx]}")
        for i, part in zip(idx, maps.split([plan.views[i].passes for i in idx])):
            out[i] = part
    return out


def run_backbone(backbone: Callable[[torch.Tensor], torch.Tensor], tiles: torch.Tensor, patch_size: int,
                 where: str) -> torch.Tensor:
    """Backbone tokens of ``tiles`` as maps (n, gh, gw, C), checked against the plan's patch size."""
    out = backbone(tiles)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[0] != tiles.shape[0]:
        raise ValueError(f"backbone must map (B, 3, h, w) to (B, N, C) tokens; for {where} it returned "
                         f"{tuple(getattr(out, 'shape', ())) or type(out).__name__} for {tuple(tiles.shape)}")
    gh, gw = tiles.shape[-2] // patch_size, tiles.shape[-1] // patch_size
    if out.shape[1] != gh * gw:
        raise ValueError(f"backbone returned {out.shape[1]} tokens for {where} "
                         f"({tiles.shape[-2]}x{tiles.shape[-1]} px); "
                         f"the plan expects {gh}x{gw} = {gh * gw} with patch_size={patch_size}: plan with the "
                         f"backbone's patch_size and drop class tokens (e.g. lambda x: vit(x)[:, 1:])")
    return out.reshape(out.shape[0], gh, gw, out.shape[2])


def fold(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(n, h, w, C) → (n, h/k, w/k, k²C): each k×k block's cells concatenated row-major (the
    2×2 merge of NVILA, InternVL's pixel shuffle and Qwen2-VL, up to a fixed channel order)."""
    if k == 1:
        return maps
    n, h, w, c = maps.shape
    return maps.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // k, w // k, k * k * c)


def stitch(maps: torch.Tensor, grid: Size) -> torch.Tensor:
    """(rows·cols, h, w, C) tiles, row-major → one (rows·h, cols·w, C) map."""
    rows, cols = grid
    n, h, w, c = maps.shape
    return maps.reshape(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def area_resize(fmap: torch.Tensor, size: Size) -> torch.Tensor:
    """(h, w, C) → (size, C) by area interpolation in float32."""
    if tuple(fmap.shape[:2]) == tuple(size):
        return fmap
    x = fmap.permute(2, 0, 1).unsqueeze(0).float()
    return F.interpolate(x, size=size, mode="area")[0].permute(1, 2, 0).to(fmap.dtype)


def separator_row(separators: Mapping[str, torch.Tensor] | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """The learned separator ``name`` as a (1, C) row (zeros when not given)."""
    c = like.shape[-1]
    if separators is None or name not in separators:
        return like.new_zeros(1, c)
    row = separators[name]
    if not isinstance(row, torch.Tensor) or row.numel() != c:
        raise ValueError(f"separators[{name!r}] must be a tensor of {c} values (the token width), got "
                         f"{tuple(getattr(row, 'shape', ())) or type(row).__name__}")
    return row.reshape(1, c).to(like.dtype)


def with_row_separators(fmap: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """(h, w, C) map → (h·(w+1), C): every token row followed by the separator ``row``."""
    h, w, c = fmap.shape
    return torch.cat([fmap, row.view(1, 1, c).expand(h, 1, c)], dim=1).reshape(h * (w + 1), c)


def features(name: str, grid: Size, box: Box, view: int, row_separator: str | None = None) -> Segment:
    """A features segment; its rows include one separator per token row when ``row_separator``."""
    rows = grid[0] * (grid[1] + (1 if row_separator else 0))
    return Segment("features", name, rows, grid, box, view, row_separator)


def separator(name: str, rows: int = 1) -> Segment:
    return Segment("separator", name, rows)



def assemble(plan: Plan, maps: list[torch.Tensor | None], separators: Mapping[str, torch.Tensor] | None
             ) -> tuple[torch.Tensor, Layout]:
    """The output rows in the plan's segment order: ``maps[i]`` is segment i's (gh, gw, C) map
    (None for separators)."""
    like = next(m for m in maps if m is not None)
    rows = []
    for seg, fmap in zip(plan.segments, maps):
        if seg.kind == "separator":
            rows.append(separator_row(separators, seg.name, like).expand(seg.rows, -1))
        elif seg.row_separator:
            rows.append(with_row_separators(fmap, separator_row(separators, seg.row_separator, like)))
        else:
            rows.append(fmap.reshape(-1, fmap.shape[-1]))
    tokens = torch.cat(rows)
    assert tokens.shape[0] == plan.num_tokens, (tokens.shape, plan.num_tokens)
    return tokens, Layout(plan, plan.segments)


class Strategy:
    """One high-resolution strategy: its defaults (the original's parameter names), ``knob`` (the
    parameter ``ps3 compare`` sets to meet a token budget), planning and encoding."""

    name: str = ""
    defaults: dict[str, Any] = {}
    knob: str | None = None
    separators: tuple[str, ...] = ()  # names of the learned rows encode inserts

    def plan(self, height: int, width: int, **params: Any) -> Plan:
        h, w = check_size(height, width)
        return self._plan(h, w, resolve_params(self.name, self.defaults, params))

    def _plan(self, height: int, width: int, p: dict[str, Any]) -> Plan:
        raise NotImplementedError

    def encode(self, plan: Plan, backbone: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
               separators: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Layout]:
        raise NotImplementedError

    def knob_values(self, height: int, width: int, budget: int, p: dict[str, Any]) -> list[Any]:
        """Values of ``knob`` worth trying for a budget of ``budget`` tokens (``p``: the other parameters)."""
        return []

    def make_plan(self, height: int, width: int, p: dict[str, Any], views: list[View], segments: list[Segment],
                  text_tokens: int, grid: Size | None = None, notes: str = "") -> Plan:
        return Plan(self.name, height, width, tuple(p.items()), tuple(views), tuple(segments),
                    sum(s.rows for s in segments), text_tokens, sum(v.passes for v in views), grid, notes)
