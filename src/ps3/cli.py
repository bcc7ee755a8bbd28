"""The ``ps3`` command line: ``encode``, ``data synthetic``, ``train``, ``export``, ``bench``.

User mistakes (a missing file, an unknown model, a bad flag) end with a one-line reason and a
non-zero exit code, never a traceback. ``PS3_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="encode images with a PS3 model; write features and selection heatmaps",
                       description="Encode each image: low-res pass, patch selection (bottom-up, or top-down from "
                                   "--prompt), high-res encoding of the selected patches. Writes features to "
                                   "--out (safetensors) and one heatmap PNG per image and scale to --viz.")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors) or hub id")
    p.add_argument("--prompt", help="text that steers the selection (needs a text tower and tokenizer in --model)")
    looks = p.add_mutually_exclusive_group()
    looks.add_argument("--looks", type=int, help="number of looks (each selects up to max_select_num patches)")
    looks.add_argument("--tokens", type=int, help="number of high-res tokens to encode")
    looks.add_argument("--all", action="store_true", help="encode every high-res patch")
    p.add_argument("--out", help="write features to this .safetensors file")
    p.add_argument("--feature-maps", action="store_true", help="also write per-scale feature maps to --out")
    p.add_argument("--viz", help="write selection heatmaps (PNG) into this directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--image-size", type=int, help="resize images to this size (default: the model's preprocessor)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the trunk from CUDA graphs (faster on a GPU after the first image of each size)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_run_encode)


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run_encode(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .processor import PS3ImageProcessor
    from .vision import PS3VisionModel

    for path in args.images:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but CUDA is not available")
    model = PS3VisionModel.from_pretrained(args.model, dtype=args.dtype, device=device)
    if args.cuda_graphs:
        if device.type != "cuda":
            raise UserError("--cuda-graphs needs --device cuda")
        model.vision_model.use_cuda_graphs = True
    from .hub import resolve_model_dir

    directory = resolve_model_dir(args.model)
    if (directory / "preprocessor_config.json").is_file():
        processor = PS3ImageProcessor.from_pretrained(directory)
    else:
        processor = PS3ImageProcessor(image_size=model.config.ps3_scales[-1])
    prompt = None
    if args.prompt is not None:
        from .text import PS3TextModel
        from .tokenizer import PS3Tokenizer

        if not (directory / "tokenizer_config.json").is_file():
            raise UserError(f"--prompt needs a tokenizer: {directory} has no tokenizer_config.json")
        tokenizer = PS3Tokenizer.from_pretrained(directory)
        text = PS3TextModel.from_pretrained(directory, dtype=args.dtype, device=device)
        with torch.no_grad():
            prompt = text(tokenizer([args.prompt]).to(device)).prompt
    kwargs = {"num_look_close": 1}
    if args.looks is not None:
        kwargs = {"num_look_close": args.looks}
    elif args.tokens is not None:
        kwargs = {"num_token_look_close": args.tokens}
    elif args.all:
        kwargs = {"num_look_close": "all"}
    tensors, rows = {}, []
    from tqdm import tqdm

    for k, path in enumerate(tqdm(args.images, desc="encoding", disable=args.quiet or len(args.images) < 2)):
        pixels = processor(path, image_size=args.image_size)["pixel_values"][0][None].to(device, getattr(torch, args.dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(pixels, prompt=prompt, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        per_scale = [int(m.sum()) for m in out.selection_maps] if out.selection_maps else []
        rows.append((Path(path).name, per_scale, out.last_hidden_state.shape[1], seconds, _peak_memory_mb(device)))
        tensors[f"{k}.last_hidden_state"] = out.last_hidden_state[0].float().cpu()
        for i, p in enumerate(out.selection_probs):
            tensors[f"{k}.selection_probs.{i}"] = p[0].float().cpu()
        for i, m in enumerate(out.selection_maps or []):
            tensors[f"{k}.selection_maps.{i}"] = m[0].cpu()
        if args.feature_maps and out.selection_maps:
            maps = model.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
            for i, fm in enumerate(maps):
                tensors[f"{k}.feature_maps.{i}"] = fm[0].float().cpu()
        if args.viz:
            from .viz import overlay_selection

            outdir = Path(args.viz)
            outdir.mkdir(parents=True, exist_ok=True)
            for scale in range(1, len(out.selection_probs) + 1):
                title = f"{Path(path).name} | scale {scale} ({model.config.ps3_scales[scale]} px)"
                if per_scale:
                    title += f": {per_scale[scale - 1]} patches selected"
                title += f"\nprompt: {args.prompt!r}" if args.prompt else "\nbottom-up (no prompt)"
                overlay_selection(path, out, scale=scale, title=title).save(outdir / f"{Path(path).stem}_scale{scale}.png")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, args.out,
                  metadata={"images": "\n".join(str(p) for p in args.images), "prompt": args.prompt or ""})
    if not args.quiet:
        print(f"{'image':<28} {'tokens per high-res scale':<28} {'total':>7} {'time s':>8} {'peak MiB':>9}")
        for name, per_scale, total, seconds, mem in rows:
            print(f"{name[:28]:<28} {str(per_scale):<28} {total:>7} {seconds:>8.3f} {mem:>9.0f}")
        if args.out:
            print(f"features written to {args.out}")
        if args.viz:
            print(f"heatmaps written to {args.viz}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ps3", description="High-resolution vision encoding with PS3 and S2.")
    parser.add_argument("--version", action="version", version=f"ps3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_encode(sub)
    from .bench import register as register_bench
    from .train.cli import register as register_training

    register_training(sub)  # train, export, data synthetic (webdataset is imported only when they run)
    register_bench(sub)
    from .extract.cli import register as register_extract  # ps3 extract (issue 16)
    register_extract(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ps3: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, PermissionError, OSError) as exc:
        if os.environ.get("PS3_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ps3 {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
