"""The ``ps3`` command line: ``encode``, ``data synthetic``, ``train``, ``export``, ``bench``, ``extract``,
``compare``.

User mistakes (a missing file, an unknown model, a bad flag) end with a one-line reason and exit
code 2; an internal bug shows its traceback (see :mod:`ps3.runtime`). ``PS3_DEBUG=1`` shows the
traceback of user mistakes too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import __version__
from .runtime import (DTYPE_NAMES, LoadedModel, Measurement, UserError, load_model, measure,
                      parse_device, run_command, user_input)
from .encoder.vision import PS3VisionOutput


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
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--image-size", type=int, help="resize images to this size (default: the model's preprocessor)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the trunk from CUDA graphs (faster on a GPU after the first image of each size)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_run_encode)


def _look_kwargs(args) -> dict:
    if args.looks is not None:
        return {"num_look_close": args.looks}
    if args.tokens is not None:
        return {"num_token_look_close": args.tokens}
    return {"num_look_close": "all" if args.all else 1}


def encode_pixels(loaded: LoadedModel, pixel_values: torch.Tensor, prompt: torch.Tensor | None = None,
                  **look_kwargs) -> tuple[PS3VisionOutput, Measurement]:
    """Encode preprocessed images (``loaded.pixel_values``) with a loaded model: its output, and the
    time and peak memory of the encode."""
    with measure(loaded.device) as cost, torch.no_grad():
        out = loaded.vision(pixel_values, prompt=prompt, **look_kwargs)
    return out, cost


def save_heatmaps(image_path: str | Path, out: PS3VisionOutput, scales: list[int], outdir: str | Path,
                  prompt_text: str | None = None) -> list[Path]:
    """One selection heatmap PNG per high-res scale, named ``<image stem>_scale<k>.png``."""
    from .viz import overlay_selection

    name, outdir = Path(image_path), Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    per_scale = [int(m.sum()) for m in out.selection_maps] if out.selection_maps else []
    written = []
    for scale in range(1, len(out.selection_probs) + 1):
        title = f"{name.name} | scale {scale} ({scales[scale]} px)"
        if per_scale:
            title += f": {per_scale[scale - 1]} patches selected"
        title += f"\nprompt: {prompt_text!r}" if prompt_text else "\nbottom-up (no prompt)"
        written.append(outdir / f"{name.stem}_scale{scale}.png")
        overlay_selection(image_path, out, scale=scale, title=title).save(written[-1])
    return written


def _output_tensors(k: int, out: PS3VisionOutput, loaded: LoadedModel, feature_maps: bool) -> dict[str, torch.Tensor]:
    tensors = {f"{k}.last_hidden_state": out.last_hidden_state[0].float().cpu()}
    for i, p in enumerate(out.selection_probs):
        tensors[f"{k}.selection_probs.{i}"] = p[0].float().cpu()
    for i, m in enumerate(out.selection_maps or []):
        tensors[f"{k}.selection_maps.{i}"] = m[0].cpu()
    if feature_maps and out.selection_maps:
        maps = loaded.vision.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
        for i, fm in enumerate(maps):
            tensors[f"{k}.feature_maps.{i}"] = fm[0].float().cpu()
    return tensors


def _load_for_encode(args) -> tuple[LoadedModel, torch.Tensor | None]:
    """Everything the user named, checked before the first image is encoded."""
    for path in args.images:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    with user_input("--device"):
        device = parse_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs --device cuda")
    with user_input("--model"):
        loaded = load_model(args.model, device=device, dtype=args.dtype, text=args.prompt is not None)
    loaded.vision.vision_model.use_cuda_graphs = args.cuda_graphs
    flag = "--looks" if args.looks is not None else "--tokens" if args.tokens is not None else None
    if flag is not None:
        with user_input(flag):  # the look plan checks the number without running the model
            size = args.image_size or loaded.processor.image_size
            height, width = (size, size) if isinstance(size, int) else size
            loaded.vision.count_tokens(height, width, **_look_kwargs(args))
    prompt = loaded.prompts([args.prompt]) if args.prompt is not None else None
    return loaded, prompt


def _run_encode(args) -> int:
    from safetensors.torch import save_file
    from tqdm import tqdm

    loaded, prompt = _load_for_encode(args)
    tensors, rows = {}, []
    for k, path in enumerate(tqdm(args.images, desc="encoding", disable=args.quiet or len(args.images) < 2)):
        with user_input(str(path)):  # an unreadable image file
            pixels = loaded.pixel_values(path, args.image_size)
        out, cost = encode_pixels(loaded, pixels, prompt, **_look_kwargs(args))
        per_scale = [int(m.sum()) for m in out.selection_maps] if out.selection_maps else []
        rows.append((Path(path).name, per_scale, out.last_hidden_state.shape[1], cost.seconds, cost.peak_bytes / 2**20))
        tensors.update(_output_tensors(k, out, loaded, args.feature_maps))
        if args.viz:
            save_heatmaps(path, out, loaded.vision.config.ps3_scales, args.viz, args.prompt)
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
            print(f"heatmaps written to {os.path.join(os.path.normpath(args.viz), '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ps3", description="High-resolution vision encoding with PS3 and S2.")
    parser.add_argument("--version", action="version", version=f"ps3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_encode(sub)
    from .bench import register as register_bench
    from .train.commands import register as register_training

    register_training(sub)  # train, export (webdataset is imported only when they run)
    from .data.commands import register as register_data  # ps3 data: synthetic, converters, check, show
    register_data(sub)
    register_bench(sub)
    from .extract.commands import register as register_extract  # ps3 extract
    register_extract(sub)
    from .compare import register as register_compare  # ps3 compare
    register_compare(sub)
    from .random_models import register as register_init  # ps3 init random-4k OUT
    register_init(sub)
    from .serve.commands import register as register_serve  # ps3 serve (fastapi is imported only when it runs)
    register_serve(sub)
    from .mllm.commands import register as register_mllm  # ps3 mllm train|chat|eval|toy-data
    register_mllm(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 0
    return run_command(args.func, args, prog=f"ps3 {args.command}")


if __name__ == "__main__":
    sys.exit(main())
