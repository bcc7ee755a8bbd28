"""A synthetic high-resolution QA set: questions only the top scale can answer.

Rules (also stated in ``docs/hrqa.md``). Geometry is measured in **low-res cells**: ``c = S /
low_res_grid`` canvas pixels, the part of an ``S`` px canvas one low-res patch sees (8 for the
``hrqa-synthetic`` config: 64 px low-res scale, patch 8, so c = S / 8).

* Canvas: ``S``×``S`` (``--size``, 64 … 3780 px): a low-saturation background with smooth
  blotches, per-pixel noise and background structure (thin straight lines).
* Landmarks: 3–5 large shapes (side 1.2–2 c, so each covers more than one low-res patch), each
  with its own colour (red, green, blue, yellow, purple, orange) and a shape (circle, square,
  triangle, diamond, hexagon, star); named "the blue star". Their boxes are ≥ 1.5 c apart and
  ≥ 1 c from the border.
* Tags: small shapes in one of two neutral inks (near-white or near-black). Every landmark has
  one tag beside it (left, right, above or below, 0.1–0.3 c from its box); 8–16 distractor tags
  lie ≥ 1 c from every landmark box, so a landmark's own tag is its nearest (any other tag is
  ≥ 0.6 c from its box: 1.5 c between landmarks less 0.9 c of tag and gap). A tag's side is at
  most 0.6 c (< one low-res patch) and every tag shape is drawn with the same ink area
  (0.115 c², within pixel rounding), so the low-res view of a tag, a blur of under a patch,
  carries no shape information by area.
* Confetti: 10–20 small dots (side 0.15–0.3 c) in the landmark colours, ≥ 0.5 c from every box.
* Question (one per image): the shape of the tag beside one landmark, named by the landmark
  ("next to the blue star" or "above the blue star"); answer one of the six shape words
  (chance 1/6). The human turn carries the tag's box in ``"boxes"`` (edge pixels
  ``[x0, y0, x1, y1]``).
* Seeds: image ``i`` of split ``train`` is drawn from ``numpy.random.default_rng([seed, 0, i])``,
  of ``test`` from ``[seed, 1, i]``: the splits never share a random stream, and the same
  arguments write the same files.

Output of :func:`write_hrqa`: ``OUT/data.json`` (LLaVA conversation records with ``"choices"``)
and ``OUT/images/*.jpg``; with ``shards=True`` also pre-training shards of the same scenes in
``OUT/shards/{images,text_boxes}`` with one caption and box per landmark and tag (design §5).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..runtime import UserError, user_input

__all__ = ["COLOURS", "SHAPES", "SPLITS", "HRQAScene", "add_arguments", "render_hrqa", "run_from_args", "shape_mask",
           "tag_side", "write_hrqa"]

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 75, 215),
    "yellow": (240, 205, 35), "purple": (135, 55, 185), "orange": (245, 135, 25),
}
INKS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15)}
SPLITS = ("train", "test")
LOW_RES_GRID = 8  # hrqa-synthetic: 64 px low-res scale / patch 8
DEFAULT_SIZE = 512
MIN_SIZE, MAX_SIZE = 64, 3780
TAG_AREA = 0.115  # ink area of every tag, in c²
TAG_MAX_SIDE = 0.6  # in c: the star, the sparsest shape, at TAG_AREA
_JPEG_QUALITY = 95


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of ``shape`` inscribed in a square of ``side`` pixels."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last = side - 1
    mid = last / 2
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, last, last], fill=255)
    elif shape == "triangle":
        draw.polygon([(mid, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(mid, 0), (last, mid), (mid, last), (0, mid)], fill=255)
    elif shape in ("hexagon", "star"):
        radii, corners, start = ([mid], 6, 0.0) if shape == "hexagon" else ([mid, mid * 0.45], 5, -math.pi / 2)
        steps = corners * len(radii)
        draw.polygon([(mid + radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / steps),
                       mid + radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / steps)) for k in range(steps)],
                     fill=255)
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    return np.asarray(canvas) > 0


# Ink fraction of each shape's bounding square, measured once at a large size.
_FILL = {s: float(shape_mask(s, 512).mean()) for s in SHAPES}


@functools.lru_cache(maxsize=4096)
def tag_side(shape: str, cell: float) -> int:
    """Bounding side (px) of a tag of ``shape``: the side whose drawn mask has the ink area closest
    to ``TAG_AREA`` c², whatever the shape (small masks have relatively more edge pixels)."""
    area = TAG_AREA * cell * cell
    guess = math.sqrt(area / _FILL[shape])
    sides = range(max(int(guess) - 3, 2), int(guess) + 4)
    return min(sides, key=lambda side: abs(int(shape_mask(shape, side).sum()) - area))


@dataclass
class Item:
    """A drawn object: kind ("landmark", "tag", "confetti"), colour or ink name, shape, box."""

    kind: str
    colour: str
    shape: str
    box: list[int]
    side: str = ""  # for a landmark's own tag: where it lies ("left", "right", "above", "below")


@dataclass
class HRQAScene:
    """One rendered image and its question: ``items`` every object drawn, ``landmark`` and
    ``target`` the indices (into ``items``) of the named landmark and the asked tag."""

    image: Image.Image
    items: list[Item]
    landmark: int
    target: int
    question: str
    answer: str
    cell: float
    meta: dict[str, Any] = field(default_factory=dict)

    def captions(self) -> tuple[list[str], list[list[int]], str]:
        """Pre-training captions: (one caption per landmark and tag, their boxes, global caption)."""
        texts, boxes = [], []
        for it in self.items:
            if it.kind == "landmark":
                texts.append(f"a {it.colour} {it.shape}")
            elif it.kind == "tag":
                texts.append(f"a small {it.colour} {it.shape} tag")
            else:
                continue
            boxes.append(list(it.box))
        names = [f"a {it.colour} {it.shape}" for it in self.items if it.kind == "landmark"]
        return texts, boxes, "A cluttered grey canvas with " + ", ".join(names) + " and small tags."


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(100, 155) + rng.uniform(-10, 10, size=3)
    coarse = rng.normal(0.0, 16.0, size=(8, 8, 1)) + rng.normal(0.0, 4.0, size=(8, 8, 3))
    blotches = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(coarse[..., c]).astype(np.float32))
                                    .resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    canvas = np.clip(base + blotches + rng.normal(0.0, 8.0, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 13))):  # structure: long thin lines a shade off the background
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        shade = int(np.clip(base.mean() + rng.choice([-35, 35]), 0, 255))
        draw.line([x0, y0, x1, y1], fill=(shade,) * 3, width=max(1, size // 256))
    return np.asarray(image).copy()


def _gap(a: list[int], b: list[int]) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return math.hypot(dx, dy)


def _box(x: int, y: int, side: int) -> list[int]:
    return [x, y, x + side, y + side]


def _place_landmarks(rng: np.random.Generator, size: int, cell: float) -> list[list[int]]:
    want = int(rng.integers(3, 6))
    margin = math.ceil(cell)
    best: list[list[int]] = []
    for _attempt in range(20):  # a first landmark in the middle can block the rest: start over
        boxes: list[list[int]] = []
        for _ in range(60 * want):
            side = int(rng.integers(int(1.2 * cell), int(2.0 * cell) + 1))
            room = size - 2 * margin - side
            if room < 0:
                break
            x, y = (int(v) + margin for v in rng.integers(0, room + 1, size=2))
            box = _box(x, y, side)
            if all(_gap(box, other) >= 1.5 * cell for other in boxes):
                boxes.append(box)
                if len(boxes) == want:
                    return boxes
        best = max(best, boxes, key=len)
        if len(best) >= 3:
            return best
    if len(best) < 2:
        raise UserError(f"size {size} is too small for the hrqa layout; pass --size >= {MIN_SIZE}")
    return best


def _own_tag(rng: np.random.Generator, landmark: list[int], side: int, cell: float, size: int) -> tuple[list[int], str]:
    where = ("left", "right", "above", "below")[int(rng.integers(4))]
    gap = round(rng.uniform(0.1, 0.3) * cell)
    x0, y0, x1, y1 = landmark
    along = int(rng.integers(0, max(x1 - x0 - side, 0) + 1)) if where in ("above", "below") else \
        int(rng.integers(0, max(y1 - y0 - side, 0) + 1))
    if where == "left":
        x, y = x0 - gap - side, y0 + along
    elif where == "right":
        x, y = x1 + gap, y0 + along
    elif where == "above":
        x, y = x0 + along, y0 - gap - side
    else:
        x, y = x0 + along, y1 + gap
    x, y = min(max(x, 0), size - side), min(max(y, 0), size - side)
    return _box(x, y, side), where


def _scatter(rng: np.random.Generator, count: int, sides: list[int], size: int, avoid: list[list[int]],
             distance: float) -> list[tuple[int, list[int]]]:
    """(index into ``sides``, box) of the first ``count`` sides that found a free place."""
    out: list[tuple[int, list[int]]] = []
    for i, side in enumerate(sides[:count]):
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = _box(x, y, side)
            if all(_gap(box, a) >= distance for a in avoid) and all(_gap(box, o) >= 1 for _, o in out):
                out.append((i, box))
                break
    return out


def _draw(canvas: np.ndarray, shape: str, box: list[int], colour: tuple[int, int, int]) -> None:
    side = box[2] - box[0]
    mask = shape_mask(shape, side)
    canvas[box[1]:box[3], box[0]:box[2]][mask] = colour


def render_hrqa(seed: int, index: int, size: int = DEFAULT_SIZE, split: str = "train",
                low_res_grid: int = LOW_RES_GRID) -> HRQAScene:
    """Image ``index`` of ``split`` for ``seed`` (independent of every other index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    cell = size / low_res_grid
    canvas = _background(rng, size)
    items: list[Item] = []
    colours = rng.permutation(len(COLOURS))
    for i, box in enumerate(_place_landmarks(rng, size, cell)):
        items.append(Item("landmark", list(COLOURS)[int(colours[i])], SHAPES[int(rng.integers(len(SHAPES)))], box))
    landmarks = [it.box for it in items]
    for li in range(len(landmarks)):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        box, where = _own_tag(rng, landmarks[li], tag_side(shape, cell), cell, size)
        items.append(Item("tag", list(INKS)[int(rng.integers(2))], shape, box, where))
    shapes = [SHAPES[int(v)] for v in rng.integers(len(SHAPES), size=16)]
    placed = _scatter(rng, int(rng.integers(8, 17)), [tag_side(s, cell) for s in shapes], size,
                      [it.box for it in items], cell)
    items += [Item("tag", list(INKS)[int(rng.integers(2))], shapes[i], b) for i, b in placed]
    dots = [max(round(rng.uniform(0.15, 0.3) * cell), 1) for _ in range(20)]
    placed = _scatter(rng, int(rng.integers(10, 21)), dots, size, [it.box for it in items], 0.5 * cell)
    items += [Item("confetti", list(COLOURS)[int(rng.integers(len(COLOURS)))], "circle", b) for _, b in placed]
    for it in items:
        _draw(canvas, it.shape, it.box, COLOURS.get(it.colour) or INKS[it.colour])
    landmark = int(rng.integers(len(landmarks)))
    target = len(landmarks) + landmark
    name = f"the {items[landmark].colour} {items[landmark].shape}"
    relation = "next to" if rng.random() < 0.5 else {"left": "to the left of", "right": "to the right of",
                                                       "above": "above", "below": "below"}[items[target].side]
    question = f"What shape is the small tag {relation} {name}?"
    return HRQAScene(Image.fromarray(canvas), items, landmark, target, question, items[target].shape, cell)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def record_of(scene: HRQAScene, image_name: str, key: str) -> dict[str, Any]:
    """The LLaVA conversation record of a scene (the asked tag's box on the human turn)."""
    prompt = f"<image>\n{scene.question} Answer with one word: {', '.join(SHAPES)}."
    return {"id": key, "image": image_name,
            "conversations": [{"from": "human", "value": prompt, "boxes": [list(scene.items[scene.target].box)]},
                              {"from": "gpt", "value": scene.answer}],
            "choices": list(SHAPES)}


def _check(images: Any, size: Any, seed: Any, split: Any) -> None:
    for name, value, low, high in (("--images", images, 1, None), ("--size", size, MIN_SIZE, MAX_SIZE),
                                   ("--seed", seed, 0, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            bound = f"in [{low}, {high}]" if high else f">= {low}"
            raise UserError(f"{name} must be an int {bound}, got {value!r}")
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def write_hrqa(out_dir: str | Path, images: int, *, size: int = DEFAULT_SIZE, seed: int = 0, split: str = "train",
               shards: bool = False, progress=None) -> dict[str, Any]:
    """Write ``images`` scenes of ``split`` to ``out_dir`` (layout in the module docstring);
    returns ``{"data": path of data.json, "images": count, "answers": {shape: count}}``."""
    _check(images, size, seed, split)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    writer = None
    if shards:
        from .writer import PairedShardWriter

        writer = PairedShardWriter(root / "shards", shard_size=200, overwrite=True)
    records, answers = [], dict.fromkeys(SHAPES, 0)
    try:
        for index in range(images):
            scene = render_hrqa(seed, index, size, split)
            key = f"hrqa_{split}_{index:06d}"
            data = _jpeg(scene.image)
            (root / "images" / f"{key}.jpg").write_bytes(data)
            records.append(record_of(scene, f"{key}.jpg", key))
            answers[scene.answer] += 1
            if writer is not None:
                texts, boxes, global_text = scene.captions()
                writer.write(f"{index:08d}", data, {"text": texts, "box": boxes, "global_text": global_text})
            if progress is not None:
                progress(1)
    finally:
        if writer is not None:
            writer.close()
    path = root / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return {"data": str(path), "images": images, "answers": answers}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``ps3 data hrqa``."""
    parser.add_argument("out", help="output directory (gets data.json and images/)")
    parser.add_argument("--images", type=int, required=True, help="number of images (one question each)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"canvas side in pixels, {MIN_SIZE}..{MAX_SIZE} "
                             f"(default {DEFAULT_SIZE}, hrqa-synthetic's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); splits use disjoint streams")
    parser.add_argument("--split", default="train", help="train or test (default train)")
    parser.add_argument("--shards", action="store_true",
                        help="also write pre-training shards (OUT/shards/images, OUT/shards/text_boxes) of the scenes")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``ps3 data hrqa`` for parsed ``args``; returns the exit code."""
    from tqdm import tqdm

    _check(args.images, args.size, args.seed, args.split)
    quiet = args.quiet or not sys.stderr.isatty()
    with tqdm(total=args.images, unit="image", desc="hrqa", disable=quiet) as bar, \
            user_input("out", errors=(OSError,)):
        result = write_hrqa(args.out, args.images, size=args.size, seed=args.seed, split=args.split,
                            shards=args.shards, progress=bar.update)
    if not args.quiet:
        counts = ", ".join(f"{k} {v}" for k, v in result["answers"].items())
        print(f"wrote {args.images} {args.split} questions to {result['data']} (answers: {counts})")
    return 0
