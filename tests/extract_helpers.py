"""Shared pieces of the ``ps3 extract`` tests: real image files and real image shards."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from golden import MODEL_DIR
from tolerances import SAME_KERNELS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def jpeg_bytes(rng: np.random.Generator, low: int = 24, high: int = 96) -> bytes:
    width, height = (int(v) for v in rng.integers(low, high, 2))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def make_images(directory: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``count`` small JPEGs of mixed sizes, half of them in a subdirectory."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / ("sub" if i % 2 else "") / f"{prefix}{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(rng))
        paths.append(path)
    return paths


def make_image_shards(directory: Path, shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Image webdataset shards (``KEY.jpg``), keys ``s{shard}_{n}``."""
    from ps3.data.writer import ShardWriter

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        with ShardWriter(directory / f"image_{s:05d}.tar") as writer:
            for n in range(per_shard):
                writer.write({"__key__": f"s{s}_{n:03d}", "jpg": jpeg_bytes(rng)})
        paths.append(directory / f"image_{s:05d}.tar")
    return paths


def environment() -> dict[str, str]:
    return {**SAME_KERNELS, **os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def fast_model(directory: Path) -> Path:
    """The fixture's architecture without the high-res selection module (random weights): its
    1512-px bicubic resize dominates the fixture model's time on a CPU, and tests that encode many
    images only need the pipeline around the model."""
    import torch

    from ps3 import PS3VisionConfig, PS3VisionModel

    config = PS3VisionConfig.from_pretrained(MODEL_DIR)
    config.highres_selection_feature = False
    torch.manual_seed(0)
    PS3VisionModel(config).save_pretrained(directory)
    return directory
