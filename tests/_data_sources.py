"""Test helper (not part of the package): source images with coloured rectangles at known boxes,
reading converted shards back, and checking that a box covers its rectangle."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ps3.data.shards import iter_paired_shard, list_shard_pairs
from ps3.images import load_image

BACKGROUND = (128, 128, 128)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 40, 190),
}


def dropped_counts(output: str) -> dict[str, int]:
    """{reason: count} of a conversion summary's ``dropped N reason: ...`` lines."""
    counts = {}
    for line in output.splitlines():
        if line.startswith("dropped ") and ":" in line:
            count, reason = line[len("dropped "):].split(":")[0].split()
            counts[reason] = int(count)
    return counts


def make_image(path: Path, size: tuple[int, int], rects: list[tuple[str, list[int]]], *, fmt: str = "JPEG",
               orientation: int | None = None) -> Path:
    """An image of ``size`` with a filled rectangle of each named colour at its edge-coordinate box
    (pixels x0..x1-1, y0..y1-1), in the stored pixels; ``orientation`` sets the EXIF tag."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    for colour, (x0, y0, x1, y1) in rects:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, fmt, **kwargs)
    return path


def read_samples(root: Path) -> list[tuple[str, Image.Image, dict, bytes]]:
    """(key, upright image as the trainer decodes it, record, image bytes) of every converted sample."""
    import json

    images, records = list_shard_pairs(root / "images", root / "text_boxes")
    samples = []
    for image_shard, record_shard in zip(images, records):
        for pair in iter_paired_shard(image_shard, record_shard, _fail, strict=True):
            samples.append((pair.key, load_image(pair.image["jpg"]), json.loads(pair.record["json"]),
                            pair.image["jpg"]))
    return samples


def _fail(reason: str, shard: str, key, detail: str = "") -> None:
    raise AssertionError(f"converted shards are damaged: {reason} in {shard} at {key}: {detail}")


def _fraction(pixels: np.ndarray, colour: tuple[int, int, int]) -> float:
    if pixels.size == 0:
        return 0.0
    distance = np.abs(pixels.astype(int) - np.array(colour)).max(axis=-1)
    return float((distance < 45).mean())


def assert_box_covers(image: Image.Image, box, colour_name: str, margin: int = 2) -> None:
    """The box's inside (less ``margin`` px) is the colour; a band ``margin``..``margin + 2`` px
    outside it is not (where the image has room)."""
    colour = COLOURS[colour_name]
    array = np.asarray(image)
    height, width = array.shape[:2]
    x0, y0, x1, y1 = box
    inner = array[int(np.ceil(y0)) + margin:int(y1) - margin, int(np.ceil(x0)) + margin:int(x1) - margin]
    assert inner.size and _fraction(inner, colour) > 0.95, (colour_name, box, _fraction(inner, colour))
    outer = margin + 2
    strips = [array[max(int(y0) - outer, 0):max(int(y0) - margin, 0), int(x0):int(x1)],
              array[min(int(np.ceil(y1)) + margin, height):min(int(np.ceil(y1)) + outer, height), int(x0):int(x1)],
              array[int(y0):int(y1), max(int(x0) - outer, 0):max(int(x0) - margin, 0)],
              array[int(y0):int(y1), min(int(np.ceil(x1)) + margin, width):min(int(np.ceil(x1)) + outer, width)]]
    for strip in strips:
        assert _fraction(strip, colour) < 0.05, (colour_name, box, "colour outside the box")


def train_two_steps(run_cli, data: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """Two steps of ``tiny-synthetic`` training on converted shards (CPU, no workers), run with the
    ``run_cli`` fixture as ``python -m ps3.train``."""
    return run_cli("--model", "tiny-synthetic", "--train-data-image", data / "images", "--train-data-text-box",
                   data / "text_boxes", "--output-dir", run_dir, "--steps", "2", "--batch-size", "2",
                   "--save-every-steps", "2", "--log-every", "1", "--workers", "0", "--device", "cpu", "--seed", "0",
                   "--quiet", module="ps3.train")
