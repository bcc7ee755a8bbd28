"""COCO → pre-training shards: ``ps3 data from-coco`` (design §5).

Reads the COCO object-detection annotations (``instances_*.json``: ``images`` with ``id``,
``file_name``, ``width``, ``height``; ``annotations`` with ``image_id``, ``category_id``,
``bbox = [x, y, width, height]`` in pixels from the top-left corner, ``iscrowd``;
``categories`` with ``id``, ``name``, ``supercategory``) and optionally the caption annotations
(``captions_*.json``: ``annotations`` with ``image_id`` and ``caption``).

* Each object becomes a region: text from ``--local-text`` (default ``"{name}"``, the category
  name; ``"a photo of a {name}"``, ``"{supercategory}: {name}"`` … work too), box
  ``[x, y, x + width, y + height]``.
* Crowd annotations (``iscrowd: 1``, one box around a group) are dropped unless ``--keep-crowd``.
* The image's captions, in annotation order, become ``global_text`` (``--global-caption``).
* Images come in the order of ``images`` in the instances file; the key is the image id,
  zero-padded to 12 digits like COCO file names.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..runtime import UserError
from .convert_common import DropLog, SourceImage, read_json, sanitize_key
from .convert_run import add_common_arguments, run_conversion

__all__ = ["COCO_DROP_REASONS", "read_coco", "add_arguments", "run_from_args"]

COCO_DROP_REASONS = {
    "crowd": "region: a crowd annotation (iscrowd=1; --keep-crowd keeps them)",
    "unknown_category": "region: category_id not among the categories",
    "unknown_image": "annotation or caption for an image id the instances file does not list",
    "bad_annotation": "an annotation without a usable bbox/caption field",
}


def _load_json(path: str | os.PathLike, argument: str) -> dict[str, Any]:
    data = read_json(path, argument)
    if not isinstance(data, dict) or not isinstance(data.get("annotations", []), list):
        raise UserError(f"{argument}: {path} is not a COCO annotation file (an object with an 'annotations' list)")
    return data


def _category_texts(categories: Any, template: str) -> dict[Any, str]:
    if not isinstance(categories, list):
        raise UserError("--instances: the file has no 'categories' list")
    texts = {}
    for category in categories:
        if isinstance(category, dict) and "id" in category:
            fields = {"name": str(category.get("name", "")), "supercategory": str(category.get("supercategory", ""))}
            texts[category["id"]] = template.format(**fields)
    return texts


def _check_template(template: str) -> None:
    try:
        template.format(name="x", supercategory="y")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--local-text must be a text with {{name}} and/or {{supercategory}}, got {template!r} "
                         f"({type(exc).__name__}: {exc})") from None


def read_coco(images_dir: str | os.PathLike, instances: str | os.PathLike, captions: str | os.PathLike | None = None,
              *, local_text: str = "{name}", keep_crowd: bool = False) -> tuple[list[SourceImage], DropLog]:
    """The images of a COCO instances file (and their captions), and what was dropped reading them."""
    _check_template(local_text)
    data = _load_json(instances, "--instances")
    if not isinstance(data.get("images"), list):
        raise UserError(f"--instances: {instances} has no 'images' list")
    category_text = _category_texts(data.get("categories"), local_text)
    drops = DropLog()
    sources: dict[Any, SourceImage] = {}
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            drops.add("bad_annotation", f"image entry {str(image)[:80]}")
            continue
        size = (image.get("width"), image.get("height"))
        declared = size if all(isinstance(v, int) and v > 0 for v in size) else None
        key = f"{image['id']:012d}" if isinstance(image["id"], int) else sanitize_key(image["id"])
        sources[image["id"]] = SourceImage(key=key, path=str(Path(images_dir) / image["file_name"]),
                                           name=image["file_name"], declared_size=declared)
    for annotation in data["annotations"]:
        _add_object(annotation, sources, category_text, keep_crowd, drops)
    if captions is not None:
        for annotation in _load_json(captions, "--captions")["annotations"]:
            _add_caption(annotation, sources, drops)
    return list(sources.values()), drops


def _source_of(annotation: Any, field: str, kind: type, what: str, sources: dict[Any, SourceImage],
               drops: DropLog) -> SourceImage | None:
    """The image an annotation belongs to, or None after counting why it is dropped: not an
    object with ``field`` of type ``kind`` (``bad_annotation``), or an unknown ``image_id``."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get(field), kind):
        drops.add("bad_annotation", f"{what} {str(annotation)[:80]}")
        return None
    source = sources.get(annotation.get("image_id"))
    if source is None:
        drops.add("unknown_image", f"{what} {annotation.get('id')} of image {annotation.get('image_id')}")
    return source


def _add_object(annotation: Any, sources: dict[Any, SourceImage], category_text: dict[Any, str],
                keep_crowd: bool, drops: DropLog) -> None:
    source = _source_of(annotation, "bbox", list, "annotation", sources, drops)
    if source is None:
        return
    where = f"annotation {annotation.get('id')} of image {annotation.get('image_id')}"
    if annotation.get("iscrowd") and not keep_crowd:
        drops.add("crowd", f"{source.name}: {where}")
        return
    text = category_text.get(annotation.get("category_id"))
    if text is None:
        drops.add("unknown_category", f"{source.name}: {where} has category_id {annotation.get('category_id')!r}")
        return
    bbox = annotation["bbox"]
    if len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        x, y, width, height = bbox
        bbox = [x, y, x + width, y + height]
    source.regions.append((text, bbox))  # malformed boxes are counted as bad_box by build_sample


def _add_caption(annotation: Any, sources: dict[Any, SourceImage], drops: DropLog) -> None:
    source = _source_of(annotation, "caption", str, "caption", sources, drops)
    if source is None:
        return
    source.global_texts.append(annotation["caption"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder holding the images' file_name paths (e.g. val2017)")
    parser.add_argument("--instances", required=True, help="instances_*.json (object boxes and categories)")
    parser.add_argument("--captions", help="captions_*.json: the images' captions become global_text")
    parser.add_argument("--local-text", default="{name}",
                        help="text of an object's region, from {name} and {supercategory} (default '{name}')")
    parser.add_argument("--keep-crowd", action="store_true", help="keep crowd annotations (iscrowd=1) as regions")

    add_common_arguments(parser)

def run_from_args(args: argparse.Namespace) -> int:
    sources, drops = read_coco(args.images, args.instances, args.captions, local_text=args.local_text,
                               keep_crowd=args.keep_crowd)
    settings = {"images": os.path.abspath(args.images), "instances": os.path.abspath(args.instances),
                "captions": args.captions and os.path.abspath(args.captions), "local_text": args.local_text,
                "keep_crowd": args.keep_crowd}
    return run_conversion(args, sources, drops, source_name="coco", settings=settings, reasons=COCO_DROP_REASONS)
