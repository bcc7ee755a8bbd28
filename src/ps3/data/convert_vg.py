"""Visual Genome → pre-training shards: ``ps3 data from-vg`` (design §5).

Reads ``region_descriptions.json``: a list with one entry per image, ``{"id": image_id,
"regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}, …]}`` (boxes in
pixels from the top-left corner), and optionally ``image_data.json``: a list of ``{"image_id"
(or "id"), "width", "height", "url", …}``.

* Each region description becomes a region: its phrase (whitespace collapsed) with the box
  ``[x, y, x + width, y + height]``. Visual Genome repeats many phrases on the same box: those
  duplicates are dropped, and different phrases on one box are merged.
* Visual Genome has no image-level caption: records have no ``global_text``, so images
  without a usable region are dropped (``no_caption``).
* Image files are looked up under ``--images`` by the last two parts of the ``url`` in
  ``image_data.json`` (``VG_100K_2/1.jpg``), then ``ID.jpg``, ``VG_100K/ID.jpg`` and
  ``VG_100K_2/ID.jpg``. With ``image_data.json`` its width/height are checked against the file.
* Images come in the order of ``region_descriptions.json``; the key is the image id.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..runtime import UserError
from .convert_common import DropLog, SourceImage, read_json, sanitize_key
from .convert_run import add_common_arguments, run_conversion

__all__ = ["VG_DROP_REASONS", "read_visual_genome", "add_arguments", "run_from_args"]

VG_DROP_REASONS = {
    "bad_annotation": "an image entry or region without the expected fields (id, regions, phrase, x, y, width, height)",
}
_BOX_FIELDS = ("x", "y", "width", "height")


def _image_data(path: str | os.PathLike | None) -> dict[Any, dict[str, Any]]:
    if path is None:
        return {}
    data = read_json(path, "--image-data")
    if not isinstance(data, list):
        raise UserError(f"--image-data: {path} is not Visual Genome image data (a JSON list of images)")
    by_id = {}
    for entry in data:
        if isinstance(entry, dict):
            image_id = entry.get("image_id", entry.get("id"))
            if image_id is not None:
                by_id[image_id] = entry
    return by_id


def _image_path(images_dir: Path, image_id: Any, info: dict[str, Any]) -> str:
    candidates = []
    url = info.get("url")
    if isinstance(url, str) and url:
        parts = url.rstrip("/").split("/")
        candidates += [images_dir.joinpath(*parts[-2:]), images_dir / parts[-1]]
    candidates += [images_dir / f"{image_id}.jpg", images_dir / "VG_100K" / f"{image_id}.jpg",
                   images_dir / "VG_100K_2" / f"{image_id}.jpg"]
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def _declared_size(info: dict[str, Any]) -> tuple[int, int] | None:
    size = (info.get("width"), info.get("height"))
    return size if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size) else None


def _region(region: Any) -> tuple[str, Any] | None:
    if not isinstance(region, dict) or not all(k in region for k in _BOX_FIELDS):
        return None
    x, y, width, height = (region[k] for k in _BOX_FIELDS)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y, width, height)):
        box: Any = [x, y, x + width, y + height]
    else:
        box = [x, y, width, height]  # not numbers: counted as bad_box by build_sample
    return region.get("phrase", ""), box


def read_visual_genome(images_dir: str | os.PathLike, regions: str | os.PathLike,
                       image_data: str | os.PathLike | None = None) -> tuple[list[SourceImage], DropLog]:
    """The images of ``region_descriptions.json`` with their regions, and what was dropped."""
    data = read_json(regions, "--regions")
    if not isinstance(data, list):
        raise UserError(f"--regions: {regions} is not Visual Genome region descriptions (a JSON list of images)")
    info_by_id = _image_data(image_data)
    root = Path(images_dir)
    drops = DropLog()
    sources: list[SourceImage] = []
    seen: set[str] = set()
    for entry in data:
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None or not isinstance(entry.get("regions"), list):
            drops.add("bad_annotation", f"image entry {str(entry)[:80]}")
            continue
        key = sanitize_key(image_id)
        if key in seen:
            drops.add("bad_annotation", f"image {image_id} listed twice (the first entry is kept)")
            continue
        seen.add(key)
        info = info_by_id.get(image_id, {})
        path = _image_path(root, image_id, info)
        source = SourceImage(key=key, path=path, name=os.path.relpath(path, root),
                             declared_size=_declared_size(info))
        for region in entry["regions"]:
            pair = _region(region)
            if pair is None:
                drops.add("bad_annotation", f"{source.name}: region {str(region)[:80]}")
            else:
                source.regions.append(pair)
        sources.append(source)
    return sources, drops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder holding the images (ID.jpg, or VG_100K*/ID.jpg)")
    parser.add_argument("--regions", required=True, help="region_descriptions.json")
    parser.add_argument("--image-data", help="image_data.json (image sizes and file locations)")

    add_common_arguments(parser)

def run_from_args(args: argparse.Namespace) -> int:
    sources, drops = read_visual_genome(args.images, args.regions, args.image_data)
    settings = {"images": os.path.abspath(args.images), "regions": os.path.abspath(args.regions),
                "image_data": args.image_data and os.path.abspath(args.image_data)}
    return run_conversion(args, sources, drops, source_name="visual-genome", settings=settings,
                          reasons=VG_DROP_REASONS)
