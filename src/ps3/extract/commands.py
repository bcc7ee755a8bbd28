"""``ps3 extract``: the command line of :func:`ps3.extract.extract`."""
from __future__ import annotations

import json
import sys

from ..runtime import DTYPE_NAMES

__all__ = ["register"]

_EPILOG = """examples:
  ps3 extract photos/ --model nvidia/PS3-4K-SigLIP2 --out feats/ --tokens 1280 --dtype bfloat16 --device cuda
  torchrun --nproc_per_node 8 -m ps3.cli extract 'shards/image_{00000..00999}.tar' --model M --out feats/ --all

a rerun of the same command resumes (finished shards are kept); --overwrite redoes everything."""


def register(sub) -> None:
    """Add the ``extract`` sub-command to the ``ps3`` parser's sub-parsers."""
    import argparse

    p = sub.add_parser("extract", help="encode a whole dataset into feature shards (batched, resumable, torchrun)",
                       description="Encode every image of INPUT into tar shards of features under --out "
                                   "(OUT/part-000000.tar, ... and OUT/index.json). Decoding runs in DataLoader "
                                   "workers; under torchrun every rank takes its own share.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a directory of images, a text file listing image paths, an image, or image webdataset "
                        "shards (a .tar, a directory of .tar, a brace pattern like 'd/x_{0000..0099}.tar')")
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors) or hub id")
    p.add_argument("--out", required=True, help="output directory for the shards and index.json")
    looks = p.add_mutually_exclusive_group()
    looks.add_argument("--looks", type=int, help="number of looks (each selects up to max_select_num patches); "
                                                 "default 1, 0 keeps only the low-res tokens")
    looks.add_argument("--tokens", type=int, help="number of high-res tokens to encode per image")
    looks.add_argument("--all", action="store_true", help="encode every high-res patch")
    p.add_argument("--prompt", help="text that steers the selection of every image (needs a text tower)")
    p.add_argument("--prompts", metavar="FILE.jsonl",
                   help='per-image prompts: one {"key": ..., "prompt": ...} per line (others use --prompt, or none)')
    p.add_argument("--layers", type=int, default=1, help="keep the hidden states of this many last layers (default 1)")
    p.add_argument("--feature-maps", action="store_true", help="also store per-scale feature maps")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank its LOCAL_RANK GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--workers", type=int, help="decoding processes (default: up to 8, one less than the CPUs)")
    p.add_argument("--image-size", type=int, help="resize images to this size (default: the model's preprocessor)")
    p.add_argument("--max-pixels", type=int, help="skip images with more pixels than this (default 16384*16384)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per output shard for image files (each input .tar gives one shard); default 1000")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="delete earlier output in --out and redo everything")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .run import extract

    summary = extract(args.inputs, args.out, model=args.model, looks=args.looks, tokens=args.tokens,
                      all_patches=args.all, prompt=args.prompt, prompts=args.prompts, layers=args.layers,
                      dtype=args.dtype, device=args.device, batch_size=args.batch_size, workers=args.workers,
                      feature_maps=args.feature_maps, strict=args.strict, overwrite=args.overwrite,
                      max_pixels=args.max_pixels, shard_size=args.shard_size, image_size=args.image_size,
                      progress=not args.quiet)
    if not args.quiet and not summary.get("partial"):
        skipped = sum(summary["skipped"].values())
        rate = summary["images"] / summary["seconds"] if summary["seconds"] else 0.0
        print(f"{summary['images']} images, {summary['tokens']} tokens in {summary['shards']} shards "
              f"({summary['resumed_shards']} kept from an earlier run), {skipped} skipped "
              f"{json.dumps(summary['skipped'])}, {summary['seconds']:.1f} s ({rate:.1f} images/s) -> {args.out}",
              file=sys.stdout)
    return 0
