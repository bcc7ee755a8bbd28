"""A synthetic pre-training dataset in the layout of :mod:`ps3.train.data` (SPEC §5).

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
shards. The command ``ps3 data synthetic OUT --images N --seed S`` calls :func:`run_from_args`.
:func:`write_damaged_dataset` writes a small copy with every kind of damage the data pipeline
must survive, and says what it damaged, for tests.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "Scene",
    "render_scene",
    "write_synthetic_dataset",
    "write_damaged_dataset",
    "add_arguments",
    "run_from_args",
]

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
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
_MTIME = 946684800  # fixed tar timestamps (2000-01-01) so shards are byte-reproducible
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
        mask = _shape_mask(shape, side)
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


def _shape_mask(shape: str, side: int) -> np.ndarray:
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last = side - 1
    centre = last / 2
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, last, last], fill=255)
    elif shape == "triangle":
        draw.polygon([(centre, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(centre, 0), (last, centre), (centre, last), (0, centre)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_star_points(centre, [centre], 6, 0.0), fill=255)
    elif shape == "star":
        draw.polygon(_star_points(centre, [centre, centre * 0.45], 5, -math.pi / 2), fill=255)
    else:  # pragma: no cover - SHAPES is closed
        raise AssertionError(shape)
    return np.asarray(canvas) > 0


def _star_points(centre: float, radii: Sequence[float], corners: int, start: float) -> list[tuple[float, float]]:
    points = []
    steps = corners * len(radii)
    for k in range(steps):
        angle = start + 2 * math.pi * k / steps
        radius = radii[k % len(radii)]
        points.append((centre + radius * math.cos(angle), centre + radius * math.sin(angle)))
    return points


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


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps colour edges
    return buffer.getvalue()


def _encode_json(record: Any) -> bytes:
    return json.dumps(record, sort_keys=True).encode("utf-8")


def _key(index: int) -> str:
    return f"{index:08d}"


def _write_tar(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    """Write one shard atomically (a crash leaves no half shard under the final name)."""
    from webdataset import TarWriter

    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        with TarWriter(handle, encoder=False, mtime=_MTIME, user="ps3", group="ps3") as writer:
            for sample in samples:
                writer.write(sample)
    os.replace(temporary, path)


def _existing_shards(root: Path) -> list[Path]:
    return sorted((root / "images").glob("*.tar")) + sorted((root / "text_boxes").glob("*.tar"))


def _prepare(out_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    root = Path(out_dir)
    images, records = root / "images", root / "text_boxes"
    existing = _existing_shards(root)
    if existing and not overwrite:
        raise ValueError(
            f"{root} already holds shards ({existing[0]}, …): choose an empty output directory or pass "
            f"overwrite=True (--overwrite) to replace them"
        )
    for stale in existing:
        stale.unlink()
    images.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    return images, records


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_arguments(images: int, seed: int, size: int, shard_size: int) -> None:
    _check_int("images", images, 1)
    _check_int("seed", seed, 0)
    _check_int("size", size, MIN_SIZE)
    _check_int("shard_size", shard_size, 1)


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    images: int,
    seed: int,
    size: int = 224,
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
    image_dir, record_dir = _prepare(out_dir, overwrite)
    written: dict[str, list[str]] = {"images": [], "text_boxes": []}
    for shard, start in enumerate(range(0, images, shard_size)):
        image_samples, record_samples = [], []
        for index in range(start, min(start + shard_size, images)):
            scene = render_scene(seed, index, size)
            image_samples.append({"__key__": _key(index), "jpg": _encode_jpeg(scene.image)})
            record_samples.append({"__key__": _key(index), "json": _encode_json(scene.record())})
            if progress is not None:
                progress(1)
        image_path, record_path = image_dir / f"image_{shard:05d}.tar", record_dir / f"text_box_{shard:05d}.tar"
        _write_tar(image_path, image_samples)
        _write_tar(record_path, record_samples)
        written["images"].append(str(image_path))
        written["text_boxes"].append(str(record_path))
    return written


def write_damaged_dataset(out_dir: str | os.PathLike, seed: int = 0, size: int = 64, *,
                          overwrite: bool = False) -> dict[str, Any]:
    """Write 3 paired shards of 6 samples each with every kind of damage the pipeline must
    survive, and describe it.

    Returns ``{"images": [...], "text_boxes": [...], "expected_skips": {reason: count},
    "usable_keys": [keys that must come out], "damage": {key: what was done}}``. The counts are
    what :mod:`ps3.train.data` reports for the whole dataset (reasons in ``SKIP_REASONS``).
    Damage: garbage and truncated JPEG bytes, invalid JSON and a non-object record, an image
    missing for a key and a record missing for another, a box outside the image, an inverted and a
    zero-area box, an empty caption and one that is empty after shaping, captions and boxes of
    different lengths, a record with no caption at all, two keys swapped between the sets, a box
    partly outside (clipped, kept), and an image tar cut in the middle of a file.
    """
    _check_int("seed", seed, 0)
    _check_int("size", size, MIN_SIZE)
    image_dir, record_dir = _prepare(out_dir, overwrite)
    keys = [_key(i) for i in range(18)]
    scenes = [render_scene(seed, i, size) for i in range(18)]
    jpegs = [_encode_jpeg(s.image) for s in scenes]
    records: list[Any] = [s.record() for s in scenes]
    raw_records: dict[int, bytes] = {}
    damage: dict[str, str] = {}
    expected: Counter[str] = Counter()
    inside = [1, 1, size // 2, size // 2]

    # Shard 0: broken images and records.
    jpegs[1] = b"\xff\xd8 this is not a JPEG " + bytes(range(64))
    damage[keys[1]] = "garbage image bytes"
    expected["bad_image"] += 1
    jpegs[2] = jpegs[2][: len(jpegs[2]) // 2]
    damage[keys[2]] = "JPEG truncated to half"
    expected["bad_image"] += 1
    raw_records[3] = b'{"text": ["a red circle"], "box": [[1, 1, 5, 5]'
    damage[keys[3]] = "invalid JSON"
    expected["bad_json"] += 1
    records[4] = [1, 2, 3]
    damage[keys[4]] = "record is a JSON list, not an object"
    expected["bad_json"] += 1
    damage[keys[5]] = "image missing from the image shard"
    expected["missing_image"] += 1
    # Shard 1: bad pairs inside otherwise usable records.
    records[6]["text"].append("a box outside the image")
    records[6]["box"].append([size + 5, size + 5, size + 20, size + 20])
    damage[keys[6]] = "one box entirely outside the image"
    expected["box_outside_image"] += 1
    records[7]["text"] += ["an inverted box", "a zero-area box"]
    records[7]["box"] += [[20, 20, 10, 30], [5, 5, 5, 9]]
    damage[keys[7]] = "an inverted and a zero-area box"
    expected["bad_box"] += 2
    records[8]["text"] += ["   ", "The image is a close-up of"]
    records[8]["box"] += [inside, inside]
    damage[keys[8]] = "an empty caption and one empty after shaping"
    expected["empty_caption"] += 2
    records[9]["text"].append("a caption without a box")
    damage[keys[9]] = "more captions than boxes (the global caption remains)"
    expected["length_mismatch"] += 1
    damage[keys[10]] = "record missing from the text-box shard"
    expected["missing_json"] += 1
    records[11] = {"text": [], "box": [], "global_text": ""}
    damage[keys[11]] = "no caption at all"
    expected["no_usable_caption"] += 1
    # Shard 2: keys out of lockstep, a partly outside box, a truncated image tar.
    damage[keys[12]] = "swapped with the next key in the text-box shard (this one is realigned and kept)"
    damage[keys[13]] = "swapped with the previous key in the text-box shard (lost)"
    expected["key_mismatch"] += 2
    records[15]["box"][0] = [-10, -10, size + 10, size // 2]
    damage[keys[15]] = "first box partly outside the image (clipped, kept)"
    damage[keys[16]] = "image tar cut in the middle of this image"
    damage[keys[17]] = "after the cut of the image tar"
    expected["tar_error"] += 1
    expected["missing_image"] += 2

    def record_bytes(i: int) -> bytes:
        return raw_records.get(i) or _encode_json(records[i])

    image_shards = [[{"__key__": keys[i], "jpg": jpegs[i]} for i in range(s * 6, s * 6 + 6) if i != 5]
                    for s in range(3)]
    record_order = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 11], [13, 12, 14, 15, 16, 17]]
    record_shards = [[{"__key__": keys[i], "json": record_bytes(i)} for i in order] for order in record_order]
    paths: dict[str, list[str]] = {"images": [], "text_boxes": []}
    for shard in range(3):
        image_path, record_path = image_dir / f"image_{shard:05d}.tar", record_dir / f"text_box_{shard:05d}.tar"
        _write_tar(image_path, image_shards[shard])
        _write_tar(record_path, record_shards[shard])
        paths["images"].append(str(image_path))
        paths["text_boxes"].append(str(record_path))

    last = Path(paths["images"][2])
    with tarfile.open(last) as archive:
        member = archive.getmember(f"{keys[16]}.jpg")
        cut = member.offset_data + member.size // 2
    last.write_bytes(last.read_bytes()[:cut])

    usable = [keys[i] for i in (0, 6, 7, 8, 9, 12, 14, 15)]
    return {**paths, "expected_skips": dict(expected), "usable_keys": usable, "damage": damage}


# --------------------------------------------------------------------------------------------
# Command line: ps3 data synthetic OUT --images N --seed S [--size PX] [--shard-size K]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``ps3 data synthetic`` to ``parser``."""
    parser.add_argument("out", help="output directory (gets images/ and text_boxes/ shard folders)")
    parser.add_argument("--images", type=int, required=True, help="number of scenes to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes the same shards (default 0)")
    parser.add_argument("--size", type=int, default=224, help=f"image side in pixels, >= {MIN_SIZE} (default 224)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``ps3 data synthetic`` for parsed ``args``; returns the exit code."""
    from tqdm import tqdm

    # Refuse bad arguments before a progress bar appears.
    _check_arguments(args.images, args.seed, args.size, args.shard_size)
    if not args.overwrite and _existing_shards(Path(args.out)):
        _prepare(args.out, overwrite=False)  # raises the error that explains what to do
    with tqdm(total=args.images, unit="image", desc="synthetic", disable=args.quiet) as bar:
        written = write_synthetic_dataset(args.out, args.images, args.seed, size=args.size,
                                          shard_size=args.shard_size, overwrite=args.overwrite, progress=bar.update)
    if not args.quiet:
        root = Path(args.out)
        print(f"wrote {args.images} images in {len(written['images'])} shard pair(s) to "
              f"{root / 'images'} and {root / 'text_boxes'}")
    return 0

