"""A synthetic pre-training dataset in the layout of :mod:`ps3.train.loader` (design §5).

Each image is a scene on a noisy, low-saturation background with 2–4 objects. An object is a
shape (circle, square, triangle, diamond, hexagon, star) in a colour (red, green, blue, yellow,
purple, orange) with a texture (solid, striped, dotted); its side is 15–40 % of the image side
and objects overlap little (at most 10 % of the smaller bounding square). No two objects of a
scene share all three attributes, so each local caption ("a red striped circle") names exactly
one object of its scene. The box of an object is the bounding box of its visible pixels in edge
coordinates ``[x0, y0, x1, y1]`` (pixel columns ``x0 … x1-1`` and rows ``y0 … y1-1``). The global
caption lists every object.

Output (:func:`write_synthetic_dataset`)::

    OUT/images/image_00000.tar        KEY.jpg
    OUT/text_boxes/text_box_00000.tar KEY.json = {"text": [...], "box": [...], "global_text": "..."}

Everything is a function of ``seed`` (and the image index): the same call writes byte-identical
shards (through :class:`ps3.data.writer.PairedShardWriter`). The command
``ps3 data synthetic OUT --images N --seed S`` calls :func:`run_from_args`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.hrqa import SHAPES, shape_mask
from ..data.writer import PairedShardWriter, existing_paired_shards, prepare_paired_output
from ..runtime import UserError, user_input

__all__ = [
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "Scene",
    "render_scene",
    "encode_jpeg",
    "sample_key",
    "write_synthetic_dataset",
    "add_arguments",
    "run_from_args",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
TEXTURES = ("solid", "striped", "dotted")

MIN_SIZE = 32  # below this, a 15 % object is a handful of pixels and textures are invisible
_OBJECT_SIDE = (0.15, 0.40)  # fraction of the image side
_MAX_OVERLAP = 0.10  # of the smaller bounding square
_JPEG_QUALITY = 95
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass
class Scene:
    """One rendered scene: the image, one (caption, box, attributes) per visible object, the
    global caption, and ``labels`` (H, W) with the index of the object drawn at each pixel
    (-1 for background)."""

    image: Image.Image
    captions: list[str]
    boxes: list[list[int]]
    objects: list[tuple[str, str, str]]  # (colour, texture, shape)
    global_text: str
    labels: np.ndarray = field(repr=False)

    def record(self) -> dict[str, Any]:
        """The text-box JSON record of the scene."""
        return {"text": list(self.captions), "box": [list(b) for b in self.boxes], "global_text": self.global_text}


# The default image side of ``ps3 data synthetic``: the size the ``tiny-synthetic`` config trains at.
DEFAULT_SIZE = 256


def render_scene(seed: int, index: int, size: int = 224) -> Scene:
    """Render scene ``index`` of the dataset with ``seed`` (independent of every other index)."""
    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, size)
    count = int(rng.integers(2, 5))
    combos = rng.choice(len(SHAPES) * len(COLOURS) * len(TEXTURES), size=count, replace=False)
    squares = _place(rng, size, count)
    labels = np.full((size, size), -1, dtype=np.int16)
    attributes = []
    for i, (combo, (x, y, side)) in enumerate(zip(combos, squares)):
        shape = SHAPES[combo % len(SHAPES)]
        colour = list(COLOURS)[(combo // len(SHAPES)) % len(COLOURS)]
        texture = TEXTURES[combo // (len(SHAPES) * len(COLOURS))]
        mask = shape_mask(shape, side)
        fill = _texture(texture, COLOURS[colour], side, rng)
        region = canvas[y:y + side, x:x + side]
        region[mask] = fill[mask]
        labels[y:y + side, x:x + side][mask] = i
        attributes.append((colour, texture, shape))

    captions, boxes, objects = [], [], []
    for i, (colour, texture, shape) in enumerate(attributes):
        rows, cols = np.nonzero(labels == i)
        if rows.size == 0:  # fully hidden by later objects (cannot happen with small overlaps)
            continue
        article = "an" if colour[0] in "aeiou" else "a"
        captions.append(f"{article} {colour} {texture} {shape}")
        boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
        objects.append((colour, texture, shape))
    # Renumber labels to the kept objects' order so labels == k is the object of captions[k].
    kept = [i for i in range(len(attributes)) if (labels == i).any()]
    relabelled = np.full_like(labels, -1)
    for new, old in enumerate(kept):
        relabelled[labels == old] = new
    return Scene(Image.fromarray(canvas), captions, boxes, objects, _global_caption(captions), relabelled)


def _global_caption(captions: Sequence[str]) -> str:
    listed = ", ".join(captions[:-1]) + " and " + captions[-1] if len(captions) > 1 else captions[0]
    number = _NUMBER_WORDS.get(len(captions), str(len(captions)))
    return f"A textured grey background with {number} shapes: {listed}."


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation grey with a smooth blotchy pattern and per-pixel noise."""
    base = rng.uniform(95, 160) + rng.uniform(-12, 12, size=3)
    # Mostly shared across channels (brightness blotches), slightly per channel (faint tints).
    coarse = (rng.normal(0.0, 18.0, size=(6, 6, 1)) + rng.normal(0.0, 5.0, size=(6, 6, 3))).astype(np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(coarse[..., c])) for c in range(3)]  # mode F
    blotches = np.stack([np.asarray(c.resize((size, size), Image.Resampling.BICUBIC)) for c in channels], axis=-1)
    noise = rng.normal(0.0, 9.0, size=(size, size, 3))
    return np.clip(base + blotches + noise, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, int]]:
    """Bounding squares (x, y, side) for ``count`` objects overlapping little; at least two."""
    low, high = (max(int(round(f * size)), 4) for f in _OBJECT_SIDE)
    while True:
        placed: list[tuple[int, int, int]] = []
        for _ in range(count):
            side = int(rng.integers(low, high + 1))
            for _attempt in range(60):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if all(_overlap((x, y, side), other) <= _MAX_OVERLAP * min(side, other[2]) ** 2 for other in placed):
                    placed.append((x, y, side))
                    break
                side = max(low, int(side * 0.95))  # crowded: try a smaller object
        if len(placed) >= 2:
            return placed


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def _texture(texture: str, colour: tuple[int, int, int], side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) uint8 fill: the colour, with dark diagonal stripes or dark dots."""
    fill = np.empty((side, side, 3), dtype=np.uint8)
    fill[:] = colour
    dark = (np.asarray(colour) * 0.3).astype(np.uint8)
    rows, cols = np.mgrid[0:side, 0:side]
    if texture == "striped":
        width = max(2, side // 10)
        phase = int(rng.integers(0, 2 * width))
        fill[((rows + cols + phase) // width) % 2 == 1] = dark
    elif texture == "dotted":
        spacing = max(5, side // 5)
        radius = spacing * 0.28
        dy, dx = rows % spacing - spacing / 2, cols % spacing - spacing / 2
        fill[dy * dy + dx * dx <= radius * radius] = dark
    return fill


# --------------------------------------------------------------------------------------------
# Writing shards


def encode_jpeg(image: Image.Image) -> bytes:
    """The JPEG bytes of a scene as stored in the image shards (quality 95, 4:4:4)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps colour edges
    return buffer.getvalue()


