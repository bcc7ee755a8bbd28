"""``ps3 data show DIR --key K --out FILE.png``: one sample drawn with its boxes and captions.

The image is decoded as the trainer decodes it (EXIF-upright RGB), optionally downscaled so its
longer side is at most ``max_side``, and each region's box is drawn in its own colour with its
caption at the box's top-left corner; the global caption is written in a band under the image.
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..images import load_image
from ..runtime import UserError, user_input
from .shards import IMAGE_EXTENSIONS, iter_shard, list_shard_pairs
from .writer import IMAGE_DIR, TEXT_BOX_DIR

__all__ = ["find_sample", "draw_sample", "add_arguments", "run_from_args"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
_LABEL_CHARS = 60


def find_sample(root: str | os.PathLike, key: str | None = None) -> tuple[str, bytes, dict[str, Any]]:
    """(key, image bytes, record) of ``key`` (the first sample when None) in the paired shards
    under ``root``. Records are searched first (they are small), then only the matching image shard
    is read. ``ValueError`` when the key is not there, naming some of the keys that are."""
    images, records = list_shard_pairs(Path(root) / IMAGE_DIR, Path(root) / TEXT_BOX_DIR,
                                       image_argument="DIR/images", text_box_argument="DIR/text_boxes")
    seen: list[str] = []  # the first keys of the search, for the error
    count = 0
    for image_shard, record_shard in zip(images, records):
        record = None
        for sample in iter_shard(record_shard):
            if key is None or sample["__key__"] == key:
                record = sample
                break
            count += 1
            if len(seen) < 5:
                seen.append(sample["__key__"])
        if record is None:
            continue
        found = record["__key__"]
        image = next((s for s in iter_shard(image_shard) if s["__key__"] == found), None)
        data = None if image is None else next((image[e] for e in IMAGE_EXTENSIONS if e in image), None)
        if data is None or "json" not in record:
            raise UserError(f"key {found!r} has no image in {image_shard} or no .json in {record_shard}")
        try:
            return found, data, json.loads(record["json"])
        except ValueError as exc:
            raise UserError(f"the record of key {found!r} in {record_shard} is not valid JSON ({exc})") from None
    if key is None or not count:
        raise UserError(f"{root} holds no sample")
    more = f" and {count - len(seen)} more" if count > len(seen) else ""
    raise UserError(f"--key: no sample {key!r} in {root}; its keys are {', '.join(map(repr, seen))}{more}")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_sample(image_bytes: bytes, record: dict[str, Any], *, max_side: int | None = 1024) -> Image.Image:
    """The image with the record's boxes and captions drawn on it (see the module docstring).
    Boxes that are not 4 numbers are left out."""
    image = load_image(image_bytes)
    scale = 1.0
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    font_size = max(10, min(image.size) // 40)
    font = _font(font_size)
    global_text = record.get("global_text") if isinstance(record.get("global_text"), str) else ""
    lines = textwrap.wrap(global_text, width=max(20, image.width // (font_size * 6 // 10))) if global_text else []
    band = (len(lines) * (font_size + 4) + 8) if lines else 0
    canvas = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    texts, boxes = record.get("text") or [], record.get("box") or []
    width = max(1, min(image.size) // 200)
    for index, (text, box) in enumerate(zip(texts, boxes)):
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            continue
        colour = _PALETTE[index % len(_PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        label = str(text) if len(str(text)) <= _LABEL_CHARS else str(text)[: _LABEL_CHARS - 1] + "…"
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x0, y0), label, fill=(0, 0, 0), font=font)
    for row, line in enumerate(lines):
        draw.text((4, image.height + 4 + row * (font_size + 4)), line, fill=(0, 0, 0), font=font)
    return canvas


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a dataset folder with images/ and text_boxes/ shards")
    parser.add_argument("--key", help="the sample to draw (default: the first one)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="downscale the drawing so its longer side is at most this "
                             "(default 1024; 0 keeps the size)")


def run_from_args(args: argparse.Namespace) -> int:
    key, data, record = find_sample(args.dir, args.key)
    if not isinstance(record, dict):
        raise UserError(f"the record of key {key!r} is not a JSON object")
    try:
        drawing = draw_sample(data, record, max_side=args.max_side or None)
    except ValueError as exc:
        raise UserError(f"the image of key {key!r} does not decode ({exc})") from None
    with user_input("--out", errors=(OSError,)):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        drawing.save(args.out)
    texts = record.get("text") or []
    print(f"wrote {args.out}: key {key}, {len(texts)} region(s)"
          + (f", global caption {record['global_text'][:60]!r}" if record.get("global_text") else ""))
    return 0
