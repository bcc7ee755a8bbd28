"""Shared pieces of the ``ps3 extract`` tests: real image files and real image shards."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from golden import MODEL_DIR

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
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def ps3_command(*args) -> list[str]:
    return [sys.executable, "-m", "ps3.cli", "extract", *map(str, args), "--model", str(MODEL_DIR)]


def run_extract(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(ps3_command(*args), capture_output=True, text=True, timeout=300, env=environment())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
