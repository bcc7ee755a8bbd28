"""``ps3 compare IMAGE``: every high-resolution strategy of :mod:`ps3.strategies` on one backbone.

Each strategy runs at its defaults, or with its own knob (``max_tiles``, ``max_num``, ``hd_num``,
``max_pixels``, PS3's ``num_token_look_close``, …) set to come as close to ``--budget`` tokens as
it allows. The command prints one row per strategy — knob, tokens the LLM receives (and text
tokens around them), backbone passes, time and peak memory of the encode — and writes one figure:
per strategy, how many source pixels each token covers over the image (brighter = finer).

Backbones: ``tiny`` (a random 2-layer, 64-wide ViT with patch 14 and a PS3 encoder around it:
seconds on a CPU), ``so400m-random`` (the PS3-4K-SigLIP2 shape with random weights: minutes on a
CPU), or a PS3 model directory / hub id (its trunk for the other strategies, the model for PS3).
The trunk sees each strategy's views at their own sizes (its position table is resampled), as
the ViT of every original does at its native size. Nothing is downloaded for the random ones.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import strategies
from .registry import SCALES_4K, bench_vision_config
from .runtime import UserError, load_model, measure, parse_device, user_input
from .strategies.coverage import token_density
from .viz import colormap

RANDOM_BACKBONES = ("tiny", "so400m-random")
PANEL_WIDTH = 360


@dataclasses.dataclass
class Row:
    """One strategy's result: plan, the knob set (None: defaults), measured time and memory."""

    plan: strategies.Plan
    knob: str | None
    value: Any
    seconds: float
    peak_mib: float
    layout: strategies.Layout


def random_model(spec: str, device: torch.device):
    """A random-weight PS3 vision model: ``tiny`` or ``so400m-random`` (see the module docstring)."""
    from .encoder.vision import PS3VisionModel

    if spec == "tiny":
        config = bench_vision_config("cpu", SCALES_4K, width=64, depth=2)
        config.highres_selection_feature = False  # the 1512 px selection ConvNet would dominate a tiny trunk
    else:
        config = bench_vision_config("so400m", SCALES_4K)
    torch.manual_seed(0)
    model = PS3VisionModel(config)
    with torch.no_grad():  # zero-initialised tables get values too, as ps3 bench does
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.to(device).eval()


def trunk_backbone(vision) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PS3 model's ViT as a plain backbone: (B, 3, h, w) in [0, 1] → (B, h/p · w/p, C)."""
    trunk = vision.vision_model.trunk
    dtype = next(trunk.parameters()).dtype

    def backbone(x: torch.Tensor) -> torch.Tensor:
        return trunk.forward_blocks(trunk.embed((x * 2 - 1).to(dtype)))[0]  # SigLIP's mean = std = 0.5
    return backbone


def strategy_params(name: str, vision) -> dict[str, Any]:
    """The parameters that tie a strategy to this backbone: its patch size (PS3: its geometry)."""
    if name == "ps3":
        from .strategies.ps3 import params_for
        return params_for(vision)
    return {"patch_size": vision.vision_model.patch_size}


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc), so that the next measurement's
    peak counts what its own encode touches rather than reusing an earlier strategy's pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then undercount reused memory
        pass


def run_strategy(name: str, vision, image: torch.Tensor, budget: int | None, device: torch.device,
                 warmup: bool = True) -> Row:
    """Plan (with the knob set for ``budget``), then encode: once untimed (``warmup``: first calls
    on new shapes pay one-time costs), then once measuring time and peak memory."""
    h, w = image.shape[-2:]
    params = strategy_params(name, vision)
    knob, value = (None, None) if budget is None else strategies.knob_for_budget(name, h, w, budget, **params)
    if knob is not None:
        params[knob] = value
    plan = strategies.plan(name, h, w, **params)
    backbone = vision if name == "ps3" else trunk_backbone(vision)
    image = image.to(device)
    if warmup:
        with torch.no_grad():
            strategies.encode(plan, backbone, image)
    if device.type == "cpu":
        _release_free_memory()
    with measure(device) as cost, torch.no_grad():
        tokens, layout = strategies.encode(plan, backbone, image)
    assert tokens.shape[0] == plan.num_tokens
    return Row(plan, knob, value, cost.seconds, cost.extra_bytes / 2 ** 20, layout)


def knob_text(row: Row) -> str:
    if row.knob is None:
        return "defaults"
    return f"{row.knob}={row.value:,}" if isinstance(row.value, int) else f"{row.knob}={row.value}"


