"""Grounded JSON Lines → pre-training shards: ``ps3 data from-jsonl`` (design §5).

The format a captioning or grounding pipeline writes, one JSON object per line::

    {"image": "photos/0001.jpg",
     "global_text": "A kitchen with a red kettle on the stove.",
     "regions": [{"text": "a red kettle", "box": [412, 230, 498, 311]}, ...]}

* ``image`` (required): a path, relative to ``--images`` (default: the JSONL file's folder) or
  absolute.
* ``regions`` (optional): ``text`` and ``box = [x0, y0, x1, y1]`` in the pixels of the image
  file as stored (``width``/``height`` fields on the line, when given, are checked against the
  file, and say the boxes are in the upright frame when they match only that).
* ``global_text`` (optional): a string or a list of strings (``--global-caption`` picks).
* ``key`` (optional): the sample key; default the line's index from 0 (``00000042``). Keys are made
  webdataset-safe (letters, digits, ``_`` and ``-``); a line reusing a key is dropped and counted.

Blank lines are skipped; a line that is not such an object is dropped and counted (``bad_line``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..runtime import UserError
from .convert_common import DropLog, SourceImage, sanitize_key
from .convert_run import add_common_arguments, run_conversion

__all__ = ["JSONL_DROP_REASONS", "read_jsonl", "add_arguments", "run_from_args"]

JSONL_DROP_REASONS = {
    "bad_line": "image: a line that is not a JSON object with an 'image' path, or with malformed "
                "'regions' / 'global_text' fields",
    "duplicate_key": "image: a line whose 'key' an earlier line already used",
}


def _line_source(item: Any, number: int, root: Path) -> SourceImage | str:
    """The source image of one parsed line, or why the line is unusable."""
    if not isinstance(item, dict):
        return f"a JSON {type(item).__name__}, not an object"
    image = item.get("image")
    if not isinstance(image, str) or not image:
        return "no 'image' path"
    regions = item.get("regions", [])
    if not isinstance(regions, list) or not all(isinstance(r, dict) for r in regions):
        return "'regions' must be a list of {\"text\", \"box\"} objects"
    global_text = item.get("global_text", [])
    global_texts = [global_text] if isinstance(global_text, str) else global_text
    if not isinstance(global_texts, list) or not all(isinstance(t, str) for t in global_texts):
        return "'global_text' must be a string or a list of strings"
    size = (item.get("width"), item.get("height"))
    declared = size if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size) else None
    key = item.get("key", f"{number:08d}")
    return SourceImage(key=sanitize_key(key), path=str(root / image), name=image,
                       regions=[(r.get("text", ""), r.get("box")) for r in regions],
                       global_texts=list(global_texts), declared_size=declared)


def read_jsonl(path: str | os.PathLike,
               images_dir: str | os.PathLike | None = None) -> tuple[list[SourceImage], DropLog]:
    """The images listed in a JSON Lines file with their regions, and what was dropped."""
    root = Path(images_dir) if images_dir is not None else Path(path).parent
    drops = DropLog()
    sources: list[SourceImage] = []
    keys: set[str] = set()
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"FILE: cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                source = _line_source(json.loads(line), number, root)
            except ValueError as exc:
                source = f"invalid JSON ({exc})"
            if isinstance(source, str):
                drops.add("bad_line", f"line {number + 1}: {source}")
            elif source.key in keys:
                drops.add("duplicate_key", f"line {number + 1}: key {source.key!r}")
            else:
                keys.add(source.key)
                sources.append(source)
    return sources, drops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSON Lines file: one {\"image\", \"global_text\", \"regions\"} object per line")
    parser.add_argument("--images", help="folder the 'image' paths are relative to (default: the file's folder)")

    add_common_arguments(parser)

def run_from_args(args: argparse.Namespace) -> int:
    sources, drops = read_jsonl(args.file, args.images)
    settings = {"file": os.path.abspath(args.file), "images": args.images and os.path.abspath(args.images)}
    return run_conversion(args, sources, drops, source_name="jsonl", settings=settings, reasons=JSONL_DROP_REASONS)