def sample_key(index: int) -> str:
    """The sample key of scene ``index``."""
    return f"{index:08d}"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_arguments(images: int, seed: int, size: int, shard_size: int) -> None:
    _check_int("images", images, 1)
    _check_int("seed", seed, 0)
    _check_int("size", size, MIN_SIZE)
    _check_int("shard_size", shard_size, 1)


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    images: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    shard_size: int = 100,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[str]]:
    """Write ``images`` synthetic scenes of ``size``×``size`` pixels as paired shards of
    ``shard_size`` samples under ``out_dir`` (layout in the module docstring).

    ``progress`` is called with the number of images written after each image. Returns
    ``{"images": [image shard paths], "text_boxes": [text-box shard paths]}``.
    Raises ``ValueError`` when ``out_dir`` already holds shards (unless ``overwrite``).
    """
    _check_arguments(images, seed, size, shard_size)
    with PairedShardWriter(out_dir, shard_size=shard_size, overwrite=overwrite) as writer:
        for index in range(images):
            scene = render_scene(seed, index, size)
            writer.write(sample_key(index), encode_jpeg(scene.image), scene.record())
            if progress is not None:
                progress(1)
    return writer.written


# --------------------------------------------------------------------------------------------
# Command line: ps3 data synthetic OUT --images N --seed S [--size PX] [--shard-size K]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``ps3 data synthetic`` to ``parser``."""
    parser.add_argument("out", help="output directory (gets images/ and text_boxes/ shard folders)")
    parser.add_argument("--images", type=int, required=True, help="number of scenes to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes the same shards (default 0)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image side in pixels, >= {MIN_SIZE} (default {DEFAULT_SIZE}, tiny-synthetic's size)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``ps3 data synthetic`` for parsed ``args``; returns the exit code."""
    from tqdm import tqdm

    # Refuse bad arguments before a progress bar appears.
    _check_arguments(args.images, args.seed, args.size, args.shard_size)
    if not args.overwrite and existing_paired_shards(args.out):
        with user_input("--out"):
            prepare_paired_output(args.out, overwrite=False)  # raises the error that explains what to do
    # No bar when stderr is not a terminal (a log file would get every redraw), as ps3 train.
    quiet = args.quiet or not sys.stderr.isatty()
    with tqdm(total=args.images, unit="image", desc="synthetic", disable=quiet) as bar, \
            user_input("--out", errors=(OSError,)):
        written = write_synthetic_dataset(args.out, args.images, args.seed, size=args.size,
                                          shard_size=args.shard_size, overwrite=args.overwrite, progress=bar.update)
    if not args.quiet:
        root = Path(args.out)
        print(f"wrote {args.images} images in {len(written['images'])} shard pair(s) to "
              f"{root / 'images'} and {root / 'text_boxes'}")
    return 0

