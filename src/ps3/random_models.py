"""``ps3 init random-4k OUT``: a random-weight model directory with a published geometry, offline.

What a PS3 call returns — the token count of every scale, the shapes, the selection maps' grids —
depends on the geometry (scales, patch size, selection budget), not on the weights or the trunk's
width. ``random-4k`` has PS3-4K-SigLIP2's geometry (scales 378 / 756 / 1512 / 3780 px, patch 14,
``max_select_num`` 2560, the same budget split) on a tiny trunk and selection module, so its
counts are the published model's (at 3780 px: 729 low-res tokens, 2,560 per look, 88,209 for
``"all"``) and a one-look encode of a 4K image takes seconds on a CPU; its features mean nothing.
``random-1.5k`` is the same for PS3-1.5K-SigLIP2.

It is written as an ordinary model directory (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), not offered as a special name inside ``from_pretrained``: then
every command and API that takes a model (``ps3 encode --model``, ``ps3 extract``,
``PS3VisionModel.from_pretrained``) takes it unchanged, and a model name never means two things.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import PS3VisionConfig
from .registry import PUBLISHED, SO400M_MLP_RATIO, preprocessor_dict

__all__ = ["RANDOM_MODELS", "random_config", "write_random_model", "register"]

#: ``ps3 init`` name → the published configuration whose geometry it copies.
RANDOM_MODELS = {"random-4k": "PS3-4K-SigLIP2", "random-1.5k": "PS3-1.5K-SigLIP2"}


def random_config(name: str, width: int = 64, depth: int = 2) -> PS3VisionConfig:
    """The vision config of ``name`` (see :data:`RANDOM_MODELS`): the published scales, patch and
    budget on a ``width`` × ``depth`` trunk (one head per 64 channels) and a small selection module."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}: pass one of {', '.join(RANDOM_MODELS)}")
    for arg, value in (("width", width), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if width % 64:
        raise ValueError(f"width must be a multiple of 64 (one attention head per 64 channels), got {width}")
    published = PUBLISHED[RANDOM_MODELS[name]]
    vit = dict(patch_size=14, embed_dim=width, depth=depth, num_heads=width // 64, mlp_ratio=SO400M_MLP_RATIO,
               class_token=False, global_pool="map", img_size=published.ps3_scales[0])
    return PS3VisionConfig(model_name=f"{name}_w{width}_d{depth}", vit=vit, hidden_size=width, pool="map",
                           ps3_scales=list(published.ps3_scales), max_select_num=published.max_select_num,
                           select_based_on_layer=sorted({0, depth // 3, 2 * depth // 3, depth - 1}),
                           highres_selection_module_hidden_dim=32, highres_selection_module_out_dim=32)


def write_random_model(name: str, out: str | Path, *, width: int = 64, depth: int = 2, seed: int = 0) -> Path:
    """Write ``name`` with random weights (from ``seed``) to the directory ``out``; returns it."""
    import torch

    from .encoder.vision import PS3VisionModel

    config = random_config(name, width, depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PS3VisionModel(config)
    out = Path(out)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(config.ps3_scales[-1]), indent=2))
    return out


def _run(args: argparse.Namespace) -> int:
    from .encoder.vision import PS3VisionModel
    from .runtime import UserError, user_input

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file: pass a directory to write the model into")
    if (out / "config.json").exists() and not args.overwrite:
        raise UserError(f"{out} already holds a model (config.json): pass --overwrite to replace it")
    with user_input("--width/--depth"):
        random_config(args.name, args.width, args.depth)
    write_random_model(args.name, out, width=args.width, depth=args.depth, seed=args.seed)
    if not args.quiet:
        model = PS3VisionModel.from_pretrained(out)  # the counts of the files written, as a user loads them
        side = model.config.ps3_scales[-1]
        one = model.count_tokens(side, side, num_look_close=1)
        every = model.count_tokens(side, side, num_look_close="all")
        print(f"wrote {args.name} to {out}: random weights, {RANDOM_MODELS[args.name]}'s geometry "
              f"(scales {'/'.join(map(str, model.config.ps3_scales))}, patch 14, "
              f"max_select_num {model.config.max_select_num})")
        print(f"tokens of a {side} x {side} image: low-res {one.low_res:,}; one look {one.low_res:,} + "
              f"{sum(one.per_scale):,} = {one.total:,}; all {every.low_res:,} + {sum(every.per_scale):,} = "
              f"{every.total:,}")
    return 0


def register(sub) -> None:
    """Add ``init`` to the ``ps3`` parser's sub-parsers."""
    p = sub.add_parser("init", help="write a random-weight model with a published geometry (offline)",
                       description="Write a model directory with random weights and the geometry of a published "
                                   "checkpoint (scales, patch size, selection budget) on a tiny trunk: its token "
                                   "counts and shapes are the published model's, its features mean nothing.")
    p.add_argument("name", choices=list(RANDOM_MODELS), help="random-4k: PS3-4K-SigLIP2's geometry; "
                                                             "random-1.5k: PS3-1.5K-SigLIP2's")
    p.add_argument("out", help="directory to write config.json, model.safetensors, preprocessor_config.json")
    p.add_argument("--width", type=int, default=64, help="trunk width, a multiple of 64 (default 64)")
    p.add_argument("--depth", type=int, default=2, help="trunk depth (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_run)