def format_table(rows: list[Row]) -> str:
    head = ("strategy", "knob", "tokens", "+text", "passes", "time s", "peak MiB")
    body = [(r.plan.strategy, knob_text(r), f"{r.plan.num_tokens:,}", str(r.plan.num_text_tokens),
             str(r.plan.backbone_passes), f"{r.seconds:.2f}", f"{r.peak_mib:.0f}") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(x, widths))) + " |"
             for x in [head, *body]]
    lines.insert(1, "|" + "|".join("-" * (wd + 1) + (":" if i >= 2 else "-") for i, wd in enumerate(widths)) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the figure
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _shade(ppt: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Colour-map position of pixels per token: log scale, finer = brighter; the map's darkest
    sixth is left out so that the coarsest tokens still read apart from never-seen grey."""
    frac = (np.log(ppt) - np.log(lo)) / max(np.log(hi) - np.log(lo), 1e-9)
    return 1 - frac * 5 / 6


def _panel(photo: Image.Image, row: Row, lo: float, hi: float) -> Image.Image:
    """The photo, greyed, under the colour of log(pixels per token); unseen regions stay dark."""
    density = token_density(row.layout, (photo.height, photo.width))
    seen = density > 0
    ppt = np.where(seen, 1 / np.where(seen, density, 1), hi)
    value = _shade(ppt, lo, hi)
    heat = colormap(value).astype(np.float32)
    # The photo in 12 grey levels: enough to recognise the scene, and a PNG a quarter the size.
    grey = (np.asarray(photo.convert("L"), dtype=np.float32)[..., None] // 22) * 22 + 11
    mixed = np.where(seen[..., None], 0.7 * heat + 0.3 * grey, 0.25 * grey)
    panel = Image.new("RGB", (photo.width, photo.height + 44), (255, 255, 255))
    panel.paste(Image.fromarray(mixed.round().astype(np.uint8)), (0, 44))
    draw = ImageDraw.Draw(panel)
    p = row.plan
    passes = f"{p.backbone_passes} pass" + ("es" if p.backbone_passes > 1 else "")
    draw.text((4, 2), f"{p.strategy}: {p.num_tokens:,} tokens, {passes}", fill=(0, 0, 0), font=_font(15))
    finest = 1 / density.max() if seen.any() else float("inf")
    draw.text((4, 22), f"{knob_text(row)}; finest {finest:,.0f} px/token", fill=(60, 60, 60), font=_font(12))
    return panel


def draw_figure(photo: Image.Image, rows: list[Row], title: str) -> Image.Image:
    """One panel per strategy (two columns) and a colour bar of source pixels per token."""
    size = (PANEL_WIDTH, max(1, round(photo.height * PANEL_WIDTH / photo.width)))
    small = photo.resize(size, Image.Resampling.BICUBIC)
    dens = [token_density(r.layout, (small.height, small.width)) for r in rows]
    values = np.concatenate([1 / d[d > 0] for d in dens if (d > 0).any()])
    lo, hi = float(values.min()), float(values.max()) * 1.001
    panels = [_panel(small, r, lo, hi) for r in rows]
    cols, pad = 2, 8
    ph = panels[0].height
    n_rows = -(-len(panels) // cols)
    fig = Image.new("RGB", (cols * (PANEL_WIDTH + pad) + pad, 36 + n_rows * (ph + pad) + 60), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 8), title, fill=(0, 0, 0), font=_font(16))
    for i, panel in enumerate(panels):
        fig.paste(panel, (pad + (i % cols) * (PANEL_WIDTH + pad), 36 + (i // cols) * (ph + pad)))
    y = 36 + n_rows * (ph + pad) + 6
    bar_w = fig.width - 2 * pad - 20
    ramp = _shade(np.exp(np.linspace(np.log(hi), np.log(lo), bar_w)), lo, hi)  # left: coarse, right: fine
    fig.paste(Image.fromarray(colormap(ramp[None].repeat(14, 0))), (pad + 10, y + 18))
    draw.text((pad + 10, y), "source pixels per token (log scale; dark grey: never seen)", fill=(0, 0, 0),
              font=_font(13))
    for frac in np.linspace(0, 1, 5):
        ppt = float(np.exp(np.log(hi) - frac * (np.log(hi) - np.log(lo))))
        draw.text((pad + 10 + frac * (bar_w - 40), y + 34), f"{ppt:,.0f}", fill=(0, 0, 0), font=_font(12))
    return fig


# ------------------------------------------------------------------------------------------ the command
def _load_vision(spec: str, device: torch.device):
    if spec in RANDOM_BACKBONES:
        return random_model(spec, device)
    with user_input("--backbone"):
        return load_model(spec, device=device).vision


def _run(args: argparse.Namespace) -> int:
    from .images import load_image

    if args.budget is not None and args.budget < 1:
        raise UserError(f"--budget must be a positive number of tokens, got {args.budget}")
    names = args.strategies.split(",") if args.strategies else list(strategies.names())
    with user_input("--strategies"):
        for name in names:
            strategies.get(name)
    with user_input("--device"):
        device = parse_device(args.device)
    with user_input(str(args.image)):
        photo = load_image(args.image)
    image = strategies.load_image_tensor(photo)
    vision = _load_vision(args.backbone, device)
    rows = []
    for name in names:
        try:
            rows.append(run_strategy(name, vision, image, args.budget, device, warmup=not args.no_warmup))
        except ValueError as err:  # a strategy this backbone cannot run (e.g. its patch size)
            print(f"{name}: skipped: {str(err).splitlines()[0]}")
    budget = f"budget {args.budget:,} tokens" if args.budget else "defaults"
    title = f"{Path(args.image).name} ({photo.width}x{photo.height}), backbone {args.backbone}, {budget}"
    print(title)
    print(format_table(rows))
    if rows and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"compare_{Path(args.image).stem}_{args.budget or 'defaults'}.png"
        draw_figure(photo, rows, title).save(path)
        print(f"figure written to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="every high-resolution strategy on one backbone: tokens, passes, time, memory",
                       description="Run S2, Dynamic-S2, InternVL tiling, AnyRes, Qwen2-VL, the 4KHD transform and PS3 "
                                   "on one image with one backbone, at their defaults or with each one's knob set to "
                                   "come closest to --budget tokens; print a table and draw where each spends its "
                                   "tokens (source pixels per token).")
    p.add_argument("image", help="an image file")
    p.add_argument("--backbone", default="tiny",
                   help="tiny (random, seconds on a CPU), so400m-random (random PS3-4K-SigLIP2 shape), or a PS3 "
                        "model directory / hub id (default tiny)")
    p.add_argument("--budget", type=int, help="set each strategy's knob to come closest to this many tokens")
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(strategies.names())}")
    p.add_argument("--out", default="compare", help="directory for the figure (default ./compare; '' for none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-warmup", action="store_true",
                   help="time each strategy's first encode (default: one untimed encode first)")
    p.set_defaults(func=_run)
