"""``ps3 extract`` against a plain Python loop over the public API, on the same images.

python benchmarks/extract.py [--images 100] [--workers 2] [--batch-size 8] [--device cpu]

Writes ``--images`` JPEGs of mixed sizes (256 to 1536 px a side, seeded) to a temporary directory,
then encodes them twice with one look (``num_look_close=1``), each timed from model loading to
the last file written:

* loop: ``PS3ImageProcessor`` → ``PS3VisionModel`` → ``safetensors.torch.save_file``, one image at a time;
* extract: ``ps3.extract.extract`` (decoding in ``--workers`` processes, ``--batch-size`` images per call).

Two tiny random-weight models with the test fixture's shape (64 wide, 4 layers, scales 56/112/224):
``fixture`` is tests/fixtures/ps3_tiny/model itself (its high-res selection module resizes every
image to 1512 px, which dominates its time on a CPU), ``no-selection-module`` is the same without
that module, so decoding and the pipeline weigh more. Prints images/s for both paths and the ratio.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import ps3
from ps3.extract import extract

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ps3_tiny" / "model"


def write_images(directory: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(256, 1536, 2))
        # Smooth content (a noise image upsampled) compresses like a photo, unlike pure noise.
        small = rng.integers(0, 255, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        path = directory / f"img{i:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], model_dir: Path, out: Path, device: torch.device) -> float:
    start = time.perf_counter()
    model = ps3.PS3VisionModel.from_pretrained(model_dir, device=device)
    processor = ps3.PS3ImageProcessor(image_size=model.config.ps3_scales[-1])
    out.mkdir()
    for path in paths:
        pixels = processor(str(path))["pixel_values"][0][None].to(device)
        with torch.no_grad():
            result, pooled = model.encode_looks_with_pooled(pixels, num_look_close=1)
        tensors = {"last_hidden_state": result.last_hidden_state[0].cpu(), "pooled_output": pooled[0].cpu()}
        tensors.update({f"selection_maps.{i}": m[0].cpu() for i, m in enumerate(result.selection_maps)})
        save_file(tensors, str(out / f"{path.stem}.safetensors"))
    return time.perf_counter() - start


def no_selection_module(directory: Path) -> Path:
    config = ps3.PS3VisionConfig.from_pretrained(FIXTURE)
    config.highres_selection_feature = False
    torch.manual_seed(0)
    ps3.PS3VisionModel(config).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        paths = write_images(root / "images", args.images)
        megapixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in paths) / len(paths) / 1e6
        print(f"{len(paths)} JPEGs, {megapixels:.2f} MP on average; torch threads {torch.get_num_threads()}, "
              f"device {device}, workers {args.workers}, batch size {args.batch_size}")
        models = {"fixture": FIXTURE, "no-selection-module": no_selection_module(root / "fast")}
        print(f"{'model':<22} {'loop img/s':>11} {'extract img/s':>14} {'ratio':>6}")
        for name, model_dir in models.items():
            loop = plain_loop(paths, model_dir, root / f"loop-{name}", device)
            start = time.perf_counter()
            extract(root / "images", root / f"extract-{name}", model=str(model_dir), device=device,
                    workers=args.workers, batch_size=args.batch_size, progress=False)
            fast = time.perf_counter() - start
            print(f"{name:<22} {len(paths) / loop:>11.2f} {len(paths) / fast:>14.2f} {loop / fast:>5.2f}x")


if __name__ == "__main__":
    main()
